"""Small HTTP helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from conftest import SluiceServer


def generate(server: SluiceServer, inputs: str, **parameters) -> dict:
    response = requests.post(
        f"{server.url}/generate",
        json={"inputs": inputs, "parameters": {"details": True, **parameters}},
        timeout=600,
    )
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class StreamedRequest:
    """One /generate_stream call with the arrival time of every event."""

    events: list[dict] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    started: float = 0.0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.started


def stream(
    server: SluiceServer,
    inputs: str,
    max_events: int | None = None,
    on_event: Callable[[], None] | None = None,
    **parameters,
) -> StreamedRequest:
    """Streams a request; stops reading (and closes the connection) after `max_events`.
    `on_event` runs after each event is read."""
    result = StreamedRequest(started=time.perf_counter())
    with requests.post(
        f"{server.url}/generate_stream",
        json={"inputs": inputs, "parameters": parameters},
        stream=True,
        timeout=600,
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data:"), line
            result.events.append(json.loads(line[len("data:") :]))
            result.arrivals.append(time.perf_counter())
            if on_event is not None:
                on_event()
            if max_events is not None and len(result.events) >= max_events:
                break
    return result


def shard_pids(server: SluiceServer) -> dict[int, int]:
    """rank -> pid of the server's running shard processes (`sluice-server serve --uds-path
    {prefix}-{rank}`; the router names the same paths, as its shards' addresses)."""
    prefix = server.flags[server.flags.index("--shard-uds-path") + 1]
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # Exited while we looked.
        if "serve" not in argv or "--uds-path" not in argv:
            continue
        path = argv[argv.index("--uds-path") + 1]
        if path.startswith(f"{prefix}-"):
            pids[int(path.rsplit("-", 1)[1])] = int(entry.name)
    return pids


def wait_for_health(server: SluiceServer, status: int, timeout_s: float = 300) -> None:
    """Polls /health until it answers `status`. Each answer must come within a load balancer's
    probe timeout, even while the shards restart and are warmed up again."""
    deadline = time.monotonic() + timeout_s
    while requests.get(f"{server.url}/health", timeout=10).status_code != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        time.sleep(0.1)
