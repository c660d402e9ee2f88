"""Histograms aggregated in plain Python on the hot path, exported inside the SDK's own metric batches.

The SDK's synchronous `Histogram.record` costs about 13 µs (a Measurement
whose attributes are validated one by one, then hashed into a key), and a
request records five or more. Here a record is a tuple key, a bisect and a
few additions under an uncontended lock. At collection time, the points join
the `MetricsData` the SDK collected, as the SDK's explicit-bucket histogram
would have made them (same bucket rule, count, sum, min, max), before it goes
to the OTLP exporter or to the Prometheus registry: cumulative, or delta
where the exporter prefers delta.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope


#: distinct attribute sets an instrument keeps, as the SDK's default cardinality limit; the rest are summed in
#: one point marked `otel.metric.overflow`, as the SDK does
CARDINALITY_LIMIT = 2000
OVERFLOW_ATTRIBUTES: dict[str, Any] = {"otel.metric.overflow": True}
OVERFLOW_KEY = tuple(OVERFLOW_ATTRIBUTES.items())


class _Point:
    """One attribute set's running totals, and the [min, max] of each delta reader's current interval."""

    __slots__ = ("attributes", "counts", "count", "sum", "min", "max", "windows")

    def __init__(self, attributes: dict[str, Any], buckets: int, windows: int) -> None:
        self.attributes = attributes
        self.counts = [0] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.windows = [[math.inf, -math.inf] for _ in range(windows)]


class Buckets:
    """One histogram instrument: explicit bucket boundaries, one running point per attribute set."""

    def __init__(self, name: str, *, unit: str, description: str, boundaries: Sequence[float]) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.boundaries = tuple(float(bound) for bound in boundaries)
        self.start_ns = time.time_ns()
        self._points: dict[tuple, _Point] = {}
        self._windows = 0
        self._lock = threading.Lock()

    def new_window(self) -> int:
        """Start tracking min and max per interval for one more delta reader; returns its window. Its first
        interval holds the points' values so far (its first point counts them all), so their min and max too."""
        with self._lock:
            for point in self._points.values():
                point.windows.append([point.min, point.max])
            self._windows += 1
            return self._windows - 1

    def record(self, amount: float, attributes: Mapping[str, Any]) -> None:
        """Add one value (the same signature as Histogram.record); negative or non-finite values are dropped."""
        if amount < 0 or not math.isfinite(amount):
            return
        key = tuple(attributes.items())
        index = bisect_left(self.boundaries, amount)
        with self._lock:
            point = self._points.get(key)
            if point is None:
                if len(self._points) >= CARDINALITY_LIMIT:
                    key, attributes = OVERFLOW_KEY, OVERFLOW_ATTRIBUTES
                    point = self._points.get(key)
                if point is None:
                    point = self._points[key] = _Point(dict(attributes), len(self.boundaries) + 1, self._windows)
            point.counts[index] += 1
            point.count += 1
            point.sum += amount
            if amount < point.min:
                point.min = amount
            if amount > point.max:
                point.max = amount
            for window in point.windows:
                if amount < window[0]:
                    window[0] = amount
                if amount > window[1]:
                    window[1] = amount

    def totals(self, window: int | None = None) -> dict[tuple, tuple[dict[str, Any], list[int], int, float, float,
                                                                       float]]:
        """A consistent copy of every point's running totals; with `window`, the min and max of that delta
        reader's interval instead of all time, and a new interval begins."""
        with self._lock:
            if window is None:
                return {key: (p.attributes, list(p.counts), p.count, p.sum, p.min, p.max)
                        for key, p in self._points.items()}
            totals = {key: (p.attributes, list(p.counts), p.count, p.sum, *p.windows[window])
                      for key, p in self._points.items()}
            for point in self._points.values():
                point.windows[window] = [math.inf, -math.inf]
            return totals


class HistogramExport:
    """Turns a set of Buckets into SDK metrics for one reader, remembering what a delta reader last saw."""

    def __init__(self, histograms: Iterable[Buckets], scope: InstrumentationScope, resource: Resource, *,
                 delta: bool = False) -> None:
        self.histograms = tuple(histograms)
        self.scope = scope
        self.resource = resource
        self.delta = delta
        self._windows = {histogram.name: histogram.new_window() for histogram in self.histograms} if delta else {}
        self._last: dict[str, dict[tuple, tuple]] = {}
        self._last_ns: dict[str, int] = {}

    def add_to(self, metrics_data: MetricsData | None) -> MetricsData | None:
        """`metrics_data` with the histograms' points added to the gateway's scope (made when absent)."""
        now_ns = time.time_ns()
        metrics = [metric for histogram in self.histograms if (metric := self._metric(histogram, now_ns))]
        if not metrics:
            return metrics_data
        if metrics_data is None or not metrics_data.resource_metrics:
            metrics_data = MetricsData(resource_metrics=[
                ResourceMetrics(resource=self.resource, scope_metrics=[], schema_url=self.resource.schema_url)])
        first, *rest = metrics_data.resource_metrics
        scopes = list(first.scope_metrics)
        for index, scope_metrics in enumerate(scopes):
            if scope_metrics.scope == self.scope:
                scopes[index] = replace(scope_metrics, metrics=[*scope_metrics.metrics, *metrics])
                break
        else:
            scopes.append(ScopeMetrics(scope=self.scope, metrics=metrics, schema_url=self.scope.schema_url or ""))
        return MetricsData(resource_metrics=[replace(first, scope_metrics=scopes), *rest])

    def _metric(self, histogram: Buckets, now_ns: int) -> Metric | None:
        totals = histogram.totals(self._windows.get(histogram.name))
        if self.delta:
            points = self._delta_points(histogram, totals, now_ns)
            temporality = AggregationTemporality.DELTA
        else:
            points = [self._point(histogram, histogram.start_ns, now_ns, *values) for values in totals.values()]
            temporality = AggregationTemporality.CUMULATIVE
        if not points:
            return None
        return Metric(name=histogram.name, description=histogram.description, unit=histogram.unit,
                      data=Histogram(data_points=points, aggregation_temporality=temporality))

    def _delta_points(self, histogram: Buckets, totals: dict, now_ns: int) -> list[HistogramDataPoint]:
        """What changed since this reader's last collection (points without new values are left out)."""
        last = self._last.get(histogram.name, {})
        start_ns = self._last_ns.get(histogram.name, histogram.start_ns)
        points = []
        for key, (attributes, counts, count, total, low, high) in totals.items():
            before = last.get(key)
            if before is not None:
                if count == before[2]:
                    continue
                counts = [now - then for now, then in zip(counts, before[1])]
                count, total = count - before[2], total - before[3]
            points.append(self._point(histogram, start_ns, now_ns, attributes, counts, count, total, low, high))
        self._last[histogram.name] = totals
        self._last_ns[histogram.name] = now_ns
        return points

    @staticmethod
    def _point(histogram: Buckets, start_ns: int, now_ns: int, attributes: dict[str, Any], counts: list[int],
               count: int, total: float, low: float, high: float) -> HistogramDataPoint:
        return HistogramDataPoint(attributes=attributes, start_time_unix_nano=start_ns, time_unix_nano=now_ns,
                                  count=count, sum=total, bucket_counts=counts,
                                  explicit_bounds=histogram.boundaries, min=low, max=high)
