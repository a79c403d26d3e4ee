"""Schemathesis against Sluice's own OpenAPI document (`/api-doc/openapi.json`): requests
generated from each route's request schema must never get a 5xx, and every answer must have a
documented status, content type and body. Then the server must still answer normally.

The server's token limits are small, so a generated request that asks for no length limit still
generates few tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from conftest import SluiceServer, serve
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    yield from serve("--max-input-tokens", "48", "--max-total-tokens", "64")


@pytest.fixture(scope="module")
def api_schema(server: SluiceServer):
    return schemathesis.openapi.from_url(f"{server.url}/api-doc/openapi.json")


# Every operation the document describes; the first test checks the list is complete.
OPERATIONS = [
    ("POST", "/"),
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/tokenize"),
    ("POST", "/chat_tokenize"),
    ("POST", "/invocations"),
    ("GET", "/health"),
    ("GET", "/info"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]


def test_the_served_document_is_the_printed_one_and_docs_shows_it(server: SluiceServer) -> None:
    served = requests.get(f"{server.url}/api-doc/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.headers["content-type"] == "application/json"
    router = shutil.which("sluice-router")
    assert router is not None, "sluice-router is not on PATH: run `make install` first"
    printed = subprocess.run([router, "print-schema"], capture_output=True, text=True, check=True)
    assert served.json() == json.loads(printed.stdout)
    page = requests.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'url: "api-doc/openapi.json"' in page.text


def test_the_document_lists_every_operation(api_schema) -> None:
    documented = [result.ok() for result in api_schema.get_all_operations()]
    assert sorted((op.method.upper(), op.path) for op in documented) == sorted(OPERATIONS)


# Hypothesis drives schemathesis' strategies directly: schemathesis' own pytest integration
# (`from_fixture`) does not run under this pytest version.
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_documented_answers(api_schema, method: str, path: str) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_within_the_document(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=120)

    answers_within_the_document()


def test_the_server_still_generates_after_the_fuzzing(server: SluiceServer) -> None:
    response = requests.post(
        f"{server.url}/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"]
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
