"""The machine a benchmark ran on, and the bf16 matmul peak it reaches with torch.

Prints one JSON object: CPU model, cores, memory, the CPU flags that decide bf16 speed,
torch's version and thread count, vLLM's version (from the peer venv, without importing it),
and the best GFLOP/s of a large square `torch.matmul` in bfloat16.

    python benchmark/machine.py --matmul-size 4096
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
class Machine:
    cpu_model: str
    logical_cpus: int
    usable_cpus: int
    memory_gib: float
    cpu_flags: dict[str, bool]
    kernel: str
    python: str
    torch: str
    torch_threads: int
    vllm: str
    matmul: MatmulPeak | None


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


def vllm_venv(script: Path = VLLM_SCRIPT) -> Path | None:
    """The peer's venv, found the way the peer script finds it."""
    version = os.environ.get("VLLM_CPU_VERSION")
    if version is None and script.exists():
        match = re.search(r'VLLM_CPU_VERSION:-([^}"]+)', script.read_text())
        version = match.group(1) if match else None
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


def describe(size: int, runs: int, dtype_name: str) -> Machine:
    import torch

    model, flags = cpuinfo()
    return Machine(
        cpu_model=model,
        logical_cpus=os.cpu_count() or 0,
        usable_cpus=len(os.sched_getaffinity(0)),
        memory_gib=memory_gib(),
        cpu_flags={flag: flag in flags for flag in FLAGS_OF_INTEREST},
        kernel=platform.release(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        vllm=vllm_version(),
        matmul=matmul_peak(size, runs, dtype_name) if size > 0 else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matmul-size", type=int, default=4096, help="0 skips the matmul")
    parser.add_argument("--matmul-runs", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", help="the matmul's dtype")
    args = parser.parse_args()
    print(json.dumps(asdict(describe(args.matmul_size, args.matmul_runs, args.dtype))))


if __name__ == "__main__":
    main()
