"""OpenTelemetry traces from the shard, received by a real OTLP/gRPC collector: a step continues
the trace its request carries, and nothing is exported without --otlp-endpoint."""

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from opentelemetry.trace import SpanKind
from sluice_server.engine.step import StepExecutor
from sluice_server.models.loader import LoadedModel
from sluice_server.pb import generate_pb2 as pb
from sluice_server.pb import generate_pb2_grpc as pb_grpc
from sluice_server.service import TextGenerationServicer
from sluice_server.tracing import setup_tracing
from test_service import SERVER_SOURCE_DIR, WARMUP, first_step, serving, wait_until_healthy

# What the router's span would send: its trace, its span, sampled.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ROUTER_SPAN_ID = "00f067aa0ba902b7"
TRACE_CONTEXT = {"traceparent": f"00-{TRACE_ID}-{ROUTER_SPAN_ID}-01"}


def with_trace_context(step: pb.StepRequest) -> pb.StepRequest:
    """`step` carrying the router's trace context, as the router sends it."""
    step.trace_context.update(TRACE_CONTEXT)
    return step


def _load_receiver() -> ModuleType:
    """integration-tests/otlp_receiver.py, which the end-to-end tests share."""
    if "otlp_receiver" in sys.modules:
        return sys.modules["otlp_receiver"]
    path = Path(__file__).resolve().parents[2] / "integration-tests" / "otlp_receiver.py"
    spec = importlib.util.spec_from_file_location("otlp_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["otlp_receiver"] = module  # Its dataclasses look their module up by name.
    spec.loader.exec_module(module)
    return module


OtlpReceiver = _load_receiver().OtlpReceiver


def one_span(spans: list, name: str, trace_id: str) -> object:
    matching = [span for span in spans if span.name == name and span.trace_id == trace_id]
    assert len(matching) == 1, [(span.name, span.trace_id) for span in spans]
    return matching[0]


def assert_step_tree(spans: list, trace_id: str, parent_span_id: str, service_name: str) -> None:
    """One `step` span of the trace under `parent_span_id`, its `forward` and `sample` spans
    under it, in order, all from `service_name` on rank 0."""
    step = one_span(spans, "step", trace_id)
    assert step.parent_span_id == parent_span_id
    assert step.kind == "SERVER"
    assert (step.service_name, step.resource_attributes["sluice.rank"]) == (service_name, 0)
    assert step.attributes == {
        "sluice.rank": 0,
        "sluice.new_requests": 1,
        "sluice.scheduled_requests": 1,
        "sluice.freed_requests": 0,
        "sluice.tokens": 5,
        "sluice.generations": 1,
    }
    forward = one_span(spans, "forward", trace_id)
    sample = one_span(spans, "sample", trace_id)
    assert forward.parent_span_id == sample.parent_span_id == step.span_id
    assert forward.attributes == {"sluice.sequences": 1, "sluice.tokens": 5}
    assert sample.attributes == {"sluice.sequences": 1}
    assert step.start_ns <= forward.start_ns < forward.end_ns <= sample.start_ns
    assert sample.start_ns < sample.end_ns <= step.end_ns


def test_a_step_continues_the_trace_in_its_request(tmp_path: Path, tiny_loaded: LoadedModel):
    socket_path = tmp_path / "shard.sock"
    with OtlpReceiver() as receiver:
        tracing = setup_tracing(receiver.endpoint, "shard-under-test", rank=0)
        executor = StepExecutor(tiny_loaded, 4, 2**20, tracing.tracer)
        servicer = TextGenerationServicer(executor)

        async def scenario() -> None:
            async with serving(servicer, socket_path) as stub:
                await stub.Warmup(WARMUP)
                # Over the stream, as the router sends steps.
                steps = stub.Steps()
                await steps.write(with_trace_context(first_step(0)))
                await steps.read()
                await steps.done_writing()
                # Without trace context: a trace of the shard's own.
                await stub.Step(first_step(1))

        asyncio.run(scenario())
        # Exported now rather than on the batch processor's timer.
        tracing.shutdown()
        spans = receiver.spans()

    assert_step_tree(spans, TRACE_ID, ROUTER_SPAN_ID, "shard-under-test")
    own_trace = {span.trace_id for span in spans if span.name == "step"} - {TRACE_ID}
    assert len(own_trace) == 1
    assert_step_tree(spans, own_trace.pop(), "", "shard-under-test")
    warmup = [span for span in spans if span.name == "warmup"]
    assert len(warmup) == 1 and warmup[0].parent_span_id == ""
    assert warmup[0].attributes["sluice.max_prefill_tokens"] == WARMUP.max_prefill_tokens
    assert warmup[0].attributes["sluice.num_blocks"] > 0
    assert len(spans) == 7


def test_without_an_endpoint_spans_are_not_recorded() -> None:
    tracing = setup_tracing(None, "unused", rank=0)
    with tracing.tracer.start_as_current_span("step", kind=SpanKind.SERVER) as span:
        assert not span.is_recording()
    tracing.shutdown()


@pytest.mark.parametrize("traced", [True, False], ids=["with-endpoint", "without-endpoint"])
def test_serve_exports_spans_only_when_given_an_endpoint(
    tmp_path: Path, tiny_llama, traced: bool
) -> None:
    model_dir, _reference = tiny_llama
    socket_path = tmp_path / "shard.sock"
    with OtlpReceiver() as receiver:
        tracing_flags = ["--otlp-endpoint", receiver.endpoint] if traced else []
        tracing_flags += ["--otlp-service-name", "sluice-test-shard"]
        # fmt: off
        command = [
            sys.executable, "-m", "sluice_server", "serve", str(model_dir),
            "--uds-path", str(socket_path),
            "--kv-cache-memory", "1MB",
            "--dtype", "float32",
            "--kernels", "reference",
            *tracing_flags,
        ]
        # fmt: on
        env = {
            **os.environ,
            "PYTHONPATH": str(SERVER_SOURCE_DIR),
            # Were the shard to fall back on OpenTelemetry's own configuration, its spans would
            # reach the receiver this way.
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
        }
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_until_healthy(process, socket_path)
            with grpc.insecure_channel(f"unix://{socket_path}") as channel:
                stub = pb_grpc.TextGenerationServiceStub(channel)
                stub.Warmup(WARMUP)
                response = stub.Step(with_trace_context(first_step(0)))
                assert [generation.id for generation in response.generations] == [0]
            process.send_signal(signal.SIGTERM)
            _stdout, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
        assert process.returncode == 0, stderr
        # Read as the process exits: what it buffered must have been flushed on the way out.
        spans = receiver.spans()

    if traced:
        assert_step_tree(spans, TRACE_ID, ROUTER_SPAN_ID, "sluice-test-shard")
        assert {span.name for span in spans} == {"warmup", "step", "forward", "sample"}
    else:
        assert spans == []


def test_a_failed_step_is_recorded_on_its_span(tmp_path: Path, tiny_loaded: LoadedModel):
    socket_path = tmp_path / "shard.sock"
    with OtlpReceiver() as receiver:
        tracing = setup_tracing(receiver.endpoint, "shard-under-test", rank=0)
        servicer = TextGenerationServicer(StepExecutor(tiny_loaded, 4, 2**20, tracing.tracer))

        async def scenario() -> None:
            async with serving(servicer, socket_path) as stub:
                with pytest.raises(grpc.aio.AioRpcError):
                    # Before Warmup.
                    await stub.Step(with_trace_context(first_step(0)))

        asyncio.run(scenario())
        tracing.shutdown()
        spans = receiver.spans()

    step = one_span(spans, "step", TRACE_ID)
    assert step.status == "ERROR"
    assert "Step before Warmup" in step.status_message
    assert {span.name for span in spans} == {"step"}
