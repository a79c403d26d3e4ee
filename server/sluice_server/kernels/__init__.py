"""Sluice's compiled CPU kernels (csrc/: attention, linear, elementwise), its GPU kernels for
quantized weights (triton_quantized.py), and the choice between them and the PyTorch reference
(`Kernels`, `select_kernels`).

The kernels are compiled for the CPU they run on (see `build`), cached by their sources, the
torch version, the CPU's flags, the compiler and its flags. `sluice-server build-kernels` (run by
`make install`) builds them ahead of time; otherwise the first shard start builds them, which
takes about a minute. Where they cannot be built (no C++ compiler), the shard serves with the
plain PyTorch implementations and says so in its log.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..layers.attention import AttentionBackend, CompiledCpuAttentionBackend, TorchAttentionBackend
from ..layers.ops import CompiledCpuOps, CudaOps, Ops
from .build import KernelBuild, KernelBuildError, load_cpu_kernels
from .cpu_features import CpuFeatures

__all__ = [
    "CpuFeatures",
    "KernelBuild",
    "KernelBuildError",
    "Kernels",
    "load_cpu_kernels",
    "select_kernels",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """What a model runs besides its matmuls: attention and the elementwise layer ops (which
    also pack the projections' weights for the CPU's best matmul)."""

    attention: AttentionBackend
    ops: Ops

    @property
    def compiled(self) -> bool:
        """Whether these are Sluice's compiled CPU kernels (else the PyTorch reference)."""
        return isinstance(self.ops, CompiledCpuOps)

    def describe(self) -> str:
        """The backends' names, and the compiled build's (which says what it was built for)."""
        names = f"{type(self.attention).__name__}, {type(self.ops).__name__}"
        if isinstance(self.ops, CompiledCpuOps):
            return f"{names} ({self.ops.kernels.__name__})"
        return names

    @classmethod
    def reference(cls, cpu: CpuFeatures | None = None) -> "Kernels":
        """Plain PyTorch: any device, and the reference the compiled kernels are tested against."""
        return cls(TorchAttentionBackend(), Ops(cpu or CpuFeatures.detect()))

    @classmethod
    def cuda(cls, cpu: CpuFeatures | None = None) -> "Kernels":
        """The reference, but quantized projections multiplied by the GPU kernels (Triton's and
        the FP8 matmul) rather than dequantized on every call."""
        return cls(TorchAttentionBackend(), CudaOps(cpu or CpuFeatures.detect()))

    @classmethod
    def compiled_cpu(
        cls, cache_dir: Path, build: KernelBuild | None = None, cpu: CpuFeatures | None = None
    ) -> "Kernels":
        module = load_cpu_kernels(cache_dir, build)
        return cls(
            CompiledCpuAttentionBackend(module), CompiledCpuOps(module, cpu or CpuFeatures.detect())
        )


def select_kernels(choice: str, device: torch.device, cache_dir: Path) -> Kernels:
    """`compiled` insists on the C++ kernels, `reference` uses PyTorch's operators, and `auto`
    takes the compiled ones on CPU when they build, the GPU kernels on CUDA when Triton
    imports."""
    if choice not in ("auto", "compiled", "reference"):
        raise ValueError(f"unknown kernels {choice!r}: auto, compiled or reference")
    if choice == "auto" and device.type == "cuda":
        try:
            return Kernels.cuda()
        except ImportError as error:
            logger.warning(
                "%s; quantized projections dequantize their weights on every call", error
            )
            return Kernels.reference()
    if choice == "reference" or (choice == "auto" and device.type != "cpu"):
        return Kernels.reference()
    if device.type != "cpu":
        raise KernelBuildError(f"the compiled kernels run on CPU only, not on {device}")
    try:
        return Kernels.compiled_cpu(cache_dir)
    except KernelBuildError as error:
        if choice == "compiled":
            raise
        logger.warning("%s; serving with the PyTorch reference kernels, which are slower", error)
        return Kernels.reference()
