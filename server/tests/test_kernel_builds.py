"""Choosing and building the CPU kernels: the paths each CPU gets, the fallback when there is no
C++ compiler, and the kernel tests under AddressSanitizer and UndefinedBehaviorSanitizer."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_CACHE_DIR
from sluice_server.kernels import (
    CpuFeatures,
    KernelBuild,
    KernelBuildError,
    Kernels,
    select_kernels,
)
from sluice_server.kernels.build import compiler, sanitizer_preloads
from sluice_server.kernels.cpu_features import lacks
from sluice_server.layers.attention import TorchAttentionBackend
from sluice_server.layers.ops import CompiledCpuOps, LinearMatmul

AVX2_ONLY = CpuFeatures(
    flags=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}),
    machine="x86_64",
    onednn_bf16=False,
)
NO_AVX2 = CpuFeatures(frozenset({"sse4_2"}), "x86_64", onednn_bf16=False)
AVX512_BF16 = CpuFeatures(
    flags=AVX2_ONLY.flags | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
    machine="x86_64",
    onednn_bf16=True,
)


def test_dtype_and_bfloat16_note_follow_the_cpu_and_kernels() -> None:
    for compiled in (True, False):
        assert AVX512_BF16.default_dtype_name(compiled) == "bfloat16"
        assert AVX512_BF16.bf16_slow_path_note(compiled) is None
    # AVX2: bfloat16 only through the compiled matmul.
    assert AVX2_ONLY.default_dtype_name(compiled_kernels=True) == "bfloat16"
    assert AVX2_ONLY.bf16_slow_path_note(compiled_kernels=True) is None
    assert AVX2_ONLY.default_dtype_name(compiled_kernels=False) == "float32"
    note = AVX2_ONLY.bf16_slow_path_note(compiled_kernels=False)
    assert note is not None and "compiled kernels" in note and "emulated" in note
    # AVX-512 without BF16: oneDNN's bfloat16 (emulated), so float32.
    avx512 = CpuFeatures(AVX2_ONLY.flags | {"avx512f", "avx512bw"}, "x86_64", onednn_bf16=True)
    assert not avx512.sluice_bf16_matmul
    assert avx512.default_dtype_name(compiled_kernels=True) == "float32"
    assert NO_AVX2.default_dtype_name(compiled_kernels=True) == "float32"
    note = NO_AVX2.bf16_slow_path_note(compiled_kernels=True)
    assert note is not None and "AVX2" in note and "float32" in note


def test_builds_say_where_they_cannot_run() -> None:
    arm = CpuFeatures(frozenset({"asimd"}), "aarch64", onednn_bf16=False)
    assert KernelBuild("avx2").unrunnable_reason(AVX2_ONLY) is None
    assert KernelBuild("avx2").unrunnable_reason(NO_AVX2) == (
        "needs AVX2 and FMA (this CPU lacks them)"
    )
    assert "x86-64" in (KernelBuild("portable").unrunnable_reason(arm) or "")
    # AVX-512 without AMX is a build of its own only where the native one has AMX.
    with_amx = CpuFeatures(
        AVX512_BF16.flags | {"amx_tile", "amx_bf16", "amx_int8"}, "x86_64", onednn_bf16=True
    )
    assert KernelBuild("avx512").unrunnable_reason(with_amx) is None
    for cpu in (AVX512_BF16, AVX2_ONLY):
        reason = KernelBuild("avx512").unrunnable_reason(cpu) or ""
        assert "without both AVX-512 and AMX" in reason
    assert KernelBuild("native").unrunnable_reason(arm) is None
    with pytest.raises(ValueError, match="unknown kernel ISA 'avx9'"):
        KernelBuild("avx9")


def test_a_max_isa_hides_the_instructions_above_it() -> None:
    with_amx = CpuFeatures(
        AVX512_BF16.flags | {"amx_tile", "amx_bf16", "amx_int8", "avx_vnni"},
        "x86_64",
        onednn_bf16=True,
        onednn_fp16=True,
    )
    assert with_amx.capped(None) is with_amx and with_amx.kernel_isa == "native"
    avx2 = with_amx.capped("avx2")
    assert avx2.flags == AVX2_ONLY.flags
    assert (avx2.avx2, avx2.avx512, avx2.amx, avx2.native_bf16) == (True, False, False, False)
    assert not (avx2.onednn_bf16 or avx2.onednn_fp16)
    assert avx2.kernel_isa == "avx2" and avx2.max_isa == "avx2"
    # The same decisions as a CPU without AVX-512.
    assert avx2.sluice_bf16_matmul and AVX2_ONLY.sluice_bf16_matmul
    for compiled in (True, False):
        assert avx2.default_dtype_name(compiled) == AVX2_ONLY.default_dtype_name(compiled)
    portable = with_amx.capped("portable")
    assert portable.flags == NO_AVX2.flags and portable.kernel_isa == "portable"
    # A cap never adds what the CPU lacks.
    assert NO_AVX2.capped("avx2").kernel_isa == "portable"
    with pytest.raises(ValueError, match="SLUICE_MAX_CPU_ISA must be one of avx2, portable"):
        with_amx.capped("avx512")


def test_the_max_isa_is_read_when_the_cpu_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_MAX_CPU_ISA", "portable")
    assert CpuFeatures.detect().max_isa == "portable"
    assert not CpuFeatures.detect().avx2
    assert CpuFeatures.hardware().max_isa is None
    monkeypatch.setenv("SLUICE_MAX_CPU_ISA", "")
    assert CpuFeatures.detect() == CpuFeatures.hardware()


def test_a_capped_cpu_loads_the_kernels_built_for_the_cap(
    monkeypatch: pytest.MonkeyPatch, cpu: CpuFeatures
) -> None:
    if not cpu.avx2:
        pytest.skip(lacks("AVX2"))
    monkeypatch.setenv("SLUICE_MAX_CPU_ISA", "avx2")
    kernels = select_kernels("compiled", torch.device("cpu"), KERNEL_CACHE_DIR)
    assert isinstance(kernels.ops, CompiledCpuOps)
    assert kernels.ops.kernels.__name__ == "sluice_cpu_kernels_avx2"
    assert not kernels.ops.cpu.avx512 and kernels.ops.cpu.sluice_bf16_matmul
    packed = kernels.ops.pack_linear(torch.randn(64, 32).to(torch.bfloat16), None)
    assert packed is not None and packed.matmul is LinearMatmul.SLUICE_BF16
    assert kernels.ops.kernels.has_linear_f32() and kernels.ops.cpu.sluice_f32_matmul
    packed = kernels.ops.pack_linear(torch.randn(64, 32), None)
    assert packed is not None and packed.matmul is LinearMatmul.SLUICE_F32


def test_projections_take_the_matmul_the_cpu_has(compiled_kernels: Kernels) -> None:
    assert isinstance(compiled_kernels.ops, CompiledCpuOps)
    module = compiled_kernels.ops.kernels
    weight = torch.randn(64, 32).to(torch.bfloat16)
    float_weight = weight.float()
    x = torch.randn(3, 32)
    # AVX2 only: Sluice's matmul for bfloat16 and float32 (the native build of any AVX2 CPU has
    # both).
    avx2_ops = CompiledCpuOps(module, AVX2_ONLY)
    packed = avx2_ops.pack_linear(weight, None)
    assert module.has_linear_bf16()
    assert packed is not None and packed.matmul is LinearMatmul.SLUICE_BF16
    packed = avx2_ops.pack_linear(float_weight, None)
    if module.has_linear_f32():
        assert packed is not None and packed.matmul is LinearMatmul.SLUICE_F32
    elif torch.backends.mkldnn.is_available():
        assert packed is not None and packed.matmul is LinearMatmul.ONEDNN
    if packed is not None:
        assert torch.allclose(avx2_ops.packed_linear(x, packed), x @ float_weight.T, atol=1e-5)
    # AVX-512: Sluice's float32 matmul too.
    packed = CompiledCpuOps(module, AVX512_BF16).pack_linear(float_weight, None)
    if module.has_linear_f32():
        assert packed is not None and packed.matmul is LinearMatmul.SLUICE_F32
    # Neither AVX2 nor oneDNN bfloat16: the weight stays as it is, for F.linear.
    assert CompiledCpuOps(module, NO_AVX2).pack_linear(weight, None) is None


def test_without_a_compiler_the_shard_serves_with_the_reference_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-c++")
    monkeypatch.setenv("CXX", missing)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="sluice_server.kernels"):
        kernels = select_kernels("auto", cpu, tmp_path / "cache")
    assert isinstance(kernels.attention, TorchAttentionBackend)
    assert not isinstance(kernels.ops, CompiledCpuOps)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PyTorch reference kernels" in warnings[0]
    assert missing in warnings[0]
    with pytest.raises(KernelBuildError, match=re.escape(f"no C++ compiler: '{missing}' was not")):
        select_kernels("compiled", cpu, tmp_path / "cache")


# The sanitized build compiles for minutes on a small machine the first time.
@pytest.mark.timeout(2400)
def test_kernel_tests_pass_under_address_and_undefined_behaviour_sanitizers() -> None:
    """test_cpu_kernels.py and test_quant.py's quantized matmuls against the native build
    instrumented with ASan and UBSan, in a process that preloads the sanitizer runtime: any
    out-of-bounds access, use after free or undefined behaviour in a kernel, its argument checks
    included, fails the run with a report."""
    preloads = sanitizer_preloads()
    if preloads is None:
        pytest.skip(f"the C++ compiler ({compiler()}) has no AddressSanitizer runtime")
    environment = {
        **os.environ,
        "LD_PRELOAD": " ".join(str(path) for path in preloads),
        # Python and torch keep allocations alive at exit by design; leaks are not the question.
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=1",
        # sluice_server itself, however this process found it.
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    here = Path(__file__).parent
    quantized = (
        "matches_the_dequantized_weight",
        "rows_do_not_depend_on_the_batch",
        "refuses_mismatched_inputs",
        "takes_prompt_rows_through_bfloat16_tiles",
    )
    tests = [
        str(here / "test_cpu_kernels.py"),
        *(f"{here / 'test_quant.py'}::test_quantized_matmul_{name}" for name in quantized),
    ]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=2200"]
    result = subprocess.run(
        [*command, *tests, "--kernel-builds", "native-sanitized"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=2300,
    )
    output = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, output
    assert " passed" in result.stdout and "ERROR: AddressSanitizer" not in output, output
