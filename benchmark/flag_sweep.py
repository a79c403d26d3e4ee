"""One launcher flag at several values: Sluice served with each, taking turns round after round
in one run, on run_all.py's workloads (its options choose them: `--concurrency`, `--workloads`,
`--rounds`, ...). The table is overlap.py's: throughput, TTFT p95, ITL p50 and the step-time
breakdown from Sluice's /metrics, with ITL p95 and the longest ITL added.

    python benchmark/flag_sweep.py --flag max-batch-prefill-tokens --values 1074 2098 4146 \\
        --concurrency 32 --workloads long longest --rounds 2 \\
        --results benchmark/results/prefill-budget.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import run_all
from overlap import measure_with, median, save, table


def itl_table(results: dict[str, list[dict[str, Any]]], key: str) -> str:
    """ITL ms per level and value (medians over rounds) of the level's `key`: what a bigger
    step costs the requests that decode through it."""
    labels = list(results)
    header = "| workload | c | " + " | ".join(labels) + " |\n"
    header += "|---|---|" + "---|" * len(labels) + "\n"
    rows = []
    for index, level in enumerate(next(iter(results.values()))[0]["levels"]):
        cells = [
            median([r["levels"][index][key] for r in rounds]) * 1e3 for rounds in results.values()
        ]
        rows.append(
            f"| {level['workload']} | {level['concurrency']} | "
            + " | ".join(f"{c:.1f}" for c in cells)
            + " |"
        )
    return header + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--flag", required=True, help="a launcher flag, without its dashes")
    parser.add_argument("--values", nargs="+", required=True)
    parser.add_argument("--results", type=Path, required=True)
    ours, rest = parser.parse_known_args()
    settings = run_all.parse_args(
        [*rest, "--skip-vllm", "--skip-llama", "--skip-baseline", "--skip-profile"]
    )
    settings.logs.mkdir(parents=True, exist_ok=True)
    flag = f"--{ours.flag}"
    results: dict[str, list[dict[str, Any]]] = {f"{flag} {v}": [] for v in ours.values}
    for number in range(1, settings.rounds + 1):
        run_all.log(f"=== round {number} of {settings.rounds}")
        for value in ours.values:
            label, log_name = f"{flag} {value}", f"sluice-{ours.flag}-{value}.log"
            results[label].append(measure_with(settings, label, [flag, value], log_name))
    report = (
        table(results)
        + "\nITL p95 ms:\n\n"
        + itl_table(results, "itl_p95_s")
        + "\nLongest ITL ms (any request's longest wait between two tokens):\n\n"
        + itl_table(results, "itl_max_s")
    )
    print(report)
    save(ours.results, "flag_sweep.py", settings, report, results)
    run_all.log(f"wrote {ours.results}")


if __name__ == "__main__":
    main()
