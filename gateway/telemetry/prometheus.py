"""The SDK's Prometheus reader, with the gateway's own histograms added to what it collects."""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData

from gateway.telemetry.histograms import HistogramExport


class GatewayPrometheusReader(PrometheusMetricReader):
    """Serves the SDK's metrics and the gateway's histograms (cumulative, as Prometheus reads them).

    The SDK's collector queues every collection until the next scrape serves them all, so a collection made
    between scrapes (the meter provider's `force_flush` collects from every reader) would be served beside the
    scrape's own, each series twice: an exposition Prometheus rejects. Every point here is cumulative, so the
    newest collection says all the older ones did; only it is kept.
    """

    def __init__(self, histograms: HistogramExport, **kwargs) -> None:
        super().__init__(**kwargs)
        self._histograms = histograms

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        pending = getattr(self._collector, "_metrics_datas", None)
        if pending is not None:
            pending.clear()
        super()._receive_metrics(self._histograms.add_to(metrics_data), timeout_millis, **kwargs)
