"""The SDK's OTLP/HTTP span exporter, with the gateway's faster span encoder (see `encoding`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from gateway.telemetry.encoding import SpanEncoder

logger = logging.getLogger(__name__)


class HttpSpanExporter(OTLPSpanExporter):
    """Posts batches encoded by `SpanEncoder` through the SDK exporter's own HTTP client (retries, gzip, TLS).

    An exporter version without that client falls back to the SDK's whole export path. As the SDK's
    does, a batch over `max_request_size` is dropped (and counted as a failed export).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if client is None or not hasattr(client, "export") or getattr(self, "_shutdown", True):
            return super().export(spans)
        data = self._encoder.encode(spans)
        max_bytes = getattr(self, "_max_request_size", None)
        if max_bytes is not None and len(data) > max_bytes:
            logger.warning("dropping a span batch of %d bytes: over the exporter's max_request_size of %d",
                           len(data), max_bytes)
            return SpanExportResult.FAILURE
        result = client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
