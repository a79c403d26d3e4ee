"""Log-probabilities, alternatives, prompt scores and several sequences per request, end to end
with the official clients, checked against `transformers` on the same weights (float32)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import DEFAULT_MODEL, SluiceServer, metric, serve
from helpers import generate, stream
from text_generation import Client

BLOCK_SIZE = 16
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--max-best-of", "4",
    )
    # fmt: on


@pytest.fixture(scope="module")
def reference(server: SluiceServer):
    """The converted default model in `transformers` (the launcher has converted it by now)."""
    from transformers import AutoModelForCausalLM

    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    model = AutoModelForCausalLM.from_pretrained(
        cache / "models" / "SmolLM2-135M-Instruct", dtype=torch.float32
    )
    return model.eval()


def reference_logprobs(reference, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the reference logits: row p is the distribution of token p + 1."""
    with torch.no_grad():
        logits = reference(torch.tensor([token_ids])).logits[0]
    return logits.float().log_softmax(dim=-1)


@pytest.fixture(scope="module")
def openai_client(server: SluiceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_tgi_details_match_the_reference_log_softmax(server: SluiceServer, reference) -> None:
    """decoder_input_details scores every prompt token; top_n_tokens lists each position's most
    likely tokens; both equal log_softmax of transformers' logits."""
    client = Client(server.url, timeout=300)
    prompt = "The quick brown fox jumps over the lazy"
    response = client.generate(
        prompt, max_new_tokens=6, decoder_input_details=True, top_n_tokens=3
    )
    details = response.details
    prompt_ids = [token.id for token in details.prefill]
    generated_ids = [token.id for token in details.tokens]
    assert details.prefill[0].logprob is None
    expected = reference_logprobs(reference, prompt_ids + generated_ids)
    for position, token in enumerate(details.prefill[1:], start=1):
        assert abs(token.logprob - expected[position - 1, token.id].item()) < TOLERANCE
    for offset, (token, top) in enumerate(zip(details.tokens, details.top_tokens, strict=True)):
        row = expected[len(prompt_ids) + offset - 1]
        assert abs(token.logprob - row[token.id].item()) < TOLERANCE
        best = row.topk(3)
        assert [alternative.id for alternative in top] == best.indices.tolist()
        for alternative, value in zip(top, best.values.tolist(), strict=True):
            assert abs(alternative.logprob - value) < TOLERANCE
        # Greedy: the chosen token is the most likely one.
        assert top[0].id == token.id


def test_streamed_top_tokens_and_truncate(server: SluiceServer) -> None:
    events = stream(server, "Counting: one, two, three,", max_new_tokens=4, top_n_tokens=2).events
    assert all(len(event["top_tokens"]) == 2 for event in events)
    long_prompt = "one two three four five six seven eight nine ten " * 4
    truncated = stream(server, long_prompt, max_new_tokens=1, truncate=5).events
    assert truncated[-1]["details"]["input_length"] == 5
    # Without alternatives asked for, the field is left out.
    assert "top_tokens" not in stream(server, "Hi", max_new_tokens=1).events[0]


def test_best_of_answers_with_the_most_likely_sequence(server: SluiceServer) -> None:
    client = Client(server.url, timeout=300)
    response = client.generate(
        "Tell me a story.", max_new_tokens=12, best_of=2, do_sample=True, temperature=1.5
    )
    (other,) = response.details.best_of_sequences
    assert other.seed != response.details.seed

    def mean(tokens) -> float:
        return sum(token.logprob for token in tokens) / len(tokens)

    assert mean(response.details.tokens) >= mean(other.tokens)
    assert response.details.generated_tokens == len(response.details.tokens)


def test_n_sequences_compute_the_prompt_once(
    server: SluiceServer, openai_client: openai.OpenAI
) -> None:
    """Four choices of one chat request: the prompt's full blocks are computed once and found in
    the prefix cache by the other three."""
    question = "Describe the sea in a long sentence, with many adjectives and details. " * 4
    messages = [{"role": "user", "content": question}]
    computed_before = metric(server, "sluice_prefill_tokens_total")
    hits_before = metric(server, "sluice_prefix_cache_hit_tokens_total")
    response = openai_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, n=4, max_tokens=8, temperature=1.0, seed=3
    )
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    assert len({choice.message.content for choice in response.choices}) > 1
    prompt_tokens = response.usage.prompt_tokens
    assert response.usage.completion_tokens == 4 * 8
    computed = metric(server, "sluice_prefill_tokens_total") - computed_before
    hits = metric(server, "sluice_prefix_cache_hit_tokens_total") - hits_before
    full_blocks = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert hits == 3 * full_blocks
    assert computed == 4 * prompt_tokens - 3 * full_blocks
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_streamed_choices_equal_the_whole_answer_with_the_same_seed(
    openai_client: openai.OpenAI,
) -> None:
    request = dict(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=2,
        max_tokens=10,
        temperature=1.0,
        seed=11,
    )
    whole = openai_client.chat.completions.create(**request)
    texts = {0: "", 1: ""}
    for chunk in openai_client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {choice.index: choice.message.content for choice in whole.choices}


