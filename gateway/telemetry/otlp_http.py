"""The SDK's OTLP/HTTP span exporter, with the gateway's faster span encoder (see `encoding`)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from gateway.telemetry.encoding import SpanEncoder


class HttpSpanExporter(OTLPSpanExporter):
    """Posts batches encoded by `SpanEncoder` through the SDK exporter's own HTTP client (retries, gzip, TLS).

    An exporter version without that client falls back to the SDK's whole export path.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if client is None or not hasattr(client, "export") or getattr(self, "_shutdown", True):
            return super().export(spans)
        result = client.export(self._encoder.encode(spans))
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
