"""`/metrics` after a known workload, read with prometheus_client's parser: TGI's metric names,
types, labels and histogram buckets (as TGI's router sets them), counts that match the workload,
Sluice's own latency histograms, the Grafana dashboard's queries, and one log line per finished
request."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import SluiceServer, serve
from helpers import generate, stream
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "sluice.json"
MAX_INPUT_TOKENS = 256
MAX_TOTAL_TOKENS = 512
NEW_TOKENS = 5
# TGI's router: durations from 0.15 ms by factors of 1.5 (35 buckets); token counts in 100 steps
# up to the limit; batch sizes 1 to 1024.
DURATION_BUCKETS = [0.0001 * 1.5**power for power in range(1, 36)]
INPUT_LENGTH_BUCKETS = [MAX_INPUT_TOKENS / 100 * step for step in range(1, 101)]
TOKEN_BUCKETS = [MAX_TOTAL_TOKENS / 100 * step for step in range(1, 101)]
BATCH_SIZE_BUCKETS = [float(size) for size in range(1, 1025)]

TYPES = {
    "tgi_request_count": "counter",
    "tgi_request_success": "counter",
    "tgi_request_failure": "counter",
    "tgi_request_duration": "histogram",
    "tgi_request_validation_duration": "histogram",
    "tgi_request_queue_duration": "histogram",
    "tgi_request_inference_duration": "histogram",
    "tgi_request_mean_time_per_token_duration": "histogram",
    "tgi_request_input_length": "histogram",
    "tgi_request_generated_tokens": "histogram",
    "tgi_request_max_new_tokens": "histogram",
    "tgi_queue_size": "gauge",
    "tgi_batch_current_size": "gauge",
    "tgi_batch_current_max_tokens": "gauge",
    "tgi_batch_next_size": "histogram",
    "tgi_batch_inference_count": "counter",
    "tgi_batch_inference_success": "counter",
    "tgi_batch_inference_duration": "histogram",
    "tgi_batch_forward_duration": "histogram",
    "sluice_time_to_first_token_duration": "histogram",
    "sluice_inter_token_latency_duration": "histogram",
    "sluice_kv_blocks_used": "gauge",
    "sluice_prefix_cache_hit_tokens_total": "counter",
    "sluice_preemptions_total": "counter",
}


@pytest.fixture(scope="module")
def server() -> Iterator[SluiceServer]:
    # fmt: off
    yield from serve(
        "--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-total-tokens", str(MAX_TOTAL_TOKENS),
    )
    # fmt: on


def scrape(server: SluiceServer) -> dict:
    """Family name -> family, as prometheus_client parses the page."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {family.name: family for family in text_string_to_metric_families(text)}


STEP_COUNTERS = ("tgi_batch_inference_count", "tgi_batch_inference_success", "sluice_steps_total")


def settled_scrape(server: SluiceServer, timeout: float = 30.0) -> dict:
    """A scrape taken while no step is being recorded: two scrapes 100 ms apart that agree on
    every step counter. With overlapped steps, the step after a request's last token can finish
    after the response, and a scrape between its increments would see `count` ahead of
    `success`."""
    deadline = time.monotonic() + timeout
    previous = scrape(server)
    while True:
        time.sleep(0.1)
        current = scrape(server)
        if all(value(previous, name) == value(current, name) for name in STEP_COUNTERS):
            return current
        assert time.monotonic() < deadline, "the step counters kept changing"
        previous = current


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The sum of a sample over the label sets that match `labels` (0 when absent). The parser
    names every counter's sample `..._total`, whether the page does or not."""
    wanted = sample_name.removesuffix("_total")
    return sum(
        sample.value
        for family in families.values()
        for sample in family.samples
        if sample.name.removesuffix("_total") == wanted and labels.items() <= sample.labels.items()
    )


def buckets(families: dict, name: str) -> list[float]:
    bounds = {
        float(sample.labels["le"])
        for sample in families[name].samples
        if sample.name == f"{name}_bucket"
    }
    return sorted(bounds)


