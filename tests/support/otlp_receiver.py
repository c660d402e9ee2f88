"""A real OTLP receiver for tests: gRPC and HTTP/protobuf on 127.0.0.1, decoded with opentelemetry-proto.

It runs in threads, so it serves sync and async tests alike. Spans and
metrics are flattened into plain records with Python attribute values.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in trace_pb2.Span.SpanKind.items()}
TEMPORALITIES = {value: name.removeprefix("AGGREGATION_TEMPORALITY_")
                 for name, value in metrics_pb2.AggregationTemporality.items()}
STATUS_CODES = {value: name.removeprefix("STATUS_CODE_") for name, value in trace_pb2.Status.StatusCode.items()}


@dataclass
class SpanRecord:
    """One received span."""

    name: str
    kind: str                   # SERVER | CLIENT | INTERNAL | ...
    trace_id: str               # 32 hex digits
    span_id: str                # 16 hex digits
    parent_span_id: str         # "" for a root span
    attributes: dict[str, Any]
    status_code: str            # UNSET | OK | ERROR
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    scope: str
    schema_url: str


@dataclass
class PointRecord:
    """One metric data point: value for sums and gauges; count, sum and buckets for histograms."""

    attributes: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)


@dataclass
class MetricRecord:
    """One received metric with its points."""

    name: str
    unit: str
    description: str
    kind: str                   # sum | gauge | histogram | ...
    points: list[PointRecord]
    resource: dict[str, Any]
    monotonic: bool | None = None
    temporality: str | None = None          # DELTA | CUMULATIVE, for sums and histograms


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value."""
    which = value.WhichOneof("value")
    if which == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which) if which else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


def flatten_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    """Every span of an export request, with its resource and scope."""
    records = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(SpanRecord(
                    name=span.name, kind=SPAN_KINDS[span.kind], trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                    attributes=attributes(span.attributes), status_code=STATUS_CODES[span.status.code],
                    status_message=span.status.message, start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano, resource=resource, scope=scope_spans.scope.name,
                    schema_url=scope_spans.schema_url))
    return records


def flatten_metrics(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[MetricRecord]:
    """Every metric of an export request, with its data points."""
    records = []
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind)
                records.append(MetricRecord(
                    name=metric.name, unit=metric.unit, description=metric.description, kind=kind,
                    points=[_point(point, kind) for point in data.data_points], resource=resource,
                    monotonic=data.is_monotonic if kind == "sum" else None,
                    temporality=TEMPORALITIES[data.aggregation_temporality] if kind in ("sum", "histogram") else None))
    return records


def _point(point: Any, kind: str) -> PointRecord:
    record = PointRecord(attributes=attributes(point.attributes))
    if kind == "histogram":
        record.count, record.sum = point.count, point.sum
        record.bounds, record.bucket_counts = list(point.explicit_bounds), list(point.bucket_counts)
    elif kind in ("sum", "gauge"):
        record.value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
    return record


class OtlpReceiver:
    """Collects OTLP spans and metrics sent over gRPC or HTTP/protobuf."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.span_headers: list[dict[str, str]] = []     # each span export's HTTP headers or gRPC metadata
        self.metric_exports: list[list[MetricRecord]] = []
        self.fail_status: int | None = None     # answer HTTP exports with this status (gRPC: INVALID_ARGUMENT)
        self._changed = threading.Condition()
        self._released = threading.Event()
        self._released.set()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> OtlpReceiver:
        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), self._grpc)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _http_handler(self))
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, args=(0.05,), name="otlp-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def hold(self) -> None:
        """Make exports wait (up to 10 s) until release(): a slow collector."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def accept_spans(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     headers: dict[str, str] | None = None) -> None:
        self._released.wait(10)
        with self._changed:
            self.spans.extend(flatten_spans(request))
            self.span_headers.append(headers or {})
            self._changed.notify_all()

    def accept_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        self._released.wait(10)
        with self._changed:
            self.metric_exports.append(flatten_metrics(request))
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 5.0) -> Any:
        """Wait until predicate() is truthy and return its value; AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not (result := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"OTLP receiver: condition not met within {timeout_s} s")
                self._changed.wait(remaining)
            return result

    def wait_for_spans(self, predicate: Callable[[list[SpanRecord]], Any], timeout_s: float = 5.0) -> list[SpanRecord]:
        """Wait until predicate(all spans so far) is truthy; return the spans."""
        self.wait_for(lambda: predicate(self.spans), timeout_s)
        return list(self.spans)

    def wait_for_trace(self, trace_id: str, spans: int, timeout_s: float = 5.0) -> list[SpanRecord]:
        """Wait until `spans` spans of one trace, its SERVER span among them, have arrived; return the trace's."""
        self.wait_for(lambda: len(got := self.trace(trace_id)) >= spans and any(s.kind == "SERVER" for s in got),
                      timeout_s)
        return self.trace(trace_id)

    def latest_metrics(self, service: str | None = None) -> dict[str, MetricRecord]:
        """Each metric as in the most recent export that carried it (cumulative values), of one service if given."""
        with self._changed:
            return {metric.name: metric for export in self.metric_exports for metric in export
                    if service is None or metric.resource.get("service.name") == service}

    def wait_for_metric(self, name: str, timeout_s: float = 5.0, service: str | None = None) -> MetricRecord:
        """Wait until a metric of this name has arrived (from `service`, if given); return its latest record."""
        self.wait_for(lambda: name in self.latest_metrics(service), timeout_s)
        return self.latest_metrics(service)[name]

    def trace(self, trace_id: str) -> list[SpanRecord]:
        """The spans received so far of one trace."""
        with self._changed:
            return [span for span in self.spans if span.trace_id == trace_id]


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        if self.receiver.fail_status is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "failing on purpose")
        self.receiver.accept_spans(request, {key.lower(): value for key, value in context.invocation_metadata()})
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        if self.receiver.fail_status is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "failing on purpose")
        self.receiver.accept_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    """An OTLP/HTTP protobuf handler class bound to the receiver."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if receiver.fail_status is not None:
                return self._answer(receiver.fail_status, b"")
            if self.path == "/v1/traces":
                receiver.accept_spans(trace_service_pb2.ExportTraceServiceRequest.FromString(body),
                                      {key.lower(): value for key, value in self.headers.items()})
                return self._answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())
            if self.path == "/v1/metrics":
                receiver.accept_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                return self._answer(200, metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString())
            return self._answer(404, b"")

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            return None

    return Handler
