"""Compiling the C++ kernels (csrc/) with torch's extension builder, once per machine and
build choice, into a cache directory keyed by everything that decides the binary.

A `KernelBuild` says which instruction sets the compiler may use:

- `native`: this CPU's (`-march=native`), what the shard serves with: AVX-512 and AVX512-BF16
  paths where the CPU has them, AMX's where it has AMX;
- `avx512`: this CPU's without AMX, the paths of AVX-512 CPUs that lack it (AMD's), built and
  tested only on CPUs with AMX (elsewhere it is the native build);
- `avx2`: x86-64-v3 (AVX2, FMA), the path of CPUs without AVX-512, also built and tested on
  CPUs that have it;
- `portable`: baseline x86-64 (SSE2), the kernels' portable loops with no intrinsics;

and, with `sanitize`, instruments the build with AddressSanitizer and UndefinedBehaviorSanitizer
for tests (the process must then preload the sanitizer runtime, see `sanitizer_preloads`).
"""

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .cpu_features import CpuFeatures

SOURCE_DIRECTORY = Path(__file__).parent / "csrc"
# -fno-trapping-math lets the compiler vectorise the loops that round (exp's range reduction).
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
ISA_FLAGS = {
    "native": ["-march=native"],
    "avx512": ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
    "portable": ["-march=x86-64", "-mtune=generic"],
}
SANITIZER_FLAGS = [
    # After COMMON_FLAGS' -O3, which instrumented takes several times longer to compile.
    "-O1",
    "-fsanitize=address,undefined",
    # An undefined behaviour ends the process with a report rather than a line in the log.
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
    "-g",
]


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or imported; the message says why."""


def source_files() -> list[Path]:
    return sorted(p for p in SOURCE_DIRECTORY.iterdir() if p.suffix in (".cpp", ".h"))


@dataclass(frozen=True)
class KernelBuild:
    isa: str = "native"
    sanitize: bool = False

    def __post_init__(self) -> None:
        if self.isa not in ISA_FLAGS:
            raise ValueError(f"unknown kernel ISA {self.isa!r}: {', '.join(ISA_FLAGS)}")

    @property
    def module_name(self) -> str:
        """Distinct per build, so that several builds can be loaded in one process."""
        return f"sluice_cpu_kernels_{self.isa}" + ("_sanitized" if self.sanitize else "")

    @property
    def compiler_flags(self) -> list[str]:
        return COMMON_FLAGS + ISA_FLAGS[self.isa] + (SANITIZER_FLAGS if self.sanitize else [])

    @property
    def linker_flags(self) -> list[str]:
        return ["-fopenmp"] + (SANITIZER_FLAGS[1:] if self.sanitize else [])

    def unrunnable_reason(self, cpu: CpuFeatures) -> str | None:
        """Why this build cannot run on `cpu`, or None if it can."""
        if self.isa == "native":
            return None
        if not cpu.x86_64:
            return f"the {self.isa} kernel build targets x86-64 (this CPU is {cpu.machine})"
        if self.isa == "avx2" and not cpu.avx2:
            return "needs AVX2 and FMA (this CPU lacks them)"
        if self.isa == "avx512" and not (cpu.avx512 and cpu.amx):
            return "the native build, on a CPU without both AVX-512 and AMX"
        return None


def compiler() -> str:
    """The C++ compiler torch's builder runs: $CXX, else c++."""
    return os.environ.get("CXX") or "c++"


def _compiler_library(name: str) -> Path | None:
    try:
        answer = subprocess.run(
            [compiler(), f"-print-file-name={name}"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(answer)
    # Without the library, the compiler echoes the bare name back.
    return path.resolve() if path.is_absolute() and path.exists() else None


def sanitizer_preloads() -> list[Path] | None:
    """What a process loading a sanitized build must preload (LD_PRELOAD), in order: the
    compiler's AddressSanitizer runtime, which must come first, and its C++ runtime, without
    which ASan cannot intercept C++ throws in a program (python) that does not link it and the
    first exception a kernel raises kills the process. None when the compiler has no ASan."""
    asan = _compiler_library("libasan.so")
    cxx_runtime = _compiler_library("libstdc++.so")
    if asan is None:
        return None
    return [asan] + ([cxx_runtime] if cxx_runtime is not None else [])


def _cpu_identity() -> str:
    """The CPU model and feature flags, which decide what -march=native emits."""
    cpu = CpuFeatures.hardware()
    return f"{cpu.machine} {' '.join(sorted(cpu.flags))}"


def build_directory(cache_dir: Path, build: KernelBuild) -> Path:
    key = hashlib.sha256()
    # The sources' paths too: torch's builder rebuilds when the paths it built from change, so a
    # source tree and an installed copy sharing one directory would rebuild each other's.
    for source in source_files():
        key.update(str(source).encode())
        key.update(source.read_bytes())
    for part in (
        torch.__version__,
        _cpu_identity(),
        compiler(),
        " ".join(build.compiler_flags),
        " ".join(build.linker_flags),
    ):
        key.update(part.encode())
    return cache_dir / f"{build.module_name}-{key.hexdigest()[:16]}"


def put_ninja_on_path() -> None:
    if shutil.which("ninja") is not None:
        return
    # torch's builder runs ninja from PATH; the `ninja` wheel puts it beside the interpreter
    # packages rather than on PATH when the venv is not activated.
    try:
        import ninja
    except ImportError as error:
        raise KernelBuildError("ninja is not installed (pip install ninja)") from error
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def load_cpu_kernels(cache_dir: Path, build: KernelBuild | None = None) -> ModuleType:
    """Imports the kernels, compiling them into `cache_dir` first if this machine has no such
    build. KernelBuildError if there is no compiler, the build fails, or it cannot run here."""
    from torch.utils import cpp_extension

    cpu = CpuFeatures.detect()
    build = build or KernelBuild(cpu.kernel_isa)
    reason = build.unrunnable_reason(cpu)
    if reason is not None:
        raise KernelBuildError(f"cannot run the {build.isa} kernel build: {reason}")
    directory = build_directory(cache_dir, build)
    cxx = compiler()
    already_built = (directory / f"{build.module_name}.so").exists()
    if not already_built and shutil.which(cxx) is None:
        raise KernelBuildError(
            f"no C++ compiler: {cxx!r} was not found (install g++, or set CXX to a C++ compiler "
            "with OpenMP)"
        )
    put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=build.module_name,
            sources=[str(p) for p in source_files() if p.suffix == ".cpp"],
            extra_cflags=build.compiler_flags,
            extra_ldflags=build.linker_flags,
            build_directory=str(directory),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as error:
        raise KernelBuildError(f"cannot build the CPU kernels in {directory}: {error}") from error
