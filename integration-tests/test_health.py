"""/health as a load balancer probes it, through the real launcher: it answers at once while the
shard is busy with a long step. A shard answers its own Health only between steps, and a probe
gives up after a second or so (Kubernetes' default timeout is 1 s), so /health must not wait
for the step in progress."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import SluiceServer, serve
from helpers import generate

PROMPT_TOKENS = 3000
PROBE_TIMEOUT_S = 1.0
PROBES = 4


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # One step computes the whole prompt: in float32 on a CPU, many seconds.
    # fmt: off
    yield from serve(
        "--max-input-tokens", "3100",
        "--max-total-tokens", "3200",
        "--max-batch-prefill-tokens", "3200",
    )
    # fmt: on


def test_health_answers_at_once_while_a_long_prompt_is_computed(server: SluiceServer) -> None:
    # " fish" is one token of the default model's vocabulary.
    prompt = "fish " * PROMPT_TOKENS
    with ThreadPoolExecutor(max_workers=1) as pool:
        long_request = pool.submit(generate, server, prompt, max_new_tokens=2)
        # Until the request is queued and its step sent, /health may ask the idle shard.
        time.sleep(0.5)
        probes = 0
        while probes < PROBES and not long_request.done():
            # A probe that waited for the step would raise ReadTimeout here.
            response = requests.get(f"{server.url}/health", timeout=PROBE_TIMEOUT_S)
            assert response.status_code == 200, response.text
            probes += 1
            time.sleep(0.1)
        # The probes ran while the prompt was still being computed.
        assert probes == PROBES and not long_request.done()
        details = long_request.result(timeout=600)["details"]
    assert details["generated_tokens"] == 2
    assert requests.get(f"{server.url}/health", timeout=PROBE_TIMEOUT_S).status_code == 200
