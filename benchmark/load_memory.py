"""The shard's memory while it loads the model, against the size of the weights.

Starts the real launcher once per dtype and follows its shard (`sluice-server serve`) from the
moment it exists: its /proc status is sampled every `--period` seconds (anonymous and
file-backed RSS apart), and when the shard logs that it serves, its VmHWM is read, the kernel's
own peak RSS, which no sampling interval can miss. The KV cache is allocated later, at the
router's Warmup, so everything up to that line is the process's runtime (Python, torch, the
kernels) plus the weights. The RSS when the shard logs that it starts loading is that runtime
alone; the peak minus it is what loading cost.

    python benchmark/load_memory.py    # float32 and bfloat16: benchmark/results/load_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine
from run_all import BENCH, DEFAULT_MODEL, check_model, model_size, write_results
from servers import ServerSpec, running, sluice_spec

DTYPES = ("float32", "bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# What the shard logs (sluice_server.cli) before it reads the first weight, and once it serves.
LOADING_LINE = "sluice_server: loading "
READY_LINE = "sluice_server: Server ready on "
KIB = 1024


def log(message: str) -> None:
    print(f"[load_memory {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Status:
    """The memory fields of /proc/<pid>/status, in bytes."""

    rss: int
    anon: int
    file: int
    peak: int  # VmHWM

    @staticmethod
    def read(pid: int) -> Status | None:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None

        def field(name: str) -> int:
            match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
            return int(match.group(1)) * KIB if match else 0

        return Status(field("VmRSS"), field("RssAnon"), field("RssFile"), field("VmHWM"))


def shard_pid(uds_prefix: str) -> int | None:
    """The shard serving on `{uds_prefix}-0`, found by its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and f"{uds_prefix}-0".encode() in argv:
            return int(entry.name)
    return None


@dataclass
class LoadTrace:
    """What the sampler saw, from the shard's start until it served."""

    before_loading: Status | None = None
    at_ready: Status | None = None
    max_anon: int = 0
    max_file: int = 0
    samples: int = 0
    load_s: float | None = None
    error: str = ""


def follow_load(
    spec: ServerSpec, uds_prefix: str, period_s: float, stop: threading.Event, trace: LoadTrace
) -> None:
    """Samples the shard until its ready line is in the launcher's log (or `stop`)."""
    pid = None
    loading_at = None
    while not stop.wait(period_s):
        pid = pid or shard_pid(uds_prefix)
        if pid is None:
            continue
        status = Status.read(pid)
        if status is None:
            trace.error = "the shard exited while loading"
            return
        trace.samples += 1
        trace.max_anon = max(trace.max_anon, status.anon)
        trace.max_file = max(trace.max_file, status.file)
        logged = spec.log.read_text(errors="replace") if spec.log.exists() else ""
        if trace.before_loading is None and LOADING_LINE in logged:
            trace.before_loading, loading_at = status, time.monotonic()
        if READY_LINE in logged:
            trace.at_ready = status
            trace.load_s = time.monotonic() - loading_at if loading_at else None
            return


def measure(
    model_dir: Path, dtype: str, logs: Path, period_s: float, startup_timeout_s: float
) -> dict[str, Any]:
    spec = sluice_spec(model_dir, dtype, logs / f"load-memory-{dtype}.log", startup_timeout_s)
    uds_prefix = spec.argv[spec.argv.index("--shard-uds-path") + 1]
    trace, stop = LoadTrace(), threading.Event()
    sampler = threading.Thread(
        target=follow_load, args=(spec, uds_prefix, period_s, stop, trace), daemon=True
    )
    log(f"starting Sluice in {dtype} (log: {spec.log})")
    sampler.start()
    try:
        with running(spec) as server:
            sampler.join(timeout=10)
            log(f"Sluice healthy after {server.startup_s:.0f} s")
    finally:
        stop.set()
        sampler.join(timeout=10)
    if trace.error or trace.before_loading is None or trace.at_ready is None:
        raise RuntimeError(
            trace.error or f"the shard's loading and ready lines were not seen in {spec.log}"
        )
    before, ready = trace.before_loading, trace.at_ready
    return {
        "dtype": dtype,
        "samples": trace.samples,
        "load_s": round(trace.load_s, 2) if trace.load_s is not None else None,
        "rss_before_loading_bytes": before.rss,
        # VmHWM at the ready line: the exact peak, up to then.
        "peak_rss_bytes": ready.peak,
        "rss_after_loading_bytes": ready.rss,
        "anon_before_loading_bytes": before.anon,
        "file_before_loading_bytes": before.file,
        "anon_peak_bytes": trace.max_anon,
        "file_peak_bytes": trace.max_file,
        "anon_after_loading_bytes": ready.anon,
        "file_after_loading_bytes": ready.file,
        "loading_cost_bytes": ready.peak - before.rss,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a safetensors directory")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--period", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server start")
    p.add_argument("--results", type=Path, default=BENCH / "results" / "load_memory.json")
    a = p.parse_args()
    model_dir = a.model.expanduser().resolve()
    check_model(model_dir)

    size = model_size(model_dir)
    on_disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = []
    for dtype in a.dtypes:
        row = measure(model_dir, dtype, a.results.parent / "logs", a.period, a.startup_timeout)
        row["weights_bytes"] = size["total_params"] * DTYPE_BYTES[dtype]
        log(
            f"{dtype}: weights {row['weights_bytes'] / 2**20:.0f} MiB, RSS before loading "
            f"{row['rss_before_loading_bytes'] / 2**20:.0f} MiB, peak "
            f"{row['peak_rss_bytes'] / 2**20:.0f} MiB, after "
            f"{row['rss_after_loading_bytes'] / 2**20:.0f} MiB"
        )
        rows.append(row)

    results = {
        "generated_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmark/load_memory.py", *sys.argv[1:]]),
        "machine": asdict(machine.describe(0, 0, "float32")),
        "model": str(model_dir),
        "parameters": size["total_params"],
        "checkpoint_bytes": on_disk,
        "checkpoint_dtypes": checkpoint_dtypes(model_dir),
        "period_s": a.period,
        "dtypes": rows,
    }
    write_results(a.results, results)
    log(f"wrote {a.results}")
    print(json.dumps(results))


def checkpoint_dtypes(model_dir: Path) -> list[str]:
    """The dtypes the safetensors files store (from their headers)."""
    found: set[str] = set()
    for file in model_dir.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return sorted(found)


if __name__ == "__main__":
    main()
