"""Preemption end to end: a KV pool with room for about four long sequences serves 32
concurrent long requests, each of which must give exactly the output it gives alone.

A preempted request resumes by recomputing its prompt and generated tokens as one prefill, while
its solo run computed those tokens one decode at a time; the outputs are equal only if the
prefill path gives every row the same result as decoding did. Both dtypes are checked, since
bfloat16 rounds every intermediate and so shows any difference between the two paths first."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SluiceServer, metric, serve
from helpers import generate

NEW_TOKENS = 200


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def server(request: pytest.FixtureRequest) -> Iterator[SluiceServer]:
    # 1,024 tokens of KV cache: four sequences of ~250 tokens.
    # fmt: off
    yield from serve(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--max-batch-total-tokens", "1024",
        dtype=request.param,
    )
    # fmt: on


def test_preempted_requests_complete_with_their_solo_output(
    server: SluiceServer, chat_prompt
) -> None:
    topics = [
        "the ocean",
        "a lighthouse",
        "mountains",
        "a library",
        "rain",
        "an old clock",
        "the desert",
        "a garden",
    ]
    prompts = [chat_prompt(f"Write a long story about {topic}.") for topic in topics]
    parameters = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    solo = {p: generate(server, p, **parameters)["generated_text"] for p in prompts}
    preemptions_before = metric(server, "sluice_preemptions_total")

    requests_32 = [prompts[i % len(prompts)] for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda p: generate(server, p, **parameters), requests_32))

    for prompt, result in zip(requests_32, results):
        assert result["details"]["generated_tokens"] == NEW_TOKENS
        assert result["generated_text"] == solo[prompt]
    assert metric(server, "sluice_preemptions_total") > preemptions_before
    assert metric(server, "sluice_kv_blocks_used") == 0
