"""The SDK's OTLP/gRPC span exporter, with the gateway's faster span encoder (see `encoding`)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan

from gateway.telemetry.encoding import SpanEncoder


class GrpcSpanExporter(OTLPSpanExporter):
    """The SDK exporter (channel, retries, compression), given requests parsed from `SpanEncoder`'s bytes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(self._encoder.encode(data))
