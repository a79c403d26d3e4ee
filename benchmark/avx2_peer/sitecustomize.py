"""Imported at start by a Python with this folder on its PYTHONPATH, which run_all.py gives vLLM
when PyTorch is capped to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, benchmark/README.md): PyTorch's
checks of the CPU's AVX-512 and AMX answer no, as on a CPU without them. vLLM asks them to
choose the build of its compiled kernels (`vllm._C_AVX2` then) and its attention and matmul
paths; the environment variables that cap PyTorch, oneDNN and MKL do not reach those checks."""

import torch.cpu

HIDDEN_CHECKS = (
    "_is_avx512_supported",
    "_is_avx512_vnni_supported",
    "_is_avx512_bf16_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
)


def _unsupported() -> bool:
    return False


def hide_avx512_and_amx() -> None:
    for name in HIDDEN_CHECKS:
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, _unsupported)


hide_avx512_and_amx()
