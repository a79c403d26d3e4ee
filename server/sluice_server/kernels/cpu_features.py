"""What the CPU this process runs on can do, read once at run time, from which every CPU path is
chosen: the default dtype, which matmul a projection uses, which compiled kernel builds can run
here, and which tests apply.

The instruction sets come from the flags the kernel reports (/proc/cpuinfo). oneDNN's bfloat16
support is asked of oneDNN itself, since it can also be capped below the CPU's
(`ONEDNN_MAX_CPU_ISA`). `SLUICE_MAX_CPU_ISA` caps Sluice's the same way: `avx2` runs the paths
and kernels of a CPU without AVX-512 (x86-64-v3), `portable` those of a plain x86-64; it is read
each time the CPU is detected, not at import.
"""

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch


def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _onednn_supports(dtype: str) -> bool:
    """Whether oneDNN runs `dtype` ("bf16", "fp16") matmuls here (bfloat16: AVX512BW/VL/DQ or
    AVX-NE-CONVERT; float16: AVX512-FP16 or AVX-NE-CONVERT); its weight prepack raises on other
    CPUs."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, f"_is_mkldnn_{dtype}_supported", None)
    return bool(check()) if check is not None else False


MAX_ISA_VARIABLE = "SLUICE_MAX_CPU_ISA"
# What each cap hides, by flag prefix: `avx2` hides AVX-512, AMX and the VEX extensions newer
# than x86-64-v3 (AVX-VNNI, AVX-NE-CONVERT...); `portable` hides AVX, FMA, F16C and BMI too.
HIDDEN_BY_MAX_ISA = {
    "avx2": ("avx512", "amx", "avx_"),
    "portable": ("avx", "amx", "fma", "f16c", "bmi"),
}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's feature flags (as Linux names them) and oneDNN's half-precision support."""

    flags: frozenset[str]
    machine: str
    onednn_bf16: bool
    onednn_fp16: bool = False
    # The SLUICE_MAX_CPU_ISA these flags were capped to, if any.
    max_isa: str | None = None

    @classmethod
    def detect(cls) -> "CpuFeatures":
        """This CPU, capped by SLUICE_MAX_CPU_ISA where it is set."""
        return cls.hardware().capped(os.environ.get(MAX_ISA_VARIABLE) or None)

    @classmethod
    def hardware(cls) -> "CpuFeatures":
        """This CPU, uncapped."""
        return cls(
            _cpuinfo_flags(),
            platform.machine().lower(),
            _onednn_supports("bf16"),
            _onednn_supports("fp16"),
        )

    def capped(self, max_isa: str | None) -> "CpuFeatures":
        """These features with the flags `max_isa` hides removed (None: unchanged). oneDNN's
        half-precision matmuls need AVX-512 or AVX-NE-CONVERT, which every cap hides."""
        if max_isa is None:
            return self
        if max_isa not in HIDDEN_BY_MAX_ISA:
            raise ValueError(
                f"{MAX_ISA_VARIABLE} must be one of {', '.join(HIDDEN_BY_MAX_ISA)}, got {max_isa!r}"
            )
        hidden = HIDDEN_BY_MAX_ISA[max_isa]
        flags = frozenset(f for f in self.flags if not f.startswith(hidden))
        return replace(self, flags=flags, onednn_bf16=False, onednn_fp16=False, max_isa=max_isa)

    @property
    def kernel_isa(self) -> str:
        """The compiled kernels' build for these features (`KernelBuild.isa`): the CPU's own
        (`native`) unless capped, else the cap's, where the CPU has it."""
        if self.max_isa is None:
            return "native"
        return "avx2" if self.avx2 else "portable"

    @property
    def x86_64(self) -> bool:
        return self.machine in ("x86_64", "amd64")

    @property
    def avx2(self) -> bool:
        """AVX2 with FMA: the x86-64-v3 level the `avx2` kernel build targets."""
        return {"avx2", "fma", "f16c", "bmi2"} <= self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        """AMX's tiles with bfloat16 and int8 multiplies, which the native kernel build uses."""
        return {"amx_tile", "amx_bf16", "amx_int8"} <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AVX512-BF16 or AMX)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def sluice_bf16_matmul(self) -> bool:
        """Whether bfloat16 projections take Sluice's own matmul (in the compiled kernels): with
        AVX512-BF16, and on AVX2 CPUs without AVX-512, where oneDNN has no bfloat16 and Sluice's
        (bfloat16 weights widened in registers, float32 FMAs, half the bytes of float32 weights
        to read per step) is measured faster than oneDNN's float32. On AVX-512 CPUs without
        BF16, oneDNN's bfloat16 stays in charge: the two were not compared there."""
        return self.avx512_bf16 or (self.avx2 and not self.avx512)

    @property
    def sluice_f32_matmul(self) -> bool:
        """Whether float32 projections take Sluice's own matmul (in the compiled kernels): on
        every CPU with AVX2, AVX-512 ones included, where it is measured faster than oneDNN's
        float32 at the row counts of decoding and on par on prompt chunks
        (benchmark/linear_kernel.py --dtype float32)."""
        return self.avx2

    def fast_bf16(self, compiled_kernels: bool) -> bool:
        """Whether bfloat16 serves faster than float32 here: where the CPU computes in it
        natively, and where the compiled kernels bring Sluice's bfloat16 matmul. Elsewhere
        bfloat16 is emulated, slower than float32."""
        return self.native_bf16 or (compiled_kernels and self.sluice_bf16_matmul)

    def default_dtype_name(self, compiled_kernels: bool) -> str:
        """bfloat16 where it is the faster (`fast_bf16`), float32 elsewhere."""
        return "bfloat16" if self.fast_bf16(compiled_kernels) else "float32"

    def bf16_slow_path_note(self, compiled_kernels: bool) -> str | None:
        """What a user choosing bfloat16 here should know, or None where it is the faster."""
        if self.fast_bf16(compiled_kernels):
            return None
        lacking = (
            "Sluice's compiled kernels"
            if self.sluice_bf16_matmul
            else "AVX512-BF16, AMX, or AVX2 on a CPU without AVX-512"
        )
        matmul = (
            "oneDNN's bfloat16 matmul (emulated)"
            if self.onednn_bf16
            else "PyTorch's generic bfloat16 matmul (oneDNN has none for this CPU)"
        )
        return (
            f"bfloat16 without {lacking} is emulated: projections run through {matmul}, "
            "slower than float32, which is the default here (--dtype auto)"
        )


def lacks(feature: str) -> str:
    """The skip reason of a test that needs `feature`, which this CPU lacks."""
    return f"needs {feature} (this CPU lacks it)"
