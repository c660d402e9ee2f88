"""The gateway's histograms aggregate exactly as the SDK's explicit-bucket histograms, cumulative or delta."""

from __future__ import annotations

import math
import random

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader, MetricsData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.telemetry.histograms import Buckets, HistogramExport
from gateway.telemetry.metrics import DURATION_BUCKETS_S

SCOPE = InstrumentationScope("inference-gateway", "1.0", "https://opentelemetry.io/schemas/1.41.0")
RESOURCE = Resource.create({"service.name": "gw"})
LABELS = ({"gateway.tenant": "acme", "server.port": 443}, {"gateway.tenant": "other", "server.port": 443})


def points_by_tenant(metrics_data: MetricsData, name: str) -> dict[str, object]:
    metrics = [metric for resource in metrics_data.resource_metrics for scope in resource.scope_metrics
               for metric in scope.metrics if metric.name == name]
    assert len(metrics) == 1
    return {point.attributes["gateway.tenant"]: point for point in metrics[0].data.data_points}


def sdk_and_gateway(values: list[tuple[float, dict]]):
    """The same values recorded into an SDK histogram and into Buckets, both collected once."""
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader], resource=RESOURCE).get_meter("sdk").create_histogram(
        "h", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
    ours = Buckets("h", unit="s", description="", boundaries=DURATION_BUCKETS_S)
    for value, labels in values:
        sdk.record(value, labels)
        ours.record(value, labels)
    return reader.get_metrics_data(), HistogramExport([ours], SCOPE, RESOURCE).add_to(None), ours


def test_points_equal_the_sdk_histograms():
    """Counts per bucket (bounds included as the SDK does), count, sum, min and max match the SDK's."""
    rng = random.Random(7)
    values = [(rng.choice([*DURATION_BUCKETS_S, rng.uniform(0, 100)]), rng.choice(LABELS)) for _ in range(2000)]
    sdk_data, our_data, _ = sdk_and_gateway(values)
    sdk_points, our_points = points_by_tenant(sdk_data, "h"), points_by_tenant(our_data, "h")
    assert sdk_points.keys() == our_points.keys() == {"acme", "other"}
    for tenant, sdk_point in sdk_points.items():
        ours = our_points[tenant]
        assert list(ours.bucket_counts) == list(sdk_point.bucket_counts)
        assert (ours.count, ours.min, ours.max) == (sdk_point.count, sdk_point.min, sdk_point.max)
        assert math.isclose(ours.sum, sdk_point.sum) and tuple(ours.explicit_bounds) == tuple(sdk_point.explicit_bounds)
        assert dict(ours.attributes) == dict(sdk_point.attributes)


def test_added_to_the_gateway_scope_of_the_collected_batch():
    """The points join the SDK batch's ScopeMetrics of the gateway's scope, next to its other metrics."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader], resource=RESOURCE).get_meter(SCOPE.name, SCOPE.version,
                                                                                  schema_url=SCOPE.schema_url)
    meter.create_counter("gateway.requests").add(1)
    ours = Buckets("h", unit="s", description="d", boundaries=(1.0,))
    ours.record(0.5, LABELS[0])
    data = HistogramExport([ours], SCOPE, RESOURCE).add_to(reader.get_metrics_data())
    (resource,) = data.resource_metrics
    (scope,) = resource.scope_metrics
    assert [metric.name for metric in scope.metrics] == ["gateway.requests", "h"]
    assert scope.metrics[1].data.aggregation_temporality is AggregationTemporality.CUMULATIVE


def test_delta_reports_what_changed_with_the_intervals_min_and_max():
    """A delta reader gets each interval's counts, sum, min and max; an attribute set with nothing new is left out."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0, 10.0))
    delta, cumulative = (HistogramExport([ours], SCOPE, RESOURCE, delta=True),
                         HistogramExport([ours], SCOPE, RESOURCE))
    ours.record(0.5, LABELS[0])
    ours.record(20.0, LABELS[1])
    first = points_by_tenant(delta.add_to(None), "h")
    ours.record(5.0, LABELS[0])
    second = points_by_tenant(delta.add_to(None), "h")
    assert (first["acme"].count, first["other"].count) == (1, 1)
    assert set(second) == {"acme"}
    point = second["acme"]
    assert (list(point.bucket_counts), point.count, point.sum, point.min, point.max) == ([0, 1, 0], 1, 5.0, 5.0, 5.0)
    assert point.start_time_unix_nano == first["acme"].time_unix_nano
    whole = points_by_tenant(cumulative.add_to(None), "h")["acme"]
    assert (list(whole.bucket_counts), whole.count, whole.min, whole.max) == ([1, 1, 0], 2, 0.5, 5.0)


def test_negative_and_non_finite_values_are_dropped():
    """As the SDK does, a negative, infinite or NaN value records nothing."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    for value in (-1.0, math.inf, math.nan):
        ours.record(value, LABELS[0])
    assert HistogramExport([ours], SCOPE, RESOURCE).add_to(None) is None


def test_a_delta_readers_histograms_are_marked_delta_and_a_cumulative_readers_cumulative():
    """The temporality a metric is marked with says how a backend adds its points up: a delta reader's histograms
    are marked DELTA (marked cumulative, each interval's counts would be read as running totals)."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    exports = {AggregationTemporality.DELTA: HistogramExport([ours], SCOPE, RESOURCE, delta=True),
               AggregationTemporality.CUMULATIVE: HistogramExport([ours], SCOPE, RESOURCE)}
    ours.record(0.5, LABELS[0])
    for temporality, export in exports.items():
        (metric,) = export.add_to(None).resource_metrics[0].scope_metrics[0].metrics
        assert metric.data.aggregation_temporality is temporality


def test_a_zero_is_counted_in_the_first_bucket_as_the_sdk_counts_it():
    """A zero (a cached answer's duration, an empty completion's tokens) is a value, not one to drop."""
    sdk_data, our_data, _ = sdk_and_gateway([(0.0, LABELS[0]), (0.0, LABELS[0])])
    sdk_point, ours = points_by_tenant(sdk_data, "h")["acme"], points_by_tenant(our_data, "h")["acme"]
    assert (ours.count, ours.bucket_counts[0], ours.min, ours.max) == (2, 2, 0.0, 0.0)
    assert list(ours.bucket_counts) == list(sdk_point.bucket_counts) and ours.count == sdk_point.count


def test_cumulative_points_keep_the_instruments_start_time_from_one_collection_to_the_next():
    """A cumulative point starts when the instrument did, every time: a start that moved would read as a reset."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    export = HistogramExport([ours], SCOPE, RESOURCE)
    ours.record(0.5, LABELS[0])
    first = points_by_tenant(export.add_to(None), "h")["acme"]
    ours.record(0.5, LABELS[0])
    second = points_by_tenant(export.add_to(None), "h")["acme"]
    assert first.start_time_unix_nano == second.start_time_unix_nano == ours.start_ns
    assert first.start_time_unix_nano < first.time_unix_nano <= second.time_unix_nano
    assert (first.count, second.count) == (1, 2)


def test_a_delta_reader_made_after_values_were_recorded_collects_the_points_already_there():
    """A delta reader that joins late gets a min and max window on the points already there, and reports them: its
    first point counts every value so far, so its min and max are theirs too."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    ours.record(0.5, LABELS[0])
    delta = HistogramExport([ours], SCOPE, RESOURCE, delta=True)
    ours.record(5.0, LABELS[0])
    point = points_by_tenant(delta.add_to(None), "h")["acme"]
    assert (point.count, list(point.bucket_counts), point.min, point.max) == (2, [1, 1], 0.5, 5.0)


def test_a_batch_without_resources_gets_one_for_the_histograms():
    """A collected batch with no resource metrics yet still carries the histograms, under the gateway's resource."""
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    ours.record(0.5, LABELS[0])
    data = HistogramExport([ours], SCOPE, RESOURCE).add_to(MetricsData(resource_metrics=[]))
    (resource,) = data.resource_metrics
    assert resource.resource == RESOURCE and points_by_tenant(data, "h")["acme"].count == 1


def test_the_batches_other_resources_are_kept():
    """The histograms join the batch's first resource; the resources after it are passed on as they came."""
    from opentelemetry.sdk.metrics.export import ResourceMetrics

    other = ResourceMetrics(resource=Resource.create({"service.name": "other"}), scope_metrics=[], schema_url="")
    first = ResourceMetrics(resource=RESOURCE, scope_metrics=[], schema_url="")
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    ours.record(0.5, LABELS[0])
    data = HistogramExport([ours], SCOPE, RESOURCE).add_to(MetricsData(resource_metrics=[first, other]))
    assert [resource.resource for resource in data.resource_metrics] == [RESOURCE, other.resource]
    assert points_by_tenant(data, "h")["acme"].count == 1
