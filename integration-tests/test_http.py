"""The router's HTTP edges end to end: `/tokenize` and `/chat_tokenize`, SageMaker's
`/invocations`, TGI's `x-*` response headers, `--api-key`, `--payload-limit`, the statuses of
bodies that cannot be read, and `--cors-allow-origin`. One server runs with a key and one
allowed origin; real clients (`text-generation`, `openai`) show the key at work."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from conftest import DEFAULT_MODEL, SluiceServer, serve
from text_generation import Client
from text_generation.errors import UnknownError
from tokenizers import Tokenizer

API_KEY = "sluice-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ALLOWED_ORIGIN = "https://allowed.example"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--api-key", API_KEY,
        "--cors-allow-origin", ALLOWED_ORIGIN,
    )
    # fmt: on


@pytest.fixture(scope="module")
def tokenizer(server: SluiceServer) -> Tokenizer:
    """The model's own tokenizer.json, through Hugging Face's `tokenizers` library."""
    cache = Path(os.environ.get("SLUICE_CACHE", Path.home() / ".cache" / "sluice"))
    return Tokenizer.from_file(str(cache / "models" / "SmolLM2-135M-Instruct" / "tokenizer.json"))


def post(server: SluiceServer, route: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}{route}", json=body, headers=AUTH, timeout=300, **kwargs)


def expected_tokens(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[dict]:
    """What `/tokenize` should answer: `tokenizers` gives character offsets, the route bytes."""
    encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    data = text.encode()
    tokens = []
    for id_, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True):
        byte_start, byte_stop = len(text[:start].encode()), len(text[:stop].encode())
        piece = data[byte_start:byte_stop].decode()
        tokens.append({"id": id_, "text": piece, "start": byte_start, "stop": byte_stop})
    return tokens


def test_tokenize_matches_the_tokenizers_library(
    server: SluiceServer, tokenizer: Tokenizer
) -> None:
    text = "Héllo wörld, 日本語 café!"
    response = post(server, "/tokenize", {"inputs": text, "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens == expected_tokens(tokenizer, text, add_special_tokens=True)
    # Byte offsets: the multi-byte characters push the last token past the character count.
    assert tokens[-1]["stop"] == len(text.encode()) > len(text)
    # The same tokens a generation runs on.
    details = post(
        server,
        "/generate_stream",
        {"inputs": text, "parameters": {"max_new_tokens": 1, "details": True}},
    ).text
    last = json.loads(details.strip().splitlines()[-1][len("data:") :])
    assert last["details"]["input_length"] == len(tokens)


def test_tokenize_refuses_empty_input(server: SluiceServer) -> None:
    response = post(server, "/tokenize", {"inputs": ""})
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"


def test_chat_tokenize_renders_the_chat_template(
    server: SluiceServer, tokenizer: Tokenizer, chat_prompt
) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    response = post(server, "/chat_tokenize", {"model": DEFAULT_MODEL, "messages": messages})
    assert response.status_code == 200, response.text
    answer = response.json()
    # As `transformers` renders the model's template, and tokenized without added special
    # tokens, as a chat prompt is.
    assert answer["templated_text"] == chat_prompt(QUESTION)
    assert answer["tokenize_response"] == expected_tokens(
        tokenizer, answer["templated_text"], add_special_tokens=False
    )
    usage = post(
        server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1, "temperature": 0}
    ).json()["usage"]
    assert usage["prompt_tokens"] == len(answer["tokenize_response"])


def test_invocations_answers_each_kind_of_body_like_its_own_route(server: SluiceServer) -> None:
    generate_body = {"inputs": "The sky is", "parameters": {"max_new_tokens": 8}}
    invoked = post(server, "/invocations", generate_body)
    assert invoked.status_code == 200, invoked.text
    assert invoked.json() == post(server, "/", generate_body).json()
    assert invoked.json()[0]["generated_text"]
    assert invoked.headers["x-generated-tokens"] == "8"

    chat_body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "temperature": 0,
    }
    invoked = post(server, "/invocations", chat_body)
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["object"] == "chat.completion"
    direct = post(server, "/v1/chat/completions", chat_body).json()
    assert invoked.json()["choices"] == direct["choices"]
    assert "Paris" in direct["choices"][0]["message"]["content"]

    completion_body = {"prompt": "The sky is", "max_tokens": 8, "temperature": 0}
    invoked = post(server, "/invocations", completion_body)
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["object"] == "text_completion"
    direct = post(server, "/v1/completions", completion_body).json()
    assert invoked.json()["choices"] == direct["choices"]

    # Errors come in the shape of the route the body belongs to.
    refused = post(server, "/invocations", {**chat_body, "logit_bias": {"5": -100}})
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "logit_bias"
    assert post(server, "/invocations", {"text": "?"}).status_code == 422


def test_tgi_headers_report_what_the_generation_cost(server: SluiceServer) -> None:
    inputs = "Write one sentence about rivers."
    response = post(
        server,
        "/generate",
        {"inputs": inputs, "parameters": {"max_new_tokens": 12, "details": True}},
    )
    assert response.status_code == 200, response.text
    headers = response.headers
    details = response.json()["details"]
    info = requests.get(f"{server.url}/info", timeout=30).json()
    assert headers["x-compute-type"] == info["model_device_type"]
    assert int(headers["x-generated-tokens"]) == details["generated_tokens"]
    assert int(headers["x-prompt-tokens"]) == len(
        post(server, "/tokenize", {"inputs": inputs}).json()
    )
    assert int(headers["x-compute-characters"]) == len(inputs)
    total = int(headers["x-total-time"])
    parts = [int(headers[f"x-{part}-time"]) for part in ("validation", "queue", "inference")]
    # The parts add up to the total, each rounded down to a millisecond.
    assert sum(parts) <= total <= sum(parts) + 2
    assert parts[2] > 0
    assert int(headers["x-time-per-token"]) == parts[2] // details["generated_tokens"]
    assert abs(float(headers["x-compute-time"]) * 1000 - total) < 1

    compat = post(server, "/", {"inputs": inputs, "parameters": {"max_new_tokens": 3}})
    assert compat.headers["x-generated-tokens"] == "3"

    with post(
        server,
        "/generate_stream",
        {"inputs": inputs, "parameters": {"max_new_tokens": 3}},
        stream=True,
    ) as streamed:
        # Sent with the first bytes, before anything is generated.
        assert streamed.headers["x-compute-type"] == info["model_device_type"]
        assert streamed.headers["x-prompt-tokens"] == headers["x-prompt-tokens"]
        assert streamed.headers["x-compute-characters"] == str(len(inputs))
        assert streamed.headers["x-accel-buffering"] == "no"
        assert "x-generated-tokens" not in streamed.headers
        assert len([line for line in streamed.iter_lines() if line]) == 3


def test_the_api_key_is_required_except_for_monitoring(server: SluiceServer) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = requests.post(f"{server.url}/generate", json=body, headers=headers, timeout=60)
        assert response.status_code == 401, response.text
        assert response.json()["error_type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = requests.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    for route in ("/tokenize", "/chat_tokenize", "/invocations", "/generate_stream", "/"):
        assert requests.post(f"{server.url}{route}", json=body, timeout=60).status_code == 401
    assert requests.get(f"{server.url}/v1/models", timeout=60).status_code == 401

    for route in ("/health", "/info", "/metrics"):
        assert requests.get(f"{server.url}{route}", timeout=60).status_code == 200, route
    assert post(server, "/generate", body).status_code == 200


def test_real_clients_work_with_the_key(server: SluiceServer) -> None:
    client = Client(server.url, headers=AUTH, timeout=300)
    answer = client.generate("The sky is", max_new_tokens=4)
    assert answer.details.generated_tokens == 4
    with pytest.raises(UnknownError, match="Unauthorized"):
        Client(server.url, timeout=300).generate("The sky is", max_new_tokens=4)

    openai_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    completion = openai_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=12,
    )
    assert "Paris" in completion.choices[0].message.content
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"


def test_a_body_over_the_payload_limit_is_a_413(server: SluiceServer) -> None:
    body = json.dumps({"inputs": "a" * 3_000_000}).encode()
    for route, shape in (("/generate", "tgi"), ("/v1/completions", "openai")):
        response = requests.post(
            f"{server.url}{route}",
            data=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=120,
        )
        assert response.status_code == 413, response.text
        error = response.json()
        assert "too large" in (error["error"] if shape == "tgi" else error["error"]["message"])
    assert post(server, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}).ok


@pytest.mark.parametrize(
    "route",
    [
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/",
        "/invocations",
        "/v1/chat/completions",
        "/v1/completions",
    ],
)
@pytest.mark.parametrize(
    "content_type, body, status",
    [
        ("text/plain", b'{"inputs": "Hi"}', 415),
        ("application/json", b"{bad json", 400),
        ("application/json", b'{"inputs": 5, "messages": 5, "prompt": 5}', 422),
    ],
    ids=["415-text-plain", "400-not-json", "422-wrong-type"],
)
def test_each_unreadable_body_has_its_status_on_every_route(
    server: SluiceServer, route: str, content_type: str, body: bytes, status: int
) -> None:
    response = requests.post(
        f"{server.url}{route}",
        data=body,
        headers={**AUTH, "Content-Type": content_type},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()
    if route.startswith("/v1/"):
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"]
    else:
        assert error["error_type"] == "validation"
        assert error["error"]


def test_cors_preflight_allows_only_the_configured_origin(server: SluiceServer) -> None:
    def preflight(origin: str) -> requests.Response:
        return requests.options(
            f"{server.url}/generate",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
            timeout=60,
        )

    allowed = preflight(ALLOWED_ORIGIN)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()

    other = preflight("https://other.example")
    assert "access-control-allow-origin" not in other.headers

    # A real request from the allowed origin, and a 401 a browser can read.
    answer = requests.post(
        f"{server.url}/tokenize",
        json={"inputs": "Hi"},
        headers={**AUTH, "Origin": ALLOWED_ORIGIN},
        timeout=60,
    )
    assert answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    refused = requests.post(
        f"{server.url}/tokenize",
        json={"inputs": "Hi"},
        headers={"Origin": ALLOWED_ORIGIN},
        timeout=60,
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
