"""The machine a benchmark ran on: its matmul peak and its memory bandwidth, measured with torch.

Prints one JSON object: CPU model, cores, memory, the CPU flags that decide bf16 speed, the
variables set to cap the instruction sets below the CPU's, torch's version and thread count,
vLLM's version (from the peer venv, without importing it), the instruction sets llama.cpp's
server was built for,
the best GFLOP/s of a large square `torch.matmul` in bfloat16, and the memory bandwidth in the
manner of STREAM: the best of several passes over float32 arrays far larger than the caches,
with every thread, for four kernels: read (a sum: what decoding one request does to the
weights), copy (a = b), scale (a = s b) and triad (a = b + s c). Bytes are counted as STREAM
counts them: each array read or written once per pass.

    python benchmark/machine.py --matmul-size 4096 --bandwidth-mib 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_SCRIPT = REPO.parent / "shared" / "peers" / "vllm-cpu.sh"
LLAMA_SCRIPT = REPO.parent / "shared" / "peers" / "llama-server.sh"
# Each caps the instruction sets one part uses below the CPU's (to run, on a CPU with AVX-512,
# the paths a CPU without it takes): Sluice's CPU paths and kernels, PyTorch's ATen operators,
# oneDNN and MKL. The servers inherit them.
ISA_CAP_VARIABLES = (
    "SLUICE_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)
# llama.cpp's build options that choose its x86 instruction sets.
LLAMA_ISA_OPTIONS = ("GGML_NATIVE", "GGML_AVX2", "GGML_AVX512", "GGML_AVX512_BF16")
# The flags that decide which bf16 kernels oneDNN can use.
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class MatmulPeak:
    dtype: str
    size: int
    runs: int
    best_s: float
    gflops: float


@dataclass
class Bandwidth:
    array_mib: int
    runs: int
    read_gb_s: float
    copy_gb_s: float
    scale_gb_s: float
    triad_gb_s: float


@dataclass
class Machine:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    memory_gib: float
    cpu_flags: dict[str, bool]
    isa_caps: dict[str, str]
    kernel: str
    python: str
    torch: str
    torch_threads: int
    vllm: str
    llama_build: dict[str, str]
    matmul: MatmulPeak | None
    bandwidth: Bandwidth | None


def cpuinfo() -> tuple[str, set[str]]:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    return (
        model.group(1).strip() if model else platform.processor() or "unknown",
        set(flags.group(1).split()) if flags else set(),
    )


def memory_gib() -> float:
    match = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else float("nan")


def peer_version(script: Path, variable: str) -> str | None:
    """The version a peer script installs: `variable` where set, else the script's default."""
    version = os.environ.get(variable)
    if version is None and script.exists():
        match = re.search(rf'{variable}:-([^}}"]+)', script.read_text())
        version = match.group(1) if match else None
    return version


def vllm_venv(script: Path = VLLM_SCRIPT) -> Path | None:
    """The peer's venv, found the way the peer script finds it."""
    version = peer_version(script, "VLLM_CPU_VERSION")
    if version is None:
        return None
    home = os.environ.get("VLLM_PEER_HOME") or str(
        Path.home() / ".cache" / "sluice-peers" / f"vllm-cpu-{version}"
    )
    venv = Path(home) / "venv"
    return venv if (venv / "bin" / "python").exists() else None


def vllm_version(script: Path = VLLM_SCRIPT) -> str:
    venv = vllm_venv(script)
    if venv is None:
        return "not installed"
    # importlib.metadata reads the dist-info only; importing vllm itself takes seconds.
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    try:
        out = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        return f"unknown ({type(e).__name__})"


def isa_caps() -> dict[str, str]:
    return {name: os.environ[name] for name in ISA_CAP_VARIABLES if os.environ.get(name)}


def llama_build(script: Path = LLAMA_SCRIPT) -> dict[str, str]:
    """The instruction-set options the peer's llama-server was configured with (its CMake cache,
    found the way the peer script finds its build); empty if it is not built."""
    version = peer_version(script, "LLAMA_CPP_PYTHON_VERSION")
    home = os.environ.get("LLAMA_PEER_HOME") or str(
        Path.home() / ".cache" / "sluice-peers" / f"llama-server-{version}"
    )
    try:
        cache = (Path(home) / "build" / "CMakeCache.txt").read_text()
    except OSError:
        return {}
    options = {}
    for name in LLAMA_ISA_OPTIONS:
        match = re.search(rf"^{name}:BOOL=(\w+)$", cache, re.MULTILINE)
        if match:
            options[name] = match.group(1)
    return options


def matmul_peak(size: int, runs: int, dtype_name: str = "bfloat16") -> MatmulPeak:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # the first call picks and JITs the oneDNN kernel
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return MatmulPeak(dtype_name, size, runs, round(best, 4), round(2 * size**3 / best / 1e9, 1))


def bandwidth(array_mib: int, runs: int) -> Bandwidth:
    import torch

    n = array_mib * 2**20 // 4
    a, b, c = (torch.ones(n, dtype=torch.float32) for _ in range(3))
    scalar = 3.0
    # (name, arrays touched per pass, the pass)
    kernels = {
        "read": (1, lambda: b.sum()),
        "copy": (2, lambda: a.copy_(b)),
        "scale": (2, lambda: torch.mul(b, scalar, out=a)),
        "triad": (3, lambda: torch.add(b, c, alpha=scalar, out=a)),
    }
    rates = {}
    for name, (arrays, kernel) in kernels.items():
        kernel()  # the first pass faults the pages in
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - start)
        rates[f"{name}_gb_s"] = round(arrays * n * 4 / best / 1e9, 1)
    return Bandwidth(array_mib, runs, **rates)


def describe(size: int, runs: int, dtype_name: str, array_mib: int = 0) -> Machine:
    import torch

    model, flags = cpuinfo()
    return Machine(
        cpu_model=model,
        logical_cpus=os.cpu_count() or 0,
        usable_cpus=len(os.sched_getaffinity(0)),
        memory_gib=memory_gib(),
        cpu_flags={flag: flag in flags for flag in FLAGS_OF_INTEREST},
        isa_caps=isa_caps(),
        kernel=platform.release(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        vllm=vllm_version(),
        llama_build=llama_build(),
        matmul=matmul_peak(size, runs, dtype_name) if size > 0 else None,
        bandwidth=bandwidth(array_mib, 10) if array_mib > 0 else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matmul-size", type=int, default=4096, help="0 skips the matmul")
    parser.add_argument("--matmul-runs", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="the matmul's dtype")
    parser.add_argument(
        "--bandwidth-mib",
        type=int,
        default=512,
        help="MiB per array of the bandwidth passes (far above the caches); 0 skips them",
    )
    args = parser.parse_args()
    machine = describe(args.matmul_size, args.matmul_runs, args.dtype, args.bandwidth_mib)
    print(json.dumps(asdict(machine)))


if __name__ == "__main__":
    main()