@pytest.fixture(scope="module")
def workload(server: SluiceServer) -> tuple[dict, dict]:
    """Metrics before and after 3 generations, 1 stream and 1 invalid request."""
    before = settled_scrape(server)
    for prompt in ("Hello", "The sky is", "Once upon a time"):
        answer = generate(server, prompt, max_new_tokens=NEW_TOKENS, decoder_input_details=False)
        assert answer["details"]["generated_tokens"] == NEW_TOKENS
    streamed = stream(server, "Count to ten:", max_new_tokens=NEW_TOKENS)
    assert streamed.events[-1]["details"]["generated_tokens"] == NEW_TOKENS
    invalid = requests.post(
        f"{server.url}/generate",
        json={"inputs": "Hello", "parameters": {"temperature": -1.0}},
        timeout=30,
    )
    assert invalid.status_code == 422
    return before, settled_scrape(server)


def test_request_counts_follow_the_workload(workload: tuple[dict, dict]) -> None:
    before, after = workload

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    assert delta("tgi_request_count") == 5
    assert delta("tgi_request_success") == 4
    assert delta("tgi_request_failure", err="validation") == 1
    assert delta("tgi_request_duration_count") == 4
    assert delta("tgi_request_generated_tokens_sum") == 4 * NEW_TOKENS
    assert delta("tgi_request_max_new_tokens_sum") == 4 * NEW_TOKENS
    assert delta("sluice_time_to_first_token_duration_count") == 4
    assert delta("sluice_inter_token_latency_duration_count") == 4 * (NEW_TOKENS - 1)
    assert delta("tgi_batch_inference_count", method="prefill") >= 1
    assert delta("tgi_batch_inference_count", method="decode") >= NEW_TOKENS - 1
    assert delta("tgi_batch_inference_success") == delta("tgi_batch_inference_count")


def test_types_and_labels_are_tgis(workload: tuple[dict, dict]) -> None:
    _, after = workload
    for name, kind in TYPES.items():
        family_name = name.removesuffix("_total") if kind == "counter" else name
        assert family_name in after, name
        assert after[family_name].type == kind, name
    methods = {
        sample.labels.get("method") for sample in after["tgi_batch_inference_duration"].samples
    }
    assert methods == {"prefill", "decode"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tgi_request_duration", DURATION_BUCKETS),
        ("tgi_batch_inference_duration", DURATION_BUCKETS),
        ("sluice_time_to_first_token_duration", DURATION_BUCKETS),
        ("tgi_request_input_length", INPUT_LENGTH_BUCKETS),
        ("tgi_request_generated_tokens", TOKEN_BUCKETS),
        ("tgi_request_max_new_tokens", TOKEN_BUCKETS),
        ("tgi_batch_next_size", BATCH_SIZE_BUCKETS),
    ],
)
def test_histogram_buckets_are_tgis(
    workload: tuple[dict, dict], name: str, expected: list[float]
) -> None:
    _, after = workload
    bounds = buckets(after, name)
    assert bounds[-1] == math.inf
    assert len(bounds) == len(expected) + 1
    for bound, want in zip(bounds, expected, strict=False):
        assert math.isclose(bound, want, rel_tol=1e-9), (name, bound, want)


def test_each_finished_request_is_logged_without_its_text(
    server: SluiceServer, workload: tuple[dict, dict]
) -> None:
    finished = [line for line in server.log_tail(2000).splitlines() if "request finished" in line]
    assert len(finished) >= 4
    assert all(f"generated_tokens={NEW_TOKENS}" in line for line in finished[-4:])
    assert all("queue_ms=" in line and "id=" in line for line in finished[-4:])
    assert not any("Once upon a time" in line for line in finished)


def test_the_grafana_dashboard_reads_metrics_the_server_exports(
    workload: tuple[dict, dict],
) -> None:
    _, after = workload
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\b(?:tgi|sluice)_[a-z_]+", expr)
    }
    exported = {sample.name for family in after.values() for sample in family.samples}
    exported |= set(after)
    assert queried <= exported, queried - exported
