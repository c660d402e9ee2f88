"""OTLP exporters (gRPC or HTTP/protobuf), wrapped so that dropped telemetry is counted.

Two losses are counted: spans the batch processor drops because its queue is
full, and spans or metric points whose export failed.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from opentelemetry.sdk.metrics import Counter as CounterInstrument
from opentelemetry.sdk.metrics import Histogram, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from gateway.telemetry.config import BatchSettings, SignalExport
from gateway.telemetry.histograms import HistogramExport

logger = logging.getLogger(__name__)

#: the (signal, reason) pairs always reported by gateway.telemetry.dropped
DROP_KINDS = (("traces", "queue_full"), ("traces", "export_failed"), ("metrics", "export_failed"))


class DropCounter:
    """Thread-safe counts of dropped telemetry by signal and reason."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def add(self, signal: str, reason: str, count: int) -> None:
        with self._lock:
            self._counts[(signal, reason)] += count

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def by_kind(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {kind: self._counts[kind] for kind in {*DROP_KINDS, *self._counts}}

    def observations(self) -> list[tuple[dict[str, str], int]]:
        """(labels, count) pairs for the gateway.telemetry.dropped observable counter."""
        return [({"gateway.telemetry.signal": signal, "gateway.telemetry.reason": reason}, count)
                for (signal, reason), count in self.by_kind().items()]


class CountingSpanExporter(SpanExporter):
    """Delegates to an exporter; counts the spans of every failed export."""

    def __init__(self, inner: SpanExporter, dropped: DropCounter) -> None:
        self._inner = inner
        self._dropped = dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:       # boundary: a third-party exporter; the batch is lost either way
            logger.exception("span export raised")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._dropped.add("traces", "export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops when its queue is full."""

    def __init__(self, exporter: SpanExporter, settings: BatchSettings, dropped: DropCounter) -> None:
        self._dropped = dropped
        super().__init__(CountingSpanExporter(exporter, dropped),
                         max_queue_size=settings.max_queue_size,
                         schedule_delay_millis=settings.schedule_delay_ms,
                         max_export_batch_size=min(settings.max_export_batch_size, settings.max_queue_size),
                         export_timeout_millis=settings.export_timeout_ms)

    def on_end(self, span: ReadableSpan) -> None:
        self.on_end_all((span,))

    def on_end_all(self, spans: Sequence[ReadableSpan]) -> None:
        """`on_end` for the spans of one request, which share its trace and so its sampled flag: one check
        for the whole request, then each span is queued as the SDK's `on_end` queues it."""
        context = spans[0].context if spans else None
        if context is None or not context.trace_flags.sampled:
            return
        batch = self._batch_processor
        queue = batch._queue                # the SDK's bounded deque: it drops a span when this is full
        if (over := len(queue) + len(spans) - queue.maxlen) > 0:
            self._dropped.add("traces", "queue_full", min(over, len(spans)))
        for span in spans:
            batch.emit(span)


class CountingMetricExporter(MetricExporter):
    """Delegates to a metric exporter, adding the gateway's own histograms; counts the points of failed exports."""

    def __init__(self, inner: MetricExporter, dropped: DropCounter,
                 histograms: Callable[[bool], HistogramExport] | None = None) -> None:
        # the SDK's periodic reader takes its preferences from these two exporter attributes
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._dropped = dropped
        # an exporter may state no preference (the SDK's console exporter): cumulative then, as the SDK's reader
        delta = (self._preferred_temporality or {}).get(Histogram) is AggregationTemporality.DELTA
        self._histograms = histograms(delta) if histograms is not None else None

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        if self._histograms is not None:
            metrics_data = self._histograms.add_to(metrics_data)
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:       # boundary: a third-party exporter; the points are lost either way
            logger.exception("metric export raised")
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._dropped.add("metrics", "export_failed", _point_count(metrics_data))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _point_count(metrics_data: MetricsData) -> int:
    return sum(len(metric.data.data_points) for resource in metrics_data.resource_metrics
               for scope in resource.scope_metrics for metric in scope.metrics)


def otlp_span_exporter(export: SignalExport) -> SpanExporter:
    """The SDK's OTLP span exporter for the configured protocol, with the gateway's span encoder."""
    if export.protocol == "grpc":
        from gateway.telemetry.otlp_grpc import GrpcSpanExporter

        return GrpcSpanExporter(endpoint=export.endpoint, insecure=export.insecure,
                                headers=export.headers or None, timeout=export.timeout_s)
    from gateway.telemetry.otlp_http import HttpSpanExporter

    return HttpSpanExporter(endpoint=export.endpoint, headers=export.headers or None, timeout=export.timeout_s)


def otlp_metric_exporter(export: SignalExport, temporality: str) -> MetricExporter:
    """The SDK's OTLP metric exporter for the configured protocol and temporality preference."""
    preferred = _temporality(temporality)
    if export.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

        return GrpcMetricExporter(endpoint=export.endpoint, insecure=export.insecure,
                                  headers=export.headers or None, timeout=export.timeout_s,
                                  preferred_temporality=preferred)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

    return HttpMetricExporter(endpoint=export.endpoint, headers=export.headers or None, timeout=export.timeout_s,
                              preferred_temporality=preferred)


def _temporality(preference: str) -> dict[type, AggregationTemporality] | None:
    """OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE as the exporters' mapping (None: cumulative)."""
    delta = AggregationTemporality.DELTA
    if preference == "delta":
        return {CounterInstrument: delta, Histogram: delta, ObservableCounter: delta}
    if preference == "lowmemory":
        return {CounterInstrument: delta, Histogram: delta}
    return None
