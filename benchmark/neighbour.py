"""A busy neighbour for the CPU benchmarks: a process pinned to the last CPU this one may use,
busy for a fraction of every 8 ms and asleep for the rest, as the router, the shard's gRPC work
or another tenant takes part of a core while a server runs. Work split evenly between threads
waits for the slowest one, which this shows."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_LOOP = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
fraction, period = float(sys.argv[1]), 0.008
while True:
    end = time.perf_counter() + fraction * period
    while time.perf_counter() < end:
        pass
    time.sleep((1 - fraction) * period)
"""


@contextlib.contextmanager
def busy_neighbour(fraction: float) -> Iterator[None]:
    """While inside, the last usable CPU is busy for `fraction` of the time (0: no neighbour)."""
    if not 0 <= fraction < 1:
        raise ValueError("the neighbour's load is a fraction in [0, 1)")
    if fraction == 0:
        yield
        return
    last_cpu = max(os.sched_getaffinity(0))
    neighbour = subprocess.Popen([sys.executable, "-c", _LOOP, str(fraction), str(last_cpu)])
    try:
        yield
    finally:
        neighbour.kill()
        neighbour.wait()
