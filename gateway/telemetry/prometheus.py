"""The SDK's Prometheus reader, with the gateway's own histograms added to what it collects."""

from __future__ import annotations

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData

from gateway.telemetry.histograms import HistogramExport


class GatewayPrometheusReader(PrometheusMetricReader):
    """Serves the SDK's metrics and the gateway's histograms (cumulative, as Prometheus reads them)."""

    def __init__(self, histograms: HistogramExport, **kwargs) -> None:
        super().__init__(**kwargs)
        self._histograms = histograms

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> None:
        super()._receive_metrics(self._histograms.add_to(metrics_data), timeout_millis, **kwargs)
