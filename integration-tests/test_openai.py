"""OpenAI's API end to end, through the official `openai` client: launcher, router and shard on
the default model (float32, where its greedy answers are stable)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from conftest import DEFAULT_MODEL, SluiceServer
from helpers import generate, stream

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: SluiceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def raw_events(server: SluiceServer, route: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, as sent (the client hides `[DONE]`)."""
    with requests.post(f"{server.url}{route}", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[len("data: ") :] for line in lines]


def test_chat_answers_like_generate_on_the_models_own_template(
    server: SluiceServer, client: openai.OpenAI, chat_prompt
) -> None:
    response = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL_QUESTION, temperature=0, max_tokens=30
    )
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == DEFAULT_MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # The same prompt through TGI's route, rendered by `transformers`: the router's template
    # rendering and tokenization must give the same tokens, hence the same greedy text.
    prompt = chat_prompt("What is the capital of France?")
    expected = generate(server, prompt, max_new_tokens=30)
    assert choice.message.content == expected["generated_text"]
    input_length = stream(server, prompt, max_new_tokens=1).events[-1]["details"]["input_length"]
    usage = response.usage
    assert usage.prompt_tokens == input_length
    assert usage.completion_tokens == expected["details"]["generated_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_joins_to_the_whole_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=40
    )
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=40, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_streams_end_with_done_and_include_usage_adds_a_usage_chunk(
    server: SluiceServer, client: openai.OpenAI
) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": CAPITAL_QUESTION,
        "temperature": 0,
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = raw_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL_QUESTION, temperature=0, max_tokens=12
    )
    usage = usage_chunk["usage"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [usage[k] for k in counts] == [getattr(whole.usage, k) for k in counts]
    # The whole answer came second, so the prefix cache served its prompt's full blocks.
    assert whole.usage.prompt_tokens_details.cached_tokens > 0
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0

    # Without include_usage there is no usage chunk, and still a final [DONE].
    events = raw_events(server, "/v1/chat/completions", {**body, "stream_options": None})
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] for e in events[:-1])


def test_completions_whole_and_streamed(server: SluiceServer, client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=8
    )
    assert whole.id.startswith("cmpl-")
    assert whole.object == "text_completion"
    choice = whole.choices[0]
    assert choice.text == generate(server, prompt, max_new_tokens=8)["generated_text"]
    assert choice.text.strip()
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.completion_tokens <= 8

    chunks = list(
        client.completions.create(
            model=DEFAULT_MODEL, prompt=[prompt], temperature=0, max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    events = raw_events(
        server,
        "/v1/completions",
        {"prompt": prompt, "temperature": 0, "max_tokens": 8, "stream": True},
    )
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "text_completion"


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    plain = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=6
    )
    echoed = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=6, echo=True
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.prompt_tokens == plain.usage.prompt_tokens
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    streamed = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, temperature=0, max_tokens=6, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_a_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL_QUESTION, temperature=0, max_tokens=30
    )
    full_text = full.choices[0].message.content
    stop = "Paris"
    assert stop in full_text
    expected = full_text[: full_text.index(stop)]
    stopped = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=CAPITAL_QUESTION, temperature=0, max_tokens=30, stop=stop
    )
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < full.usage.completion_tokens
    # Streamed, none of the stop sequence is sent, though its tokens were generated.
    chunks = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=CAPITAL_QUESTION,
        temperature=0,
        max_tokens=30,
        stop=[stop, "unlikely stop"],
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_a_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour and say why you like it."}]

    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, temperature=1.0, max_tokens=24, seed=seed
        )
        return response.choices[0].message.content

    first = sample(1234)
    assert first == sample(1234)
    # Sampling does happen: some other seed gives another answer.
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_frequency_and_presence_penalties_change_a_repetitive_answer(
    client: openai.OpenAI,
) -> None:
    """Greedy, so only the penalties differ; out of OpenAI's range [-2, 2] is a 422."""
    messages = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]

    def answer(**penalties: float) -> str:
        response = client.chat.completions.create(
            model="m", messages=messages, max_tokens=40, temperature=0, **penalties
        )
        return response.choices[0].message.content

    plain = answer()
    assert answer(frequency_penalty=2.0) != plain
    assert answer(presence_penalty=2.0) != plain
    with pytest.raises(openai.UnprocessableEntityError, match="frequency_penalty"):
        answer(frequency_penalty=3.0)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL]
    assert models[0].object == "model"
    assert models[0].owned_by == "sluice"
    assert models[0].created > 1_600_000_000


def test_the_client_raises_422_naming_a_refused_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=CAPITAL_QUESTION, logit_bias={"5": -100}
        )
    error = raised.value
    assert error.status_code == 422
    body = error.body.get("error", error.body)
    assert body["param"] == "logit_bias"
    assert body["type"] == "invalid_request_error"
    assert "`logit_bias` is not supported yet" in body["message"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": CAPITAL_QUESTION, "tools": [{"type": "function"}]},
            "tools",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages",
        ),
        ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, "suffix"),
        ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": -100}}, "logit_bias"),
        ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ],
    ids=["tools", "image", "suffix", "logit_bias", "token-ids"],
)
def test_refusals_use_openais_error_shape(
    server: SluiceServer, route: str, body: dict, param: str
) -> None:
    response = requests.post(f"{server.url}{route}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert "not supported yet" in error["message"]


def test_invalid_values_and_malformed_json(server: SluiceServer) -> None:
    response = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": CAPITAL_QUESTION, "temperature": -1},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    assert "temperature" in response.json()["error"]["message"]

    response = requests.post(
        f"{server.url}/v1/chat/completions",
        data=b'{"messages": [',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    # The server keeps serving.
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
