"""OpenTelemetry tracing of the shard: a tracer that exports spans over OTLP/gRPC when given an
endpoint, and a no-op one otherwise (spans are then never recorded, so serving pays nothing).

The router sends each step's W3C trace context (`traceparent`, `tracestate`) in the
StepRequest's `trace_context`, and a call's in its gRPC metadata; `parent_context` turns either
into the parent of the shard's spans.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# What TGI's shards call themselves, so that dashboards built for TGI find the shard.
DEFAULT_SERVICE_NAME = "text-generation-inference.server"
RANK_ATTRIBUTE = "sluice.rank"
# Seconds one export may take; a collector that is down must not hold up the shard's exit long.
EXPORT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Tracing:
    tracer: trace.Tracer
    # Exports the spans still buffered, then stops the exporter; for when the server stops.
    shutdown: Callable[[], None]


def setup_tracing(endpoint: str | None, service_name: str, rank: int) -> Tracing:
    """A tracer exporting to the OTLP/gRPC collector at `endpoint` (e.g.
    http://127.0.0.1:4317), or a no-op tracer without one. The process's global tracer
    provider is left alone."""
    if endpoint is None:
        return Tracing(tracer=trace.NoOpTracer(), shutdown=lambda: None)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: service_name, RANK_ATTRIBUTE: rank})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(tracer=provider.get_tracer("sluice_server"), shutdown=provider.shutdown)


def parent_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The trace context in `metadata` (a call's gRPC metadata, or a step's `trace_context`
    items); an empty context (the span starts a trace of its own) when it holds none."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return TraceContextTextMapPropagator().extract(carrier)
