"""Admission end to end: past `--max-concurrent-requests`, a request is refused at once with
TGI's 429 body while the admitted requests run to completion."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import SluiceServer, serve
from helpers import stream

NEW_TOKENS = 128


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--max-concurrent-requests", "2",
    )
    # fmt: on


def test_a_third_concurrent_request_gets_429_and_the_two_admitted_complete(
    server: SluiceServer, chat_prompt
) -> None:
    streaming = threading.Barrier(3)

    def long_stream(topic: str):
        events_seen = 0

        def on_event() -> None:
            nonlocal events_seen
            events_seen += 1
            if events_seen == 1:
                streaming.wait(timeout=120)

        return stream(
            server,
            chat_prompt(f"Write a long story about {topic}."),
            on_event=on_event,
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        admitted = [pool.submit(long_stream, topic) for topic in ("rivers", "owls")]
        # Both admitted requests have streamed a token, so both hold their permits now.
        streaming.wait(timeout=120)
        refused = requests.post(
            f"{server.url}/generate",
            json={"inputs": chat_prompt("Hello"), "parameters": {"max_new_tokens": 4}},
            timeout=60,
        )
        refused_at = time.perf_counter()
        runs = [future.result(timeout=600) for future in admitted]

    assert refused.status_code == 429, refused.text
    assert refused.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    # Refused at once, not queued behind the admitted requests' remaining tokens.
    assert all(run.arrivals[-1] > refused_at for run in runs)
    for run in runs:
        assert run.events[-1]["details"]["generated_tokens"] == NEW_TOKENS
        assert run.events[-1]["details"]["finish_reason"] == "length"
