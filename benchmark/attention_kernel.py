"""The compiled CPU paged-attention kernel alone, on a decode batch, per layer.

Three block layouts: `hot` (every sequence reads the same blocks, so they stay in the caches:
the arithmetic alone), `contiguous` (each sequence's blocks in a run, a fresh region per call)
and `scattered` (random blocks). With `--against REV`, the kernel source at that git revision is
built too and both are timed interleaved in this process, which is the only comparison a noisy
machine allows (memory-bound timings drift by tens of percent from minute to minute).

    python benchmark/attention_kernel.py --against HEAD~1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "server"))

from sluice_server.kernels import COMPILER_FLAGS, SOURCE, load_cpu_kernels


def build_at_revision(revision: str, work: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    source = SOURCE.relative_to(REPO).as_posix()
    text = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:{source}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (work / "kernels.cpp").write_text(text)
    return load(
        name="sluice_cpu_kernels_baseline",
        sources=[str(work / "kernels.cpp")],
        extra_cflags=COMPILER_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(work),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=60, help="kernel calls per timing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--against", help="also time the kernel source at this git revision")
    args = parser.parse_args()

    kernels = {"current": load_cpu_kernels(Path.home() / ".cache" / "sluice" / "kernels")}
    if args.against:
        work = Path(tempfile.mkdtemp(prefix="sluice-attention-"))
        kernels[args.against] = build_at_revision(args.against, work)

    batch, block_size = args.batch, args.block_size
    blocks_each = -(-args.context // block_size)
    num_blocks = 16000  # About 100 MB per cache tensor: far more than the last-level cache.
    keys = torch.randn(args.kv_heads, num_blocks, args.head_dim, block_size).bfloat16()
    values = torch.randn(args.kv_heads, num_blocks, block_size, args.head_dim).bfloat16()
    query = torch.randn(batch, args.heads, args.head_dim).bfloat16()
    cache_lens = torch.full((batch,), args.context - 1, dtype=torch.int32)
    query_starts = torch.arange(batch + 1, dtype=torch.int32)
    rng = random.Random(0)

    def tables(layout: str, call: int) -> list[list[int]]:
        if layout == "hot":
            return [list(range(blocks_each)) for _ in range(batch)]
        if layout == "contiguous":
            base = call * batch * blocks_each
            return [
                [(base + s * blocks_each + b) % num_blocks for b in range(blocks_each)]
                for s in range(batch)
            ]
        return [[rng.randrange(num_blocks) for _ in range(blocks_each)] for _ in range(batch)]

    timings: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for layout in ("hot", "contiguous", "scattered"):
            calls = [torch.tensor(tables(layout, c), dtype=torch.int32) for c in range(args.calls)]
            for name, module in kernels.items():
                start = time.perf_counter()
                for block_tables in calls:
                    module.paged_attention(
                        query,
                        keys,
                        values,
                        block_tables,
                        cache_lens,
                        query_starts,
                        args.head_dim**-0.5,
                    )
                elapsed_ms = (time.perf_counter() - start) / len(calls) * 1e3
                timings.setdefault((name, layout), []).append(elapsed_ms)
    kv_megabytes = batch * args.kv_heads * args.context * args.head_dim * 2 * 2 / 1e6
    print(
        json.dumps(
            {
                "shape": vars(args) | {"kv_megabytes_per_layer": round(kv_megabytes, 2)},
                "ms_per_layer_median": {
                    f"{name} {layout}": round(statistics.median(values), 4)
                    for (name, layout), values in timings.items()
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
