"""Starting, watching and stopping the servers under test, for run_all.py.

Every server runs in its own session (process group), so that stopping it reaches every
process it spawned; its memory is the sum over its whole process tree, read from /proc.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAGE_KIB = 1024


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str]
    log: Path
    startup_timeout_s: float
    # Sluice's launcher stops its children in order on SIGTERM; vLLM's tree is stopped as a group.
    term_group: bool
    stop_grace_s: float = 60.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class MemorySample:
    rss_bytes: int
    pss_bytes: int
    processes: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin() -> Path:
    """The bin/ of the Python running this script, where `make install` puts Sluice."""
    return Path(sys.executable).parent


def sluice_spec(model_dir: Path, dtype: str, log: Path, startup_timeout_s: float) -> ServerSpec:
    """The real launcher on `model_dir` in `dtype`, on a free port and its own shard socket."""
    launcher = venv_bin() / "sluice-launcher"
    port = free_port()
    # fmt: off
    argv = [
        str(launcher if launcher.exists() else "sluice-launcher"),
        "--model-id", str(model_dir),
        "--port", str(port),
        "--hostname", "127.0.0.1",
        "--dtype", dtype,
        "--shard-uds-path", f"/tmp/bench-sluice-{uuid.uuid4().hex[:8]}",
    ]
    # fmt: on
    # The launcher finds sluice-server and sluice-router on PATH.
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    return ServerSpec("sluice", argv, port, env, log, startup_timeout_s, term_group=False)


def llama_server_spec(
    script: Path,
    gguf: Path,
    slots: int,
    context_per_request: int,
    log: Path,
    startup_timeout_s: float,
    extra_flags: Sequence[str] = (),
) -> ServerSpec:
    """llama.cpp's llama-server, built by the peer script, on `gguf`: one slot per request in
    flight, each with room for `context_per_request` tokens; `extra_flags` follow."""
    port = free_port()
    # fmt: off
    argv = [
        "bash", str(script), "serve", str(gguf),
        "--port", str(port),
        "--host", "127.0.0.1",
        # llama-server splits its context evenly between its slots.
        "-np", str(slots),
        "-c", str(slots * context_per_request),
        *extra_flags,
    ]
    # fmt: on
    return ServerSpec("llama", argv, port, dict(os.environ), log, startup_timeout_s, True)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited since the listing
        # The command name may contain spaces and parentheses; the fields after it do not.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    children, pids, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _kib_field(path: Path, name: str) -> int:
    try:
        match = re.search(rf"^{name}:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def tree_memory(root: int, with_pss: bool = True) -> MemorySample:
    """RSS and PSS summed over `root` and its descendants.

    RSS counts pages shared between the processes (torch's libraries, forked workers) once per
    process; PSS splits them, so the PSS sum is the tree's real footprint. Reading PSS walks the
    page tables: 70 ms of kernel time for a server with a 5 GiB KV cache, so it is left out
    (0) of the samples taken while a level runs."""
    pids = tree_pids(root)
    rss = sum(_kib_field(Path(f"/proc/{pid}/status"), "VmRSS") for pid in pids)
    pss = (
        sum(_kib_field(Path(f"/proc/{pid}/smaps_rollup"), "Pss") for pid in pids) if with_pss else 0
    )
    return MemorySample(rss * PAGE_KIB, pss * PAGE_KIB, len(pids))


def thread_times() -> dict[tuple[int, int], tuple[int, int]]:
    """(pid, tid) -> (ns run on a CPU, ns waited in a run queue for one) of every thread visible
    in /proc, from the scheduler's own counters (schedstat)."""
    times = {}
    for path in Path("/proc").glob("[0-9]*/task/[0-9]*/schedstat"):
        try:
            ran, waited, _ = path.read_text().split()
        except (OSError, ValueError):
            continue  # exited since the listing
        times[(int(path.parts[2]), int(path.parts[4]))] = (int(ran), int(waited))
    return times


def interruptions(
    before: dict[tuple[int, int], tuple[int, int]],
    after: dict[tuple[int, int], tuple[int, int]],
    pid: int,
    top: int = 3,
) -> dict:
    """Between two thread_times(): how long the threads of process `pid` waited for a CPU (the
    longest wait of one), and the `top` other processes that ran longest, at least a millisecond
    each, "name (pid)": ms. A step waits for its slowest thread, so a thread kept off its CPU
    delays the whole step."""
    waited, others = 0, collections.Counter()
    for key, (ran, wait) in after.items():
        ran_before, wait_before = before.get(key, (0, 0))
        if key[0] == pid:
            waited = max(waited, wait - wait_before)
        elif ran > ran_before:
            others[key[0]] += ran - ran_before
    named = {}
    for other, ns in others.most_common(top):
        if ns < 1_000_000:
            break
        try:
            name = Path(f"/proc/{other}/comm").read_text().strip()
        except OSError:
            name = "exited"
        named[f"{name} ({other})"] = round(ns / 1e6, 1)
    return {"longest_wait_ms": round(waited / 1e6, 1), "others_ran_ms": named}


def _busy_jiffies() -> int:
    """CPU time spent by the whole machine (all but idle and iowait), in clock ticks."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def _tree_jiffies(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, and those of its children that exited and were waited for
        total += sum(int(x) for x in fields[11:15])
    return total


@dataclass(frozen=True)
class CpuMark:
    """A point in time to measure, later, how busy processes outside a tree kept the CPUs."""

    root: int
    wall: float
    busy: int
    ours: int

    @staticmethod
    def now(root: int) -> CpuMark:
        return CpuMark(root, time.monotonic(), _busy_jiffies(), _tree_jiffies(root))

    def foreign_share(self) -> float:
        """The share of all CPUs used since this mark by processes outside the tree, 0..1."""
        end = CpuMark.now(self.root)
        capacity = (end.wall - self.wall) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        foreign = (end.busy - self.busy) - (end.ours - self.ours)
        return max(0.0, foreign / capacity) if capacity > 0 else 0.0


@dataclass
class MemorySampler:
    """Samples a process tree's RSS every `period_s` in a thread and keeps the peak; PSS is
    read once per window, when the peak is taken."""

    root: int
    period_s: float = 0.5
    _peak: MemorySample = field(default_factory=lambda: MemorySample(0, 0, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            self._record(tree_memory(self.root, with_pss=False))

    def _record(self, sample: MemorySample) -> None:
        with self._lock:
            self._peak = MemorySample(
                max(self._peak.rss_bytes, sample.rss_bytes),
                max(self._peak.pss_bytes, sample.pss_bytes),
                max(self._peak.processes, sample.processes),
            )

    def take_peak(self) -> MemorySample:
        """The peak since the last call (one last sample included), and starts a new window."""
        self._record(tree_memory(self.root))
        with self._lock:
            peak, self._peak = self._peak, MemorySample(0, 0, 0)
        return peak


@contextlib.contextmanager
def sampling(root: int, period_s: float) -> Iterator[MemorySampler]:
    """A MemorySampler running in a daemon thread for the duration of the block."""
    sampler, stop = MemorySampler(root, period_s), threading.Event()
    thread = threading.Thread(
        target=sampler.run_until, args=(stop,), name="memory-sampler", daemon=True
    )
    thread.start()
    try:
        yield sampler
    finally:
        stop.set()
        thread.join(timeout=10)


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ExitedBeforeHealthy(RuntimeError):
    """The server's process ended before /health answered; `returncode` < 0: killed by that
    signal (a crash)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def wait_healthy(spec: ServerSpec, process: subprocess.Popen) -> float:
    """Seconds until GET /health answers 200; raises if the server exits or the time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < spec.startup_timeout_s:
        if process.poll() is not None:
            raise ExitedBeforeHealthy(
                f"{spec.name} exited with {process.returncode} before it was "
                f"healthy (log: {spec.log}); its end:\n{log_tail(spec.log)}",
                process.returncode,
            )
        if http_get(f"{spec.url}/health", timeout_s=5)[0] == 200:
            return time.monotonic() - start
        time.sleep(1.0)
    raise TimeoutError(
        f"{spec.name} not healthy after {spec.startup_timeout_s:.0f} s "
        f"(log: {spec.log}); its end:\n{log_tail(spec.log)}"
    )


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of its stat), to tell it from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2 :].split()[19]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tree_snapshot(root: int) -> dict[int, str]:
    """pid -> start time for `root`'s tree, to kill exactly these processes later."""
    return {pid: _start_time(pid) for pid in tree_pids(root)}


def stop(spec: ServerSpec, process: subprocess.Popen, known: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL after the grace period to the group and to every process of the
    tree, as it is now or was when `known` was taken (the launcher gives its children their own
    process groups, and a child whose parent died leaves the tree); never raises."""
    pgid = process.pid  # start_new_session=True makes the leader's pid the group id
    stragglers = known | (tree_snapshot(process.pid) if process.poll() is None else {})
    if spec.term_group:
        _signal_group(pgid, signal.SIGTERM)
    elif process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=spec.stop_grace_s)
    _signal_group(pgid, signal.SIGKILL)
    for pid, started in stragglers.items():
        if started and _start_time(pid) == started:  # still that process, not a reused pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@dataclass(frozen=True)
class Running:
    spec: ServerSpec
    process: subprocess.Popen
    startup_s: float


@contextlib.contextmanager
def running(spec: ServerSpec) -> Iterator[Running]:
    """Starts the server, waits for /health, and stops it on the way out, errors included."""
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    with spec.log.open("w") as log:
        process = subprocess.Popen(
            spec.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=spec.env,
            start_new_session=True,
        )
    known: dict[int, str] = {}
    try:
        startup_s = wait_healthy(spec, process)
        known = tree_snapshot(process.pid)
        yield Running(spec, process, startup_s)
    finally:
        stop(spec, process, known)
