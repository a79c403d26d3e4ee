"""Shard supervision through the real launcher: a shard killed while idle, and one killed in the
middle of a stream, are restarted and warmed up again. Only the requests of the lost step fail
(an error event, `error_type` "generation"); a request sent while the shard restarts is held
and answered with the same text as before; past --max-shard-restarts the launcher exits with
the cause. The children's log lines reach the launcher's log at their own level."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import SluiceServer, metric, start_server
from helpers import generate, shard_pids, stream, wait_for_health

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
RESTARTS = 2


def health(server: SluiceServer) -> int:
    return requests.get(f"{server.url}/health", timeout=30).status_code


def test_dead_shards_are_restarted_until_the_limit() -> None:
    server = start_server("--max-shard-restarts", str(RESTARTS))
    try:
        expected = generate(server, PROMPT, max_new_tokens=12)["generated_text"]
        assert "Paris" in expected

        # Killed while idle: /health turns 503, then 200 again by itself once the router has
        # warmed the new shard up; it answers as the first one did.
        idle_pid = shard_pids(server)[0]
        os.kill(idle_pid, signal.SIGKILL)
        wait_for_health(server, 503)
        wait_for_health(server, 200)
        assert shard_pids(server)[0] != idle_pid
        assert generate(server, PROMPT, max_new_tokens=12)["generated_text"] == expected

        # Killed during a stream: the stream ends with an error event. A request sent while
        # the shard restarts waits for it and gets the same answer as before.
        killed = False

        def kill_after_first_token() -> None:
            nonlocal killed
            if not killed:
                killed = True
                os.kill(shard_pids(server)[0], signal.SIGKILL)

        lost = stream(
            server, PROMPT, on_event=kill_after_first_token, max_new_tokens=2000, ignore_eos=True
        )
        assert killed and len(lost.events) < 2000
        assert lost.events[-1]["error_type"] == "generation", lost.events[-1]
        assert health(server) == 503
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(generate, server, PROMPT, max_new_tokens=12)
            assert held.result(timeout=300)["generated_text"] == expected
        assert health(server) == 200
        assert metric(server, "sluice_shard_restarts_total") == RESTARTS

        # The children's lines are logged again at their own level, saying where they are from.
        log_lines = server.log_path.read_text(errors="replace").splitlines()
        assert any(
            " WARN " in line
            and "the shards restarted: warming them up again" in line
            and 'child="router"' in line
            for line in log_lines
        )
        assert any(
            " INFO " in line
            and "KV cache: " in line
            and 'source="sluice_server.engine.step"' in line
            and 'child="shard-0"' in line
            for line in log_lines
        )

        # One death more than allowed stops everything, with the cause.
        os.kill(shard_pids(server)[0], signal.SIGKILL)
        assert server.process.wait(timeout=120) != 0
        log = server.log_tail(20)
        assert f"giving up after {RESTARTS} shard restarts (--max-shard-restarts {RESTARTS})" in log
        assert "shard-0 exited with signal: 9 (SIGKILL)" in log
    finally:
        if server.process.poll() is None:
            server.process.kill()
