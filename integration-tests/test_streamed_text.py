"""What streams carry: multi-byte characters arrive whole, a stop sequence split across tokens
stops the text where it should, and `huggingface_hub.InferenceClient` reads both APIs."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import DEFAULT_MODEL, SluiceServer
from helpers import generate, stream
from huggingface_hub import InferenceClient

REPLACEMENT = "\ufffd"


def openai_stream_text(server: SluiceServer, body: dict) -> list[str]:
    """The text pieces of a streamed /v1/completions answer, as sent."""
    pieces = []
    with requests.post(
        f"{server.url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=300
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                pieces.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
    return pieces


@pytest.mark.parametrize("prompt", ["日本の首都は", "Write three emoji:"], ids=["cjk", "emoji"])
def test_multi_byte_characters_stream_whole(server: SluiceServer, prompt: str) -> None:
    whole = generate(server, prompt, max_new_tokens=16, ignore_eos=True)["generated_text"]
    assert any(ord(character) > 0x2FFF for character in whole), whole
    assert REPLACEMENT not in whole
    events = stream(server, prompt, max_new_tokens=16, ignore_eos=True).events
    pieces = [event["token"]["text"] for event in events if not event["token"]["special"]]
    assert all(REPLACEMENT not in piece for piece in pieces), pieces
    assert "".join(pieces) == whole
    openai_pieces = openai_stream_text(
        server, {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    )
    assert all(REPLACEMENT not in piece for piece in openai_pieces), openai_pieces
    assert "".join(openai_pieces) == whole


def test_a_stop_sequence_split_across_tokens_ends_the_text_there(server: SluiceServer) -> None:
    prompt = "The days of the week are Monday,"
    reference = generate(server, prompt, max_new_tokens=24, ignore_eos=True)
    texts = [token["text"] for token in reference["details"]["tokens"] if not token["special"]]
    # A stop sequence made of the end of one token and the start of the next, at the first
    # boundary where both sides have two characters and the sequence is new to the text.
    stop = None
    for index in range(1, len(texts) - 1):
        left, right = texts[index], texts[index + 1]
        candidate = left[-2:] + right[:2]
        before = "".join(texts[: index + 1])[:-2]
        if len(left) >= 2 and len(right) >= 2 and candidate not in before:
            stop, stop_end = candidate, len("".join(texts[: index + 1])) + 2
            break
    assert stop is not None, texts
    expected = reference["generated_text"][:stop_end]

    stopped = generate(server, prompt, max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert stopped["generated_text"] == expected
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    events = stream(server, prompt, max_new_tokens=24, ignore_eos=True, stop=[stop]).events
    assert events[-1]["generated_text"] == expected

    # OpenAI leaves the stop sequence out, also from every streamed piece.
    pieces = openai_stream_text(
        server,
        {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": stop},
    )
    assert "".join(pieces) == expected[: -len(stop)]


def test_inference_client_text_generation(server: SluiceServer) -> None:
    client = InferenceClient(base_url=server.url, timeout=300)
    prompt = "The capital of France is"
    output = client.text_generation(
        prompt, max_new_tokens=8, details=True, top_n_tokens=2, decoder_input_details=True
    )
    assert "Paris" in output.generated_text
    assert output.details.generated_tokens == len(output.details.tokens) == 8
    assert len(output.details.top_tokens) == 8
    assert output.details.prefill[0].logprob is None
    streamed = list(client.text_generation(prompt, max_new_tokens=8, stream=True, details=True))
    assert "".join(event.token.text for event in streamed) == output.generated_text
    assert streamed[-1].details.generated_tokens == 8


def test_inference_client_chat_completion(server: SluiceServer) -> None:
    client = InferenceClient(base_url=server.url, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = client.chat_completion(
        messages, model=DEFAULT_MODEL, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    answer = output.choices[0].message.content
    assert "Paris" in answer
    assert "".join(entry.token for entry in output.choices[0].logprobs.content) == answer
    chunks = client.chat_completion(
        messages, model=DEFAULT_MODEL, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == (
        answer
    )
