"""Wire compatibility: Sluice's live answers validated against the schemas TGI and OpenAI publish
(copies in schemas/, see schemas/README.md), so an answer their clients would not expect fails
here. Extra fields (Sluice's extensions, such as `cached_tokens`) pass: neither schema forbids
additional properties on the objects checked."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import requests
from conftest import SluiceServer

SCHEMAS = Path(__file__).parent / "schemas"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def as_json_schema(node):
    """OpenAPI 3.0's schema dialect as JSON Schema: `nullable: true` becomes a `null` type (and
    a `null` among an enum's values); everything else it uses means the same in both."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is not True:
        return converted
    if "type" in converted:
        converted["type"] = [converted["type"], "null"]
        if "enum" in converted:
            converted["enum"] = [*converted["enum"], None]
        return converted
    # A `$ref` or a composition: null, or what it describes.
    return {"anyOf": [converted, {"type": "null"}]}


@cache
def document(name: str) -> dict:
    return as_json_schema(json.loads((SCHEMAS / name).read_text()))


def validator(document_name: str, component: str, patch=None) -> jsonschema.Validator:
    """Validates against one component schema of a document (which its `$ref`s resolve in);
    `patch` may edit a copy of the document first."""
    root = copy.deepcopy(document(document_name))
    if patch is not None:
        patch(root["components"]["schemas"])
    root["$ref"] = f"#/components/schemas/{component}"
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(root)


def assert_valid(document_name: str, component: str, instance, patch=None) -> None:
    errors = list(validator(document_name, component, patch).iter_errors(instance))
    assert not errors, f"{component}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors
    ) + f"\nin {json.dumps(instance)[:2000]}"


def tgi(component: str, instance) -> None:
    assert_valid("tgi-openapi.json", component, instance)


def openai(component: str, instance, patch=None) -> None:
    assert_valid("openai-openapi.json", component, instance, patch)


