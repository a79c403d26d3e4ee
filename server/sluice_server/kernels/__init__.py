"""Sluice's compiled CPU kernels (csrc/cpu_kernels.cpp), built once per machine and cached, and
the choice between them and the PyTorch reference (`Kernels`, `select_kernels`).

The kernels are compiled for the CPU they run on (-march=native), so the build directory is keyed
by the source, the torch version and the CPU's model and flags. `sluice-server build-kernels`
(run by `make install`) builds them ahead of time; otherwise the first shard start builds them,
which takes under a minute. Where they cannot be built (no C++ compiler), the shard serves with
the plain PyTorch implementations and says so in its log.
"""

import hashlib
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..layers.attention import AttentionBackend, CompiledCpuAttentionBackend, TorchAttentionBackend
from ..layers.ops import CompiledCpuOps, Ops

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
# -fno-trapping-math lets the compiler vectorise the loops that round (exp's range reduction).
COMPILER_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or imported; the message says why."""


def _cpu_identity() -> str:
    """The CPU model and feature flags, which decide what -march=native emits."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_directory(cache_dir: Path) -> Path:
    key = hashlib.sha256()
    # The source's path too: torch's builder rebuilds when the path it built from changes, so a
    # source tree and an installed copy sharing one directory would rebuild each other's.
    for part in (
        SOURCE.read_bytes(),
        str(SOURCE).encode(),
        torch.__version__.encode(),
        _cpu_identity().encode(),
        " ".join(COMPILER_FLAGS).encode(),
    ):
        key.update(part)
    return cache_dir / key.hexdigest()[:16]


def load_cpu_kernels(cache_dir: Path) -> ModuleType:
    """Imports the kernels, compiling them into `cache_dir` first if this machine has no build."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # torch's builder runs ninja from PATH; the `ninja` wheel puts it beside the interpreter
        # packages rather than on PATH when the venv is not activated.
        try:
            import ninja
        except ImportError as error:
            raise KernelBuildError("ninja is not installed (pip install ninja)") from error
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    directory = build_directory(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name="sluice_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=COMPILER_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as error:
        raise KernelBuildError(f"cannot build the CPU kernels in {directory}: {error}") from error


@dataclass(frozen=True)
class Kernels:
    """What a model runs besides its matmuls: attention and the elementwise layer ops."""

    attention: AttentionBackend
    ops: Ops

    @classmethod
    def reference(cls) -> "Kernels":
        """Plain PyTorch: any device, and the reference the compiled kernels are tested against."""
        return cls(TorchAttentionBackend(), Ops())

    @classmethod
    def compiled_cpu(cls, cache_dir: Path) -> "Kernels":
        module = load_cpu_kernels(cache_dir)
        return cls(CompiledCpuAttentionBackend(module), CompiledCpuOps(module))


def select_kernels(choice: str, device: torch.device, cache_dir: Path) -> Kernels:
    """`compiled` insists on the C++ kernels, `reference` uses PyTorch's operators, and `auto`
    takes the compiled ones on CPU when they build."""
    if choice not in ("auto", "compiled", "reference"):
        raise ValueError(f"unknown kernels {choice!r}: auto, compiled or reference")
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
