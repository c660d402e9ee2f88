"""Telemetry under odd input: odd upstream fields, a sampler argument out of range, clients leaving, and
label sets without end. Found by a review of the telemetry on the wire."""

from __future__ import annotations

import json
import socket
import time
import uuid
from decimal import Decimal

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.outcomes import Task
from gateway.policy.model import Telemetry as PolicyTelemetry
from gateway.telemetry import Telemetry
from gateway.telemetry.histograms import CARDINALITY_LIMIT, Buckets, HistogramExport
from gateway.telemetry.metrics import DURATION_BUCKETS_S
from gateway.telemetry.sums import Sums
from gateway.telemetry.tracing import WORKFLOW_LABEL_TOP_N
from tests.support.harness import DEFAULT_SIMS, Harness, raw_model_policy
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.raw_upstream import COMPLETION, RawUpstream, json_answer
from tests.test_e2e_telemetry import CALLER_SPAN_ID, KEYS, otel_environ, start


@pytest.mark.parametrize("odd", [{"model": ["fake"]}, {"model": {"name": "fake"}}, {"id": 7}],
                         ids=["model-list", "model-object", "id-int"])
def test_an_odd_id_or_model_in_an_answer_keeps_the_requests_metrics_and_ledger_line(tmp_path, odd):
    """A model server's `model` as a list (or `id` as a number) used to make the recording raise: the request
    lost its metrics and its ledger line. Now such values are left out and the request is recorded."""
    raw = RawUpstream().start()
    ledger = tmp_path / "ledger.jsonl"
    policy = raw_model_policy(raw.url, first_byte_s=2, tail=(
        f"telemetry: {{{{prometheus: true}}}}\nledger: {{{{path: {ledger}}}}}\n"))
    harness = Harness(policy, sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS}, environ={}).start()
    try:
        raw.script = json_answer({**COMPLETION, **odd})
        reply = harness.openai().chat.completions.with_raw_response.create(
            model="raw", messages=[{"role": "user", "content": "hi"}])
        assert reply.http_response.status_code == 200
        deadline = time.monotonic() + 5
        while not (ledger.exists() and ledger.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        [line] = ledger.read_text().splitlines()
        assert json.loads(line)["status"] == 200
        text = harness.services.telemetry.prometheus_text().decode()
        assert any(row.startswith("gateway_requests_total{") for row in text.splitlines())
    finally:
        harness.stop()
        raw.stop()


@pytest.mark.parametrize("name, arg", [("traceidratio", "1.5"), ("parentbased_traceidratio", "-0.1"),
                                       ("parentbased_traceidratio", "nan")])
def test_a_sampler_ratio_out_of_range_is_clamped_not_fatal(name, arg, caplog):
    """OTEL_TRACES_SAMPLER_ARG outside [0, 1] used to stop the gateway from starting; now the nearest ratio
    is used and a warning says so."""
    telemetry = Telemetry.from_env(environ={"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": arg,
                                            "OTEL_METRICS_EXPORTER": "none"})
    telemetry.shutdown(timeout_s=1)
    assert any("not a ratio in [0, 1]" in record.getMessage() for record in caplog.records)


def test_workflow_labels_are_bounded_like_tenants():
    """x-gateway-workflow is named by clients: the first 100 workflows keep their name, the rest are other."""
    telemetry = Telemetry.from_env(PolicyTelemetry(prometheus=True), environ={})
    try:
        for n in range(5 * WORKFLOW_LABEL_TOP_N):
            telemetry.record_outcome(Task(route="chat-default", tenant="acme", workflow=f"wf-{n}",
                                          cost_usd=Decimal("0.001"), outcome="success"))
        text = telemetry.prometheus_text().decode()
        series = [row for row in text.splitlines() if row.startswith("gateway_task_outcomes_total{")]
        assert len(series) == WORKFLOW_LABEL_TOP_N + 1
        assert any('gateway_workflow="other"' in row and row.endswith(f" {4 * WORKFLOW_LABEL_TOP_N}.0")
                   for row in series)
    finally:
        telemetry.shutdown()


def test_the_gateways_histograms_fold_attribute_sets_past_the_sdks_limit_into_one_overflow_point():
    """As the SDK does: 2000 attribute sets kept, the rest counted in one `otel.metric.overflow` point."""
    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader]).get_meter("sdk").create_histogram(
        "h", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
    ours = Buckets("h", unit="s", description="", boundaries=DURATION_BUCKETS_S)
    for n in range(CARDINALITY_LIMIT + 500):
        labels = {"gen_ai.response.model": f"m-{n}"}
        sdk.record(0.5, labels)
        ours.record(0.5, labels)
    sdk_points = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    our_points = HistogramExport([ours], InstrumentationScope("gw"), Resource.create({})).add_to(None) \
        .resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert len(our_points) == len(sdk_points) == CARDINALITY_LIMIT + 1
    [overflow] = [p for p in our_points if p.attributes.get("otel.metric.overflow")]
    assert overflow.count == 500


def test_the_gateways_counters_fold_attribute_sets_past_the_sdks_limit_into_one_overflow_point():
    """As the SDK's counters do: 2000 attribute sets kept, and every add past them summed in one
    `otel.metric.overflow` point, so the counter's total still counts every request."""
    reader = InMemoryMetricReader()
    requests = Sums(MeterProvider(metric_readers=[reader]).get_meter("gw"), "gateway.requests", unit="{request}",
                    description="")
    for n in range(CARDINALITY_LIMIT + 500):
        requests.add(1, {"gen_ai.response.model": f"m-{n}"})
    points = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert (len(points), sum(point.value for point in points)) == (CARDINALITY_LIMIT + 1, CARDINALITY_LIMIT + 500)
    [overflow] = [point for point in points if point.attributes.get("otel.metric.overflow")]
    assert overflow.value == 500


def test_an_attempt_cut_short_by_a_client_leaving_is_exported_as_such():
    """The client hangs up mid-stream: the CLIENT span is an error with error.type client_disconnected, and
    its duration sample carries it too, so it is not read as a normal latency."""
    receiver = OtlpReceiver().start()
    gateway = start(otel_environ(receiver.http_endpoint, "http/protobuf", "gw-disconnect"))
    try:
        trace_id = uuid.uuid4().hex
        body = json.dumps({"model": "slow", "stream": True, "max_tokens": 40,
                           "messages": [{"role": "user", "content": "Count"}]}).encode()
        with socket.create_connection(("127.0.0.1", gateway.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEYS['acme']}\r\ntraceparent: 00-{trace_id}-{CALLER_SPAN_ID}"
                             f"-01\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"200" in client.recv(4096).split(b"\r\n")[0]
            time.sleep(0.2)
        time.sleep(1.0)
        gateway.flush_telemetry()
        spans = receiver.wait_for(lambda: (t := receiver.trace(trace_id)) and any(s.kind == "SERVER" for s in t) and t)
        attempt = next(span for span in spans if span.kind == "CLIENT")
        assert attempt.status_code == "ERROR" and attempt.attributes["error.type"] == "client_disconnected"
        durations = receiver.latest_metrics("gw-disconnect")["gen_ai.client.operation.duration"].points
        assert any(p.attributes.get("error.type") == "client_disconnected" for p in durations)
    finally:
        gateway.stop()
        receiver.stop()


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("state", [(), (("vendor", "abc"), ("other", "x-1"))])
def test_upstream_trace_headers_are_what_the_w3c_propagator_writes(sampled, state):
    """The gateway writes an attempt's traceparent itself (no context object per call); it must be the
    SDK propagator's header, byte for byte, tracestate included."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from gateway.telemetry.spans import RequestSpans, SpanDraft

    context = SpanContext(0x0af7651916cd43dd8448eb211c80319c, 0x00f067aa0ba902b7, is_remote=False,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
                          trace_state=TraceState(list(state)))
    draft = SpanDraft("chat m", SpanKind.CLIENT, context, None, {}, recording=sampled)
    expected: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(expected, context=trace.set_span_in_context(NonRecordingSpan(context)))
    assert RequestSpans.trace_headers(draft) == expected
    assert ("tracestate" in expected) == bool(state)


@pytest.mark.parametrize("sampled", [True, False])
def test_a_requests_spans_queued_together_count_exactly_the_ones_a_full_queue_drops(sampled):
    """A request's spans are handed to the batch processor in one call; past the queue's bound it counts each
    span the SDK drops, as one-by-one `on_end` did; an unsampled request queues and counts nothing."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanContext, TraceFlags

    from gateway.telemetry.config import BatchSettings
    from gateway.telemetry.exporters import CountingBatchSpanProcessor, DropCounter

    def span(index: int) -> ReadableSpan:
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        return ReadableSpan(name=f"s{index}", context=SpanContext(7, index + 1, is_remote=False, trace_flags=flags))

    dropped = DropCounter()
    processor = CountingBatchSpanProcessor(InMemorySpanExporter(), BatchSettings(
        max_queue_size=4, max_export_batch_size=4, schedule_delay_ms=600_000), dropped)
    try:
        processor.on_end_all([span(i) for i in range(3)])      # below the batch size: nothing is exported yet
        processor.on_end_all([span(i) for i in range(3, 6)])   # 3 + 3 spans into room for 4: 2 are dropped
        assert dropped.by_kind().get(("traces", "queue_full"), 0) == (2 if sampled else 0)
        if not sampled:                 # (sampled ones may already be on their way to the exporter)
            assert len(processor._batch_processor._queue) == 0
    finally:
        processor.shutdown()


def test_a_long_scrape_does_not_hold_the_requests_behind_it():
    """A /metrics scrape of tens of thousands of series takes a second or more to write out; it is written in a
    thread, so a request that comes while it is written is answered long before it ends. Written on the event
    loop it held every request (and timed healthy models out) until it ended."""
    import threading
    import urllib.request

    harness = Harness(environ={"GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "600000"}).start()
    try:
        meter = harness.services.telemetry.meter
        for index in range(12):             # 12 instruments of 1,999 label sets each: about 24,000 series
            counter = meter.create_counter(f"test.wide.{index}")
            for label in range(1999):
                counter.add(1, {"test.label": f"value-{label}"})
        ended: dict[str, float] = {}

        def fetch(path: str) -> None:
            with urllib.request.urlopen(f"{harness.base_url}{path}", timeout=60) as response:
                response.read()
            ended[path] = time.monotonic()

        scrape = threading.Thread(target=fetch, args=("/metrics",))
        started_s = time.monotonic()
        scrape.start()
        time.sleep(0.1)
        fetch("/healthz")
        scrape.join(60)
        assert ended["/metrics"] - started_s > 0.3, "the scrape was too quick to show anything"
        # answered while the scrape is still written (on the event loop, it came out with the scrape, a few
        # milliseconds ahead of its last bytes)
        assert ended["/metrics"] - ended["/healthz"] > 0.1
    finally:
        harness.stop()


def test_an_exporter_that_raises_counts_its_whole_batch_as_failed(caplog):
    """A span or metric exporter that raises (a third-party bug, a dead socket) loses its batch: every span and
    point of it is counted as export_failed, and the raise is logged, not passed on to the SDK's worker."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from gateway.telemetry.exporters import CountingMetricExporter, CountingSpanExporter, DropCounter

    class RaisingSpans(SpanExporter):
        def export(self, spans):
            raise ConnectionResetError("collector gone")

    class RaisingMetrics(MetricExporter):
        def __init__(self):
            super().__init__(preferred_temporality={})      # as the OTLP exporters fill it

        def export(self, metrics_data, timeout_millis=10_000, **kwargs):
            raise ConnectionResetError("collector gone")

        def force_flush(self, timeout_millis=10_000):
            return True

        def shutdown(self, timeout_millis=30_000, **kwargs):
            return None

    dropped = DropCounter()
    spans = [ReadableSpan(name=f"s{index}") for index in range(3)]
    assert CountingSpanExporter(RaisingSpans(), dropped).export(spans) is SpanExportResult.FAILURE
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    for tenant in ("acme", "globex"):
        ours.record(0.5, {"gateway.tenant": tenant})
    metrics = CountingMetricExporter(RaisingMetrics(), dropped, lambda delta: HistogramExport(
        [ours], InstrumentationScope("gw"), Resource.create({}), delta=delta))
    assert metrics.export(None) is MetricExportResult.FAILURE
    assert dropped.by_kind()[("traces", "export_failed")] == 3
    assert dropped.by_kind()[("metrics", "export_failed")] == 2
    assert "span export raised" in caplog.text and "metric export raised" in caplog.text


def test_an_exporter_stating_no_temporality_is_wrapped_and_its_histograms_are_cumulative():
    """An exporter built with no temporality preference (the SDK's console exporter) is wrapped like the OTLP ones,
    and the gateway's histograms go to it cumulative, as the SDK's reader takes no preference to mean."""
    import io

    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExportResult

    from gateway.telemetry.exporters import CountingMetricExporter, DropCounter

    temporalities, out = [], io.StringIO()
    ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
    ours.record(0.5, {"gateway.tenant": "acme"})
    exporter = CountingMetricExporter(ConsoleMetricExporter(out=out), DropCounter(), lambda delta: (
        temporalities.append(delta) or HistogramExport([ours], InstrumentationScope("gw"), Resource.create({}),
                                                       delta=delta)))
    assert temporalities == [False]
    assert exporter.export(None) is MetricExportResult.SUCCESS
    assert '"name": "h"' in out.getvalue()


def test_a_failed_metric_export_counts_the_gateways_histogram_points_too():
    """The gateway's own histograms travel in the SDK's batch: when the collector refuses it, their points are
    counted as lost with the SDK's points."""
    from opentelemetry.sdk.metrics.export import MetricExportResult

    from gateway.telemetry.config import SignalExport
    from gateway.telemetry.exporters import CountingMetricExporter, DropCounter, otlp_metric_exporter

    receiver = OtlpReceiver().start()
    receiver.fail_status = 400                  # not retried: the batch is refused at once
    try:
        reader = InMemoryMetricReader()
        MeterProvider(metric_readers=[reader]).get_meter("gw").create_counter("gateway.requests").add(1)
        ours = Buckets("h", unit="s", description="", boundaries=(1.0,))
        for tenant in ("acme", "globex", "initech"):
            ours.record(0.5, {"gateway.tenant": tenant})
        dropped = DropCounter()
        exporter = CountingMetricExporter(
            otlp_metric_exporter(SignalExport("http/protobuf", f"{receiver.http_endpoint}/v1/metrics"), "cumulative"),
            dropped, lambda delta: HistogramExport([ours], InstrumentationScope("gw"), Resource.create({}),
                                                   delta=delta))
        assert exporter.export(reader.get_metrics_data()) is MetricExportResult.FAILURE
        assert dropped.by_kind()[("metrics", "export_failed")] == 1 + 3
        exporter.shutdown()
    finally:
        receiver.stop()