def post(server: SluiceServer, route: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{route}", json=body, timeout=300)


def events(server: SluiceServer, route: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed answer, in either spelling (`data:` or `data: `)."""
    with requests.post(f"{server.url}{route}", json=body, stream=True, timeout=300) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data:") for line in lines), lines
    return [line[len("data:") :].strip() for line in lines]


def test_the_schemas_reject_what_their_clients_would_not_read() -> None:
    """The checks below can fail: the loaded schemas refuse a missing required field, a null
    where none is allowed, and a wrong type."""
    answer = {"generated_text": "x", "details": None}
    tgi("GenerateResponse", answer)
    with pytest.raises(AssertionError, match="generated_text"):
        tgi("GenerateResponse", {"details": None})
    message = {"role": "assistant", "content": "Paris", "refusal": None}
    openai("ChatCompletionResponseMessage", message)
    with pytest.raises(AssertionError, match="refusal"):
        openai("ChatCompletionResponseMessage", {"role": "assistant", "content": "Paris"})
    with pytest.raises(AssertionError, match="None is not of type 'string'"):
        openai("Model", {"id": None, "object": "model", "created": 1, "owned_by": "sluice"})
    with pytest.raises(AssertionError, match="'1' is not of type 'integer'"):
        tgi("Token", {"id": "1", "text": "a", "logprob": -1.0, "special": False})


# TGI's routes


@pytest.mark.parametrize("details", [False, True])
def test_generate_matches_tgis_schema(server: SluiceServer, details: bool) -> None:
    parameters = {"max_new_tokens": 5, "details": details}
    response = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    tgi("GenerateResponse", body)
    assert ("details" in body) == details
    if details:
        assert len(body["details"]["tokens"]) == body["details"]["generated_tokens"] == 5


def test_sampled_generate_with_a_seed_matches_tgis_schema(server: SluiceServer) -> None:
    parameters = {"max_new_tokens": 3, "details": True, "do_sample": True, "seed": 7}
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters}).json()
    tgi("GenerateResponse", body)
    assert body["details"]["seed"] == 7


def test_details_with_prefill_top_tokens_and_best_of_match_tgis_schema(
    server: SluiceServer,
) -> None:
    parameters = {
        "max_new_tokens": 4,
        "details": True,
        "decoder_input_details": True,
        "top_n_tokens": 2,
    }
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters}).json()
    tgi("GenerateResponse", body)
    assert body["details"]["prefill"][0]["logprob"] is None
    assert len(body["details"]["top_tokens"]) == 4
    parameters = {"max_new_tokens": 4, "details": True, "best_of": 2, "do_sample": True}
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters}).json()
    tgi("GenerateResponse", body)
    assert len(body["details"]["best_of_sequences"]) == 1


def test_the_compat_route_answers_a_list_of_generate_responses(server: SluiceServer) -> None:
    response = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    tgi("GenerateResponse", body[0])


def test_every_generate_stream_event_matches_tgis_schema(server: SluiceServer) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}
    payloads = [json.loads(data) for data in events(server, "/generate_stream", body)]
    assert len(payloads) == 6
    for event in payloads:
        tgi("StreamResponse", event)
    assert all(event["details"] is None for event in payloads[:-1])
    assert payloads[-1]["details"]["generated_tokens"] == 6
    body["parameters"]["top_n_tokens"] = 2
    for data in events(server, "/generate_stream", body):
        event = json.loads(data)
        tgi("StreamResponse", event)
        assert len(event["top_tokens"]) == 2


def test_info_matches_tgis_schema(server: SluiceServer) -> None:
    response = requests.get(f"{server.url}/info", timeout=30)
    assert response.status_code == 200
    tgi("Info", response.json())


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/"])
def test_tgi_errors_match_tgis_schema(server: SluiceServer, route: str) -> None:
    invalid = post(server, route, {"inputs": PROMPT, "parameters": {"temperature": -1.0}})
    assert invalid.status_code == 422
    tgi("ErrorResponse", invalid.json())
    unparsable = requests.post(
        f"{server.url}{route}",
        data="{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= unparsable.status_code < 500
    tgi("ErrorResponse", unparsable.json())


# OpenAI's routes


def test_completion_matches_openais_schema(server: SluiceServer) -> None:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    openai("CreateCompletionResponse", answer)
    assert answer["usage"]["completion_tokens"] == 5


def echoed_prompts_first_token_is_unscored(schemas: dict) -> None:
    """With `echo` and `logprobs`, nothing predicts the prompt's first token and no alternatives
    are computed for prompt tokens: OpenAI's API answers null there (the legacy completions'
    behaviour, which its spec leaves out), and so does Sluice."""
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    logprobs = choice["properties"]["logprobs"]["properties"]
    logprobs["token_logprobs"]["items"]["type"] = ["number", "null"]
    logprobs["top_logprobs"]["items"]["type"] = ["object", "null"]


def test_completion_logprobs_n_and_several_prompts_match_openais_schema(
    server: SluiceServer,
) -> None:
    body = {"model": "m", "prompt": [PROMPT, "Hi"], "max_tokens": 3, "logprobs": 2, "n": 2}
    answer = post(server, "/v1/completions", body).json()
    openai("CreateCompletionResponse", answer)
    assert len(answer["choices"]) == 4
    assert len(answer["choices"][0]["logprobs"]["top_logprobs"][0]) == 2
    echoed = post(server, "/v1/completions", {**body, "echo": True, "n": 1}).json()
    openai("CreateCompletionResponse", echoed, patch=echoed_prompts_first_token_is_unscored)
    assert echoed["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_chat_logprobs_and_n_match_openais_schema(server: SluiceServer) -> None:
    body = {
        "model": "m",
        "messages": CHAT,
        "max_tokens": 4,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
    }
    answer = post(server, "/v1/chat/completions", body).json()
    openai("CreateChatCompletionResponse", answer)
    assert [choice["index"] for choice in answer["choices"]] == [0, 1]
    for data in events(server, "/v1/chat/completions", {**body, "stream": True})[:-1]:
        openai("CreateChatCompletionStreamResponse", json.loads(data))


def completion_chunks_may_be_unfinished(schemas: dict) -> None:
    """OpenAI's spec describes a streamed completion's chunks with the whole answer's schema,
    whose `finish_reason` cannot be null; yet OpenAI's API sends null until the last chunk (its
    Python client types it optional), and so does Sluice."""
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    finish_reason = choice["properties"]["finish_reason"]
    finish_reason["type"] = [finish_reason["type"], "null"]
    finish_reason["enum"] = [*finish_reason["enum"], None]


def test_every_completion_chunk_matches_openais_schema(server: SluiceServer) -> None:
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = events(server, "/v1/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(data) for data in payloads[:-1]]
    for chunk in chunks:
        openai("CreateCompletionResponse", chunk, patch=completion_chunks_may_be_unfinished)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    # Only the unfinished chunks need the spec's gap.
    finished = [
        chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]
    ]
    assert len(finished) == 1
    openai("CreateCompletionResponse", finished[0])


def test_chat_completion_matches_openais_schema(server: SluiceServer) -> None:
    body = {"model": "m", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    openai("CreateChatCompletionResponse", answer)
    assert answer["choices"][0]["message"]["content"]


def test_every_chat_chunk_matches_openais_schema(server: SluiceServer) -> None:
    body = {
        "model": "m",
        "messages": CHAT,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = events(server, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(data) for data in payloads[:-1]]
    assert len(chunks) >= 3  # the role, some text, the usage
    for chunk in chunks:
        openai("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_models_match_openais_schema(server: SluiceServer) -> None:
    response = requests.get(f"{server.url}/v1/models", timeout=30)
    assert response.status_code == 200
    openai("ListModelsResponse", response.json())


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_openai_errors_match_openais_schema(server: SluiceServer, route: str) -> None:
    body = {"model": "m", "prompt": PROMPT, "messages": CHAT, "logit_bias": {"5": -100}}
    refused = post(server, route, body)
    assert refused.status_code == 422
    openai("ErrorResponse", refused.json())
    assert refused.json()["error"]["param"] == "logit_bias"
    unparsable = requests.post(
        f"{server.url}{route}",
        data="{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert unparsable.status_code == 400
    openai("ErrorResponse", unparsable.json())
