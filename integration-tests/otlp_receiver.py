"""A small OTLP/gRPC trace collector for tests: it keeps every span exported to it.

    with OtlpReceiver() as receiver:
        ... run something with --otlp-endpoint receiver.endpoint ...
        spans = receiver.wait_for(lambda spans: any(s.name == "step" for s in spans))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


@dataclass(frozen=True)
class ReceivedSpan:
    service_name: str
    name: str
    # Lowercase hex, as in a traceparent header.
    trace_id: str
    span_id: str
    # "" for a root span.
    parent_span_id: str
    # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED".
    kind: str
    attributes: dict[str, Any]
    # The exporting process's resource (service.name and the like).
    resource_attributes: dict[str, Any]
    start_ns: int
    end_ns: int
    # "UNSET", "OK" or "ERROR", and the error's description.
    status: str = "UNSET"
    status_message: str = ""


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_value(item) for item in value.array_value.values]
    if field == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, field)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, on_spans: Callable[[list[ReceivedSpan]], None]) -> None:
        self.on_spans = on_spans

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service_name=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                            attributes=_attributes(span.attributes),
                            resource_attributes=resource,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            status=Status.StatusCode.Name(span.status.code).removeprefix(
                                "STATUS_CODE_"
                            ),
                            status_message=span.status.message,
                        )
                    )
        self.on_spans(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC collector on 127.0.0.1 and a free port, while the `with` block runs."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._received = threading.Condition()
        self._server: grpc.Server | None = None
        self.endpoint = ""

    def __enter__(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _TraceService(self._add), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._received:
            self._spans.extend(spans)
            self._received.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in order of arrival."""
        with self._received:
            return list(self._spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans received, once `predicate` holds for them; AssertionError, listing what
        did arrive, after `timeout` seconds without."""
        deadline = time.monotonic() + timeout
        with self._received:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [(span.service_name, span.name) for span in self._spans]
                    raise AssertionError(
                        f"no span export met the condition within {timeout} s; received: {names}"
                    )
                self._received.wait(remaining)
            return list(self._spans)
