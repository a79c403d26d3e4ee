"""The batching engine end to end: prefix cache, chunked prefill next to decodes, and
cancellation, through the real launcher, router and shard."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SluiceServer, metric, serve
from helpers import StreamedRequest, generate, stream

CHUNK_BUDGET = 256
MAX_INPUT_TOKENS = 3200
MAX_TOTAL_TOKENS = 3600
# Any prompt within --max-input-tokens may ask for this many.
MAX_NEW_TOKENS = MAX_TOTAL_TOKENS - MAX_INPUT_TOKENS
# A closed connection shows when the router next writes to it: a step or two, plus the step in
# flight when the scheduler is told.
MAX_STEPS_TO_NOTICE_A_DISCONNECT = 10
# The stall target's server: its budget, and the router's smallest prompt chunk beside decodes
# (`MIN_PREFILL_CHUNK` in router/src/scheduler/step_times.rs).
STALL_TARGET_BUDGET = 512
SMALLEST_CHUNK = 64


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", str(MAX_INPUT_TOKENS),
        "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-batch-prefill-tokens", str(CHUNK_BUDGET),
    )
    # fmt: on


@pytest.fixture(scope="module")
def stall_target_server() -> Iterator[SluiceServer]:
    """A decode stall target below any step's time: while requests decode, every prompt chunk
    is the router's smallest."""
    # fmt: off
    yield from serve(
        "--max-input-tokens", str(MAX_INPUT_TOKENS),
        "--max-total-tokens", str(MAX_TOTAL_TOKENS),
        "--max-batch-prefill-tokens", str(STALL_TARGET_BUDGET),
        "--max-decode-stall-ms", "1",
    )
    # fmt: on


def system_prompt(words: int) -> str:
    facts = [
        "The archive opens at nine.",
        "Visitors sign the ledger.",
        "Maps stay inside.",
        "Lamps are dimmed at dusk.",
        "The east wing holds letters.",
    ]
    return " ".join(facts[i % len(facts)] for i in range(words // 5))


def long_prompt() -> str:
    """A user turn of about 3,000 tokens."""
    return "<|im_start|>user\n" + system_prompt(2600) + "<|im_end|>\n"


def count_slowly(
    server: SluiceServer, chat_prompt: Callable[[str], str], i: int, max_new_tokens: int
) -> StreamedRequest:
    """A request that decodes for `max_new_tokens` steps."""
    prompt = chat_prompt(f"Count slowly from {i} to {i + 500}.")
    return stream(server, prompt, max_new_tokens=max_new_tokens, ignore_eos=True)


def test_requests_sharing_a_long_prefix_reuse_its_cache(server: SluiceServer) -> None:
    shared = f"<|im_start|>system\n{system_prompt(850)}<|im_end|>\n"
    hits_before = metric(server, "sluice_prefix_cache_hit_tokens_total")
    questions = [f"Question {i}: when does the archive open?" for i in range(16)]
    runs: list[StreamedRequest] = []
    for question in questions:
        prompt = f"{shared}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        runs.append(stream(server, prompt, max_new_tokens=4))
    input_length = runs[0].events[-1]["details"]["input_length"]
    assert input_length > 1000
    cached = [run.events[-1]["details"]["cached_tokens"] for run in runs]
    assert cached[0] < 900
    assert all(c >= 900 for c in cached[1:]), cached
    assert metric(server, "sluice_prefix_cache_hit_tokens_total") - hits_before >= 15 * 900
    assert all(run.ttft < runs[0].ttft for run in runs[1:])


def test_a_long_prompt_is_chunked_while_others_keep_decoding(
    server: SluiceServer, chat_prompt
) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(count_slowly, server, chat_prompt, i, 200) for i in range(8)]
        time.sleep(2)  # the eight are decoding by now
        chunks_before = metric(server, "sluice_prefill_chunks_total")
        long = stream(server, long_prompt(), max_new_tokens=1)
        chunks = metric(server, "sluice_prefill_chunks_total") - chunks_before
        decoders = [f.result() for f in futures]

    prompt_tokens = long.events[-1]["details"]["input_length"]
    assert prompt_tokens >= 3000
    # The prompt needed many chunks: the budget minus the eight decodes' tokens per step.
    assert chunks >= math.ceil(prompt_tokens / CHUNK_BUDGET)
    window_start, window_end = long.started, long.arrivals[0]
    for run in decoders:
        in_window = [t for t in run.arrivals if window_start <= t <= window_end]
        # A token in (nearly) every step that ran a chunk: no decode waited for the prompt.
        assert len(in_window) >= math.ceil(prompt_tokens / CHUNK_BUDGET) - 2, len(in_window)


def test_a_decode_stall_target_cuts_the_chunks_next_to_decodes(
    stall_target_server: SluiceServer, chat_prompt
) -> None:
    server = stall_target_server
    prompt = long_prompt()

    def chunks_of(prompt: str) -> tuple[int, float]:
        """The prompt's length, and the prompt chunks run while it was prefilled."""
        before = metric(server, "sluice_prefill_chunks_total")
        run = stream(server, prompt, max_new_tokens=1)
        assert run.events[-1]["details"]["cached_tokens"] == 0
        return run.events[-1]["details"]["input_length"], metric(
            server, "sluice_prefill_chunks_total"
        ) - before

    # Alone, nothing decodes, and the prompt takes chunks of the whole budget.
    prompt_tokens, chunks = chunks_of(prompt)
    assert prompt_tokens >= 3000
    assert chunks == math.ceil(prompt_tokens / STALL_TARGET_BUDGET)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(count_slowly, server, chat_prompt, i, MAX_NEW_TOKENS) for i in range(4)
        ]
        time.sleep(2)  # the four are decoding by now
        # A different first word keeps the prompt out of the prefix cache.
        prompt_tokens, chunks = chunks_of(prompt.replace("user\n", "user\nNow ", 1))
        decoders = [f.result() for f in futures]
    # Beside the decodes, each chunk is the smallest (the first may come before a decode).
    assert chunks >= math.ceil((prompt_tokens - STALL_TARGET_BUDGET) / SMALLEST_CHUNK) + 1, chunks
    assert all(len(run.events) == MAX_NEW_TOKENS for run in decoders)


def test_disconnected_streams_are_cancelled_within_a_few_steps(
    server: SluiceServer, chat_prompt
) -> None:
    """Each request could run for hundreds more steps (ignore_eos, the most new tokens the
    limits allow), so only cancellation can give its blocks back within a few steps."""
    generate(server, chat_prompt("Hello"), max_new_tokens=2)
    used_before = metric(server, "sluice_kv_blocks_used")
    cancelled_before = metric(server, "sluice_requests_cancelled_total")
    prompts = [chat_prompt(f"Tell me about the number {i}.") for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(
            pool.map(
                lambda p: stream(
                    server, p, max_events=5, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True
                ),
                prompts,
            )
        )
    assert all(len(run.events) == 5 for run in runs)
    steps_at_disconnect = metric(server, "sluice_steps_total")
    deadline = time.monotonic() + 120
    while metric(server, "sluice_kv_blocks_used") != used_before:
        assert time.monotonic() < deadline, "blocks of cancelled requests were not freed"
        time.sleep(0.1)
    steps_to_free = metric(server, "sluice_steps_total") - steps_at_disconnect
    assert steps_to_free <= MAX_STEPS_TO_NOTICE_A_DISCONNECT, steps_to_free
    assert metric(server, "sluice_requests_cancelled_total") - cancelled_before == len(prompts)
    # The server is still serving.
    assert generate(server, chat_prompt("Hi"), max_new_tokens=3)["details"]["generated_tokens"] == 3
