"""Overlapped steps against steps one after another: Sluice served with `--overlap-steps true`
and with `--overlap-steps false`, taking turns round after round in one run, on run_all.py's
workloads (its options choose them: `--concurrency`, `--workloads`, `--rounds`, ...).

Per level: the client's throughput, TTFT and inter-token latency, and the step-time breakdown.
The shard's forward and its whole step are the means from Sluice's /metrics; the wall time per
step is the level's duration over its steps, and the gap is what that leaves beyond the shard's
step: the time the shard waits for the router, which overlapping is meant to hide.

    python benchmark/overlap.py --rounds 2 --concurrency 1 8 32 --workloads long
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import run_all
from machine import cpuinfo

BENCH = Path(__file__).resolve().parent
MODES = {"overlapped": "true", "one after another": "false"}


def breakdown(level: dict[str, Any]) -> dict[str, float | None]:
    """Milliseconds per step: the shard's forward and step, the wall time, and the gap."""
    means = level.get("step_means") or {}
    steps = means.get("steps") or 0
    shard_step = means.get("shard_step_s")
    wall = level["duration_s"] / steps if steps else None
    return {
        "forward_ms": means["shard_forward_s"] * 1e3 if means.get("shard_forward_s") else None,
        "shard_step_ms": shard_step * 1e3 if shard_step else None,
        "wall_per_step_ms": wall * 1e3 if wall else None,
        "gap_ms": (wall - shard_step) * 1e3 if wall and shard_step else None,
        "steps": steps,
    }


def measure_with(
    settings: run_all.Settings, label: str, flags: list[str], log_name: str
) -> dict[str, Any]:
    """Sluice started with `flags` added, through every level, each level's breakdown added."""
    spec = run_all.sluice_spec(settings)
    spec = dataclasses.replace(
        spec,
        name=f"sluice ({label})",
        argv=[*spec.argv, *flags],
        log=settings.logs / log_name,
    )
    result = run_all.benchmark_server(settings, spec, scrape_metrics=True)
    for level in result["levels"]:
        level["breakdown"] = breakdown(level)
    return result


def measure(settings: run_all.Settings, mode: str) -> dict[str, Any]:
    value = MODES[mode]
    return measure_with(
        settings, mode, ["--overlap-steps", value], f"sluice-overlap-{value}.log"
    )


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    header = (
        "| workload | c | steps | output tok/s | TTFT p95 ms | ITL p50 ms | forward ms | shard step ms "
        "| wall per step ms | gap ms |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    first = next(iter(results.values()))
    for index, level in enumerate(first[0]["levels"]):
        for mode, rounds in results.items():
            levels = [r["levels"][index] for r in rounds]
            cell = {
                key: median([lv["breakdown"][key] for lv in levels])
                for key in ("forward_ms", "shard_step_ms", "wall_per_step_ms", "gap_ms")
            }
            rows.append(
                f"| {level['workload']} | {level['concurrency']} | {mode} "
                f"| {median([lv['output_tokens_per_s'] for lv in levels]):.1f} "
                f"| {median([lv['ttft_p95_s'] for lv in levels]) * 1e3:.0f} "
                f"| {median([lv['itl_p50_s'] for lv in levels]) * 1e3:.1f} "
                + " ".join(f"| {v:.2f}" if v is not None else "| n/a" for v in cell.values())
                + " |"
            )
    return header + "\n".join(rows) + "\n"


def save(
    path: Path,
    script: str,
    settings: run_all.Settings,
    report: str,
    results: dict[str, list[dict[str, Any]]],
) -> None:
    """The command, the machine, the rendered table and every round, as JSON at `path`."""
    summary = {
        "command": " ".join(["python", f"benchmark/{script}", *sys.argv[1:]]),
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "sluice_dtype": settings.sluice_dtype,
        "cpu": f"{os.cpu_count()} × {cpuinfo()[0]}",
        "rounds_run": settings.rounds,
        "table": report,
        "rounds": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--results", type=Path, default=BENCH / "results" / "overlap.json")
    ours, rest = parser.parse_known_args()
    settings = run_all.parse_args(
        [*rest, "--skip-vllm", "--skip-llama", "--skip-baseline", "--skip-profile"]
    )
    settings.logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for number in range(1, settings.rounds + 1):
        run_all.log(f"=== round {number} of {settings.rounds}")
        for mode in MODES:
            results[mode].append(measure(settings, mode))
    report = table(results)
    print(report)
    save(ours.results, "overlap.py", settings, report, results)
    run_all.log(f"wrote {ours.results}; `python benchmark/report.py` puts it in the docs")


if __name__ == "__main__":
    main()
