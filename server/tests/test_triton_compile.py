"""The Triton kernel for quantized weights compiled ahead of time for NVIDIA GPUs by Triton's own
compiler and the ptxas it ships, which run without a GPU: every code format and grouping, at the
tile shape it takes (`TILES`), for Ampere (sm_80: A100) and Hopper (sm_90: H100, H200).
Each compiles to a cubin whose shared memory fits the GPU's. (test_triton_quantized.py checks
the kernel's results, under Triton's interpreter here and on a GPU where there is one.)

The compiler runs in a process of its own, without the interpreter that conftest.py turns on for
the tests' process where there is no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from quantized_weights import GROUPINGS

# Shared memory one block may take, bytes (CUDA's programming guide, compute capabilities).
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _cases() -> list[dict]:
    """Hopper: every grouping in bfloat16, float16 and float32; Ampere: every grouping in
    bfloat16."""
    cases = []
    for code_format, group_size, offsets in GROUPINGS:
        grouping = {"code_format": int(code_format), "group_size": group_size, "offsets": offsets}
        combinations = [(90, dtype) for dtype in DTYPES] + [(80, torch.bfloat16)]
        for capability, dtype in combinations:
            cases.append({**grouping, "capability": capability, "dtype": DTYPES[dtype]})
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Each case's {"shared": bytes} or {"error": message}, from triton_compile_cases.py."""
    script = Path(__file__).with_name("triton_compile_cases.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        env={name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"},
        input=json.dumps(CASES),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: json.dumps(CASES[i]))
def test_kernel_compiles_for_the_gpu(compiled: list[dict], index: int) -> None:
    result = compiled[index]
    assert "error" not in result, result.get("error")
    assert 0 < result["shared"] <= SHARED_MEMORY[CASES[index]["capability"]]