def test_chat_logprobs_match_the_reference(
    server: SluiceServer, openai_client: openai.OpenAI, reference, chat_prompt
) -> None:
    question = "What is the capital of France?"
    response = openai_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    # The same prompt's token ids, through TGI's route.
    details = generate(server, chat_prompt(question), max_new_tokens=8, decoder_input_details=True)
    prompt_ids = [token["id"] for token in details["details"]["prefill"]]
    generated_ids = [token["id"] for token in details["details"]["tokens"]]
    expected = reference_logprobs(reference, prompt_ids + generated_ids)
    for offset, entry in enumerate(content):
        row = expected[len(prompt_ids) + offset - 1]
        assert abs(entry.logprob - row[generated_ids[offset]].item()) < TOLERANCE
        assert entry.bytes == list(entry.token.encode())
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(
            row.topk(3).values.tolist(), abs=TOLERANCE
        )


def test_completions_echo_logprobs_and_several_prompts(openai_client: openai.OpenAI) -> None:
    response = openai_client.completions.create(
        model=DEFAULT_MODEL,
        prompt=["The sky is", "Grass is"],
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
    )
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice, prompt in zip(response.choices, ["The sky is", "Grass is"], strict=True):
        assert choice.text.startswith(prompt)
        logprobs = choice.logprobs
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        assert all(value <= 0 for value in logprobs.token_logprobs[1:])
        assert len(logprobs.top_logprobs[-1]) == 2
        assert logprobs.text_offset == sorted(logprobs.text_offset)
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.completions.create(
            model=DEFAULT_MODEL, prompt=["a"] * 5, max_tokens=1
        )


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_batch(server: SluiceServer) -> None:
    seeded = {"do_sample": True, "temperature": 1.2, "top_k": 40, "seed": 1234}
    prompt = "Write a short poem about autumn."
    alone = generate(server, prompt, max_new_tokens=16, **seeded)
    others = [
        {"do_sample": True, "temperature": 0.7 + 0.05 * i, "top_p": 0.9, "seed": i}
        if i % 2
        else {"repetition_penalty": 1.2, "top_n_tokens": 2}
        for i in range(15)
    ]

    def run(parameters: dict) -> dict:
        return generate(server, f"Request {len(parameters)}: tell me a fact.", max_new_tokens=16,
                        **parameters)

    with ThreadPoolExecutor(max_workers=16) as pool:
        batch = [pool.submit(run, parameters) for parameters in others]
        in_batch = generate(server, prompt, max_new_tokens=16, **seeded)
        for future in batch:
            future.result()
    assert [t["id"] for t in in_batch["details"]["tokens"]] == [
        t["id"] for t in alone["details"]["tokens"]
    ]
