"""Traces end to end: the real launcher with `--otlp-endpoint` pointing at an OTLP/gRPC receiver
run by the test. One request's spans from the router and the shard form one tree, under the
caller's `traceparent`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from conftest import SluiceServer, serve
from otlp_receiver import OtlpReceiver, ReceivedSpan
from text_generation import Client

ROUTER = "text-generation-inference.router"
SHARD = "text-generation-inference.server"
NEW_TOKENS = 3
EXPORT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def server(receiver: OtlpReceiver) -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", "256",
        "--max-total-tokens", "512",
        "--otlp-endpoint", receiver.endpoint,
    )
    # fmt: on


def render(spans: list[ReceivedSpan], parent_id: str, depth: int = 0) -> list[str]:
    """The tree under `parent_id`, one indented line per span, in start order."""
    lines = []
    children = sorted((s for s in spans if s.parent_span_id == parent_id), key=lambda s: s.start_ns)
    for span in children:
        lines.append(f"{'  ' * depth}{span.name} [{span.service_name}]")
        lines.extend(render(spans, span.span_id, depth + 1))
    return lines


def test_one_requests_spans_form_one_tree_across_router_and_shard(
    server: SluiceServer, receiver: OtlpReceiver
) -> None:
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    client = Client(server.url, headers={"traceparent": f"00-{trace_id}-{caller_span_id}-01"})
    response = client.generate("The capital of France is", max_new_tokens=NEW_TOKENS)
    assert response.details.generated_tokens == NEW_TOKENS

    def in_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id]

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = [(s.service_name, s.name) for s in in_trace(spans)]
        return names.count((SHARD, "sample")) >= NEW_TOKENS and (ROUTER, "http_request") in names

    spans = in_trace(receiver.wait_for(complete, EXPORT_TIMEOUT_S))
    tree = "\n".join(render(spans, caller_span_id))
    by_id = {s.span_id: s for s in spans}

    (request,) = [s for s in spans if s.name == "http_request"]
    assert request.service_name == ROUTER
    assert request.parent_span_id == caller_span_id, tree
    # text-generation's client posts to TGI's compatibility route.
    assert request.attributes["url.path"] == "/"
    assert request.attributes["http.response.status_code"] == 200
    for name in ("validation", "queue"):
        (span,) = [s for s in spans if s.name == name]
        assert (span.service_name, span.parent_span_id) == (ROUTER, request.span_id), tree

    router_steps = [s for s in spans if s.service_name == ROUTER and s.name == "step"]
    shard_steps = [s for s in spans if s.service_name == SHARD and s.name == "step"]
    # One prefill step and a decode step for each token after the first.
    assert len(router_steps) == len(shard_steps) == NEW_TOKENS, tree
    assert all(s.parent_span_id == request.span_id for s in router_steps), tree
    for shard_step in shard_steps:
        router_step = by_id[shard_step.parent_span_id]
        assert (router_step.service_name, router_step.name) == (ROUTER, "step"), tree
        children = sorted(
            (s for s in spans if s.parent_span_id == shard_step.span_id), key=lambda s: s.start_ns
        )
        assert [c.name for c in children] == ["forward", "sample"], tree
        assert all(c.service_name == SHARD for c in children), tree
        # The shard's step lies within the router's.
        assert router_step.start_ns <= shard_step.start_ns <= shard_step.end_ns
        assert shard_step.end_ns <= router_step.end_ns
    # The prefill step carries the prompt's tokens, the decodes one each.
    tokens = sorted(int(s.attributes["tokens"]) for s in router_steps)
    assert tokens[:-1] == [1] * (NEW_TOKENS - 1) and tokens[-1] > 1, tree


def test_a_request_without_traceparent_starts_its_own_trace(
    server: SluiceServer, receiver: OtlpReceiver
) -> None:
    Client(server.url).generate("Hello", max_new_tokens=1)

    def roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.name == "http_request" and not s.parent_span_id]

    (root,) = roots(receiver.wait_for(lambda spans: bool(roots(spans)), EXPORT_TIMEOUT_S))
    assert root.service_name == ROUTER
    assert root.kind == "SERVER"
