"""Per-rank memory and step time of the default model split across 1 and 3 shards (its 9
attention heads split no other way).

Starts the real launcher with `--num-shard N` in float32 (each rank's KV cache fixed by
`--kv-cache-memory`, so that the ranks' RSS compare), runs a fixed load through load.py, and
reports per rank: the weights it holds (the shard logs them), its RSS and anonymous RSS after the
load, and the mean step time from /metrics. On a machine with fewer cores than ranks times the
cores one rank would use this measures correctness and memory, not speed: the ranks share the
cores (each takes cores / N threads).

    python benchmark/tensor_parallel.py    # benchmark/results/tensor_parallel.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine
from load_memory import Status
from run_all import BENCH, DEFAULT_MODEL, check_model, run_json, scrape, step_means, write_results
from servers import free_port, running, sluice_spec

WEIGHTS_LINE = re.compile(r"rank (\d+) holds ([\d.]+) MiB of weights")


def log(message: str) -> None:
    print(f"[tensor_parallel {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rank_pids(uds_prefix: str) -> dict[int, int]:
    """rank -> pid of each shard serving on `{uds_prefix}-{rank}`."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for arg in argv:
            if "serve" in argv and arg.startswith(f"{uds_prefix}-"):
                pids[int(arg.rsplit("-", 1)[1])] = int(entry.name)
    return pids


def measure(args: argparse.Namespace, model_dir: Path, world_size: int) -> dict[str, Any]:
    logs = args.results.parent / "logs"
    spec = sluice_spec(model_dir, "float32", logs / f"tp-{world_size}.log", 600)
    # fmt: off
    spec = replace(spec, argv=[
        *spec.argv,
        "--num-shard", str(world_size),
        "--master-port", str(free_port()),
        "--kv-cache-memory", args.kv_cache_memory,
    ])
    # fmt: on
    uds_prefix = spec.argv[spec.argv.index("--shard-uds-path") + 1]
    log(f"starting {world_size} shard(s) (log: {spec.log})")
    with running(spec) as server:
        before = scrape(server.spec.url)
        # fmt: off
        load = run_json(
            [
                sys.executable, str(BENCH / "load.py"),
                "--url", server.spec.url,
                "--route", "completions", "--ignore-eos",
                "--tokenizer", str(model_dir),
                "--concurrency", str(args.concurrency),
                "--requests", str(args.requests),
                "--prompt-tokens", str(args.prompt_tokens),
                "--output-tokens", str(args.output_tokens),
            ],
            1800,
            logs / f"tp-{world_size}-load.log",
        )
        # fmt: on
        steps = step_means(before, scrape(server.spec.url))
        statuses = {rank: Status.read(pid) for rank, pid in rank_pids(uds_prefix).items()}
    weights = {
        int(rank): float(mib) for rank, mib in WEIGHTS_LINE.findall(spec.log.read_text())
    }
    level = load  # load.py prints one JSON line per concurrency level; this runs one
    ranks = [
        {
            "rank": rank,
            "weights_mib": weights.get(rank),
            "rss_bytes": status.rss if status else None,
            "anon_rss_bytes": status.anon if status else None,
        }
        for rank, status in sorted(statuses.items())
    ]
    row = {
        "world_size": world_size,
        "ranks": ranks,
        "step_means": steps,
        "output_tokens_per_s": level["output_tokens_per_s"],
        "errors": level["errors"],
    }
    log(json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a safetensors directory")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 3])
    p.add_argument("--kv-cache-memory", default="256MB", help="each rank's KV cache")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--results", type=Path, default=BENCH / "results" / "tensor_parallel.json")
    a = p.parse_args()
    model_dir = a.model.expanduser().resolve()
    check_model(model_dir)
    rows = [measure(a, model_dir, world_size) for world_size in a.world_sizes]
    results = {
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmark/tensor_parallel.py", *sys.argv[1:]]),
        "machine": asdict(machine.describe(0, 0, "float32")),
        "model": str(model_dir),
        "workload": {
            "concurrency": a.concurrency,
            "requests": a.requests,
            "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens,
            "kv_cache_memory_per_rank": a.kv_cache_memory,
        },
        "world_sizes": rows,
    }
    write_results(a.results, results)
    log(f"wrote {a.results}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
