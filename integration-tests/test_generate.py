"""TGI's generation API end to end: launcher, router and shard on the default model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import SluiceServer
from helpers import generate, stream
from text_generation import Client
from text_generation.errors import ValidationError


def test_greedy_answer_names_the_capital(server: SluiceServer, chat_prompt) -> None:
    body = generate(server, chat_prompt("What is the capital of France?"), max_new_tokens=30)
    assert "Paris" in body["generated_text"]
    details = body["details"]
    assert details["finish_reason"] in ("eos_token", "length")
    assert details["generated_tokens"] == len(details["tokens"])
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_stream_concatenates_to_the_non_streamed_text(server: SluiceServer, chat_prompt) -> None:
    prompt = chat_prompt("Write one sentence about the sea.")
    expected = generate(server, prompt, max_new_tokens=40)
    events = stream(server, prompt, max_new_tokens=40).events
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == expected["generated_text"]
    assert events[-1]["generated_text"] == expected["generated_text"]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["details"]["generated_tokens"] == len(events)
    assert all(e["generated_text"] is None for e in events[:-1])


def test_concurrent_requests_match_their_solo_runs(server: SluiceServer, chat_prompt) -> None:
    topics = [
        "the sun",
        "rivers",
        "cats",
        "chess",
        "bread",
        "winter",
        "the moon",
        "trains",
        "music",
        "forests",
        "honey",
        "bicycles",
        "volcanoes",
        "tea",
        "owls",
        "glass",
    ]
    prompts = [chat_prompt(f"Tell me a fact about {topic}.") for topic in topics]
    solo = [generate(server, p, max_new_tokens=24)["generated_text"] for p in prompts]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(server, p, max_new_tokens=24), prompts))
    assert [r["generated_text"] for r in together] == solo


def test_stop_sequence_ends_generation(server: SluiceServer, chat_prompt) -> None:
    prompt = chat_prompt("What is the capital of France?")
    full = generate(server, prompt, max_new_tokens=30)["generated_text"]
    stop = "Paris"
    body = generate(server, prompt, max_new_tokens=30, stop=[stop])
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"] == full[: full.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible(server: SluiceServer, chat_prompt) -> None:
    prompt = chat_prompt("Name a colour.")
    params = {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 1234,
    }
    first = generate(server, prompt, **params)
    second = generate(server, prompt, **params)
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 1234


def test_typical_p_samples_reproducibly(server: SluiceServer, chat_prompt) -> None:
    prompt = chat_prompt("Name a colour.")
    params = {"max_new_tokens": 16, "typical_p": 0.5, "seed": 99}
    first = generate(server, prompt, **params)
    assert first == generate(server, prompt, **params)
    # typical_p alone turns sampling on, as in TGI: the seed is reported.
    assert first["details"]["seed"] == 99


def test_frequency_penalty_discourages_repeated_tokens(server: SluiceServer, chat_prompt) -> None:
    """Greedy, so only the penalty differs: the most repeated output token of a list-making
    answer is repeated less once each repetition costs 2 logits."""
    prompt = chat_prompt("Count from 1 to 30, separated by commas.")

    def most_repeats(body: dict) -> int:
        ids = [token["id"] for token in body["details"]["tokens"]]
        return max(ids.count(token_id) for token_id in set(ids))

    plain = generate(server, prompt, max_new_tokens=40, ignore_eos=True)
    penalised = generate(server, prompt, max_new_tokens=40, ignore_eos=True, frequency_penalty=2.0)
    assert most_repeats(plain) >= 5, plain["generated_text"]
    assert most_repeats(penalised) < most_repeats(plain), penalised["generated_text"]


def test_tgi_python_client(server: SluiceServer, chat_prompt) -> None:
    client = Client(server.url, timeout=300)
    prompt = chat_prompt("What is the capital of France?")
    response = client.generate(prompt, max_new_tokens=30)
    assert "Paris" in response.generated_text
    assert response.details.generated_tokens == len(response.details.tokens)
    streamed = list(client.generate_stream(prompt, max_new_tokens=30))
    text = "".join(r.token.text for r in streamed if not r.token.special)
    assert text == response.generated_text
    assert streamed[-1].generated_text == response.generated_text
    # The server's 422 reaches the caller as the client's own error type.
    with pytest.raises(ValidationError, match="must have less than"):
        client.generate("word " * 400, max_new_tokens=5)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "", "parameters": {"max_new_tokens": 5}},
        {"inputs": "Hello", "parameters": {"temperature": -0.5}},
        {"inputs": "word " * 400, "parameters": {"max_new_tokens": 5}},
        {"inputs": "Hello", "parameters": {"max_new_tokens": 0}},
        {"inputs": "Hello", "parameters": {"top_p": 1.5}},
        {"parameters": {"max_new_tokens": 5}},
        {"inputs": "Hello", "parameters": {"typical_p": 1.5}},
        {"inputs": "Hello", "parameters": {"frequency_penalty": 3.0}},
        {"inputs": "Hello", "parameters": {"best_of": 2}},
        {"inputs": "Hello", "parameters": {"watermark": True}},
        {"inputs": "Hello", "parameters": {"top_n_tokens": 50}},
        {"inputs": "Hello", "parameters": {"truncate": 0}},
    ],
    ids=[
        "empty",
        "negative-temperature",
        "too-long",
        "zero-new-tokens",
        "top-p",
        "no-inputs",
        "typical-p",
        "frequency-penalty",
        "greedy-best-of",
        "unsupported",
        "top-n-tokens",
        "truncate",
    ],
)
@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_bad_requests_get_422_and_the_server_keeps_serving(
    server: SluiceServer, route: str, body: dict
) -> None:
    response = requests.post(f"{server.url}{route}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error_type"] == "validation"
    assert error["error"]
    assert generate(server, "Hello", max_new_tokens=2)["details"]["generated_tokens"] == 2


def test_malformed_json_is_refused(server: SluiceServer) -> None:
    response = requests.post(
        f"{server.url}/generate", data=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"


def test_info_and_health(server: SluiceServer) -> None:
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    info = requests.get(f"{server.url}/info", timeout=30).json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["max_input_tokens"] == 256
    assert info["max_total_tokens"] == 512
    assert info["max_batch_total_tokens"] >= 512


def test_return_full_text_prepends_the_prompt(server: SluiceServer, chat_prompt) -> None:
    prompt = chat_prompt("What is the capital of France?")
    plain = generate(server, prompt, max_new_tokens=8)["generated_text"]
    full = generate(server, prompt, max_new_tokens=8, return_full_text=True)["generated_text"]
    assert full == prompt + plain
