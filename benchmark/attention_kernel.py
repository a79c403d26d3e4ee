"""The compiled CPU paged-attention kernel alone, on a decode batch (or prompt chunks), per layer,
and write_kv writing the step's new keys and values into the same blocks.

Three block layouts: `hot` (every sequence reads the same blocks, so they stay in the caches: the
arithmetic alone), `contiguous` (each sequence's blocks in a run, a fresh region per call) and
`scattered` (random blocks), in caches the engine's allocator makes (advised for huge pages). With
`--against REV`, the kernel source at that git revision is built too and both are timed interleaved
in this process, which is the only comparison a noisy machine allows (memory-bound timings drift by
tens of percent from minute to minute). `--isa avx2` builds both without AVX-512, as on CPUs that
lack it; `--dtype float32` times the cache dtype of such CPUs. `--sliding-window` and `--softcap`
attend as a layer with those does (a build from before the kernel had them attends the whole
context, uncapped). `--query-tokens N` gives every sequence a prompt chunk of N rows that ends its
context, as a prefill step runs it. `--cache-dtypes model fp8_e4m3fn` times each build on a cache in
each dtype (`model`: the rows' dtype), interleaved in the same way.

    python benchmark/attention_kernel.py --against HEAD~1
    python benchmark/attention_kernel.py --batch 1 --context 2048 --query-tokens 2048 --calls 2
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

from sluice_server.engine.kv_cache import KV_CACHE_DTYPES, KVCacheSpec
from sluice_server.kernels import KernelBuild, load_cpu_kernels
from sluice_server.kernels.build import ISA_FLAGS, SOURCE_DIRECTORY


def build_at_revision(revision: str, work: Path, build: KernelBuild) -> ModuleType:
    """The kernel sources as they were at `revision` (one file or several), built like `build`."""
    from torch.utils.cpp_extension import load

    directory = SOURCE_DIRECTORY.relative_to(REPO).as_posix()
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", f"{revision}:{directory}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{revision}:{directory}/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (work / name).write_text(text)
    return load(
        name="sluice_cpu_kernels_baseline",
        sources=[str(work / name) for name in names if name.endswith(".cpp")],
        extra_cflags=build.compiler_flags,
        extra_ldflags=build.linker_flags,
        build_directory=str(work),
    )


def engine_cache(
    keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`keys` and `values` in a cache the engine's allocator made (in huge pages where Linux gives
    them: with 4 KiB pages, blocks read wherever they lie cost a TLB miss each)."""
    num_kv_heads, num_blocks, head_dim, block_size = keys.shape
    spec = KVCacheSpec(1, block_size, num_kv_heads, head_dim, dtype, torch.device("cpu"), True)
    (layer,) = spec.allocate(num_blocks)
    return layer.key.copy_(keys), layer.value.copy_(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument(
        "--query-tokens",
        type=int,
        default=1,
        help="query rows per sequence: 1 is a decode, more a prompt chunk that ends the context",
    )
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=60, help="kernel calls per timing")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--against", help="also time the kernel source at this git revision")
    parser.add_argument(
        "--isa",
        choices=list(ISA_FLAGS),
        default="native",
        help="the instruction sets both builds may use (avx512: as on CPUs without AMX; avx2: as "
        "on CPUs without AVX-512)",
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--cache-dtypes",
        nargs="+",
        choices=["model", *KV_CACHE_DTYPES],
        default=["model"],
        help="the KV cache's dtypes to time (model: the query's dtype)",
    )
    parser.add_argument(
        "--sliding-window", type=int, default=0, help="positions each query sees (0: all)"
    )
    parser.add_argument(
        "--softcap", type=float, default=0.0, help="the attention logit soft cap (0: none)"
    )
    args = parser.parse_args()
    if not 1 <= args.query_tokens <= args.context:
        parser.error("--query-tokens must be between 1 and --context")

    build = KernelBuild(args.isa)
    kernels = {"current": load_cpu_kernels(Path.home() / ".cache" / "sluice" / "kernels", build)}
    if args.against:
        work = Path(tempfile.mkdtemp(prefix="sluice-attention-"))
        kernels[args.against] = build_at_revision(args.against, work, build)

    batch, block_size = args.batch, args.block_size
    blocks_each = -(-args.context // block_size)
    num_blocks = 16000  # About 100 MB per cache tensor: far more than the last-level cache.
    dtype = getattr(torch, args.dtype)
    keys = torch.randn(args.kv_heads, num_blocks, args.head_dim, block_size).to(dtype)
    values = torch.randn(args.kv_heads, num_blocks, block_size, args.head_dim).to(dtype)
    caches = {
        name: engine_cache(keys, values, KV_CACHE_DTYPES.get(name, dtype))
        for name in args.cache_dtypes
    }
    # Each build on each cache, labelled by the build (and the cache's dtype where several).
    variants = [
        (build_name + (f" {cache_name}" if len(caches) > 1 else ""), module, *cache)
        for build_name, module in kernels.items()
        for cache_name, cache in caches.items()
    ]
    rows = args.query_tokens
    query = torch.randn(batch * rows, args.heads, args.head_dim).to(dtype)
    cache_lens = torch.full((batch,), args.context - rows, dtype=torch.int32)
    query_starts = torch.arange(batch + 1, dtype=torch.int32) * rows
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

    def window_and_cap(module: ModuleType) -> dict[str, float]:
        if "sliding_window" not in (module.paged_attention.__doc__ or ""):
            return {}  # A build from before the kernel had them.
        return {"sliding_window": args.sliding_window, "logit_softcap": args.softcap}

    # The step's new tokens (the query rows: the last positions of each context), written by
    # write_kv into their slots of the same blocks before attention reads them, as a layer does.
    new_keys = torch.randn(batch * rows, args.kv_heads, args.head_dim).to(dtype)
    new_values = torch.randn(batch * rows, args.kv_heads, args.head_dim).to(dtype)
    positions = range(args.context - rows, args.context)

    def slots(sequence_tables: list[list[int]]) -> torch.Tensor:
        return torch.tensor(
            [
                table[position // block_size] * block_size + position % block_size
                for table in sequence_tables
                for position in positions
            ],
            dtype=torch.long,
        )

    timings: dict[tuple[str, str], list[float]] = {}
    write_timings: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        # Each round in the other order: the first build of a layout also fetches its blocks.
        order = variants[:: -1 if round_index % 2 else 1]
        for layout in ("hot", "contiguous", "scattered"):
            layout_tables = [tables(layout, c) for c in range(args.calls)]
            calls = [torch.tensor(table, dtype=torch.int32) for table in layout_tables]
            write_slots = [slots(table) for table in layout_tables]
            for name, module, cache_keys, cache_values in order:
                start = time.perf_counter()
                for call_slots in write_slots:
                    module.write_kv(cache_keys, cache_values, new_keys, new_values, call_slots)
                elapsed_us = (time.perf_counter() - start) / len(write_slots) * 1e6
                write_timings.setdefault((name, layout), []).append(elapsed_us)
                options = window_and_cap(module)
                start = time.perf_counter()
                for block_tables in calls:
                    module.paged_attention(
                        query,
                        cache_keys,
                        cache_values,
                        block_tables,
                        cache_lens,
                        query_starts,
                        args.head_dim**-0.5,
                        **options,
                    )
                elapsed_ms = (time.perf_counter() - start) / len(calls) * 1e3
                timings.setdefault((name, layout), []).append(elapsed_ms)
    # In the model's dtype.
    kv_megabytes = batch * args.kv_heads * args.context * args.head_dim * 2 * dtype.itemsize / 1e6
    # Each query row scores the keys up to its own position and adds as many value rows: two
    # multiply-adds per dimension and key.
    keys_seen = batch * (rows * (args.context - rows) + rows * (rows + 1) // 2)
    flops = 4 * args.head_dim * args.heads * keys_seen
    print(
        json.dumps(
            {
                "shape": vars(args) | {"kv_megabytes_per_layer": round(kv_megabytes, 2)},
                "ms_per_layer_median": {
                    f"{name} {layout}": round(statistics.median(values), 4)
                    for (name, layout), values in timings.items()
                },
                "gflops_median": {
                    f"{name} {layout}": round(flops / statistics.median(values) / 1e6, 1)
                    for (name, layout), values in timings.items()
                },
                "write_kv_us_per_layer_median": {
                    f"{name} {layout}": round(statistics.median(values), 1)
                    for (name, layout), values in write_timings.items()
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
