"""Graceful termination through the real launcher: on SIGTERM the router refuses new requests
with 503 (and /health fails) while the 16 streams in flight run to their end with the same
text they would have had, then everything exits 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import start_server
from helpers import generate, stream

PROMPTS = [
    f"<|im_start|>user\nTell me a story about the number {number}.<|im_end|>\n"
    for number in range(16)
]
MAX_NEW_TOKENS = 40


def test_sigterm_finishes_the_streams_in_flight_and_refuses_new_requests() -> None:
    server = start_server("--graceful-termination-timeout", "120")
    try:
        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
            expected = list(
                pool.map(lambda p: generate(server, p, max_new_tokens=MAX_NEW_TOKENS), PROMPTS)
            )
            # The 16 again, streamed; SIGTERM once every one of them has its first token.
            started = threading.Barrier(len(PROMPTS) + 1)
            first_tokens = [threading.Event() for _ in PROMPTS]

            def streamed(index: int):
                def on_event() -> None:
                    if not first_tokens[index].is_set():
                        first_tokens[index].set()
                        started.wait(timeout=300)

                return stream(
                    server, PROMPTS[index], on_event=on_event, max_new_tokens=MAX_NEW_TOKENS
                )

            runs = [pool.submit(streamed, index) for index in range(len(PROMPTS))]
            started.wait(timeout=300)
            server.process.send_signal(signal.SIGTERM)

            # /health turns 503 as the router starts draining; generation is refused then.
            deadline = time.monotonic() + 30
            while requests.get(f"{server.url}/health", timeout=10).status_code == 200:
                assert time.monotonic() < deadline, "/health never turned 503"
                time.sleep(0.05)
            refused = requests.post(
                f"{server.url}/generate",
                json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
                timeout=30,
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["error_type"] == "unavailable"

            finished = [run.result(timeout=300) for run in runs]
        for run, answer in zip(finished, expected, strict=True):
            final = run.events[-1]
            assert final["generated_text"] == answer["generated_text"]
            assert final["details"]["generated_tokens"] == answer["details"]["generated_tokens"]
        assert server.process.wait(timeout=120) == 0, server.log_tail()
    finally:
        if server.process.poll() is None:
            server.process.kill()
