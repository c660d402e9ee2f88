"""The telemetry layer against a real OTLP receiver, over gRPC and HTTP/protobuf."""

from __future__ import annotations

import json
import socket
import re
import time
from dataclasses import replace
from decimal import Decimal

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.context import Attempt, Candidate, Decision, RequestContext, Usage
from gateway.policy.model import Match, Model, Policy, Route, Sla, Tenant
from gateway.policy.model import Telemetry as PolicyTelemetry
from gateway.telemetry import Telemetry, TelemetryConfig, TenantLabels, content, genai
from gateway.telemetry.metrics import DURATION_BUCKETS_S, TOKEN_BUCKETS
from tests.support.otlp_receiver import OtlpReceiver

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"

SMALL = Model(name="small", endpoint="http://10.0.0.5:9101/v1", upstream_model="sim-small-1b", size_b=1)
LARGE = Model(name="large", endpoint="https://api.example.com/v1", upstream_model="sim-large-70b",
              provider="openai", size_b=70, tier=3)
ROUTE = Route(name="chat-default", match=Match(models=("auto",)), candidates=("small", "large"),
              sla=Sla(p95_latency_ms=2000), fallback=("large",))
POLICY = Policy(version=1, models={"small": SMALL, "large": LARGE}, routes=(ROUTE,))
BODY = {"model": "auto", "messages": [{"role": "user", "content": "tell me a secret"}],
        "temperature": 0.2, "top_p": 0.9, "seed": 7, "max_tokens": 64, "stream": True}


@pytest.fixture
def receiver():
    """A real OTLP receiver (gRPC and HTTP) on 127.0.0.1."""
    server = OtlpReceiver().start()
    yield server
    server.stop()


def otlp_env(receiver: OtlpReceiver, protocol: str) -> dict[str, str]:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "gw-test", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci,team=ml%20ops"}


def make_ctx(headers: dict[str, str] | None = None, tenant: str = "acme", body: dict | None = None) -> RequestContext:
    """A chat request context as the parse and count stages leave it."""
    request = make_mocked_request("POST", "/v1/chat/completions",
                                  headers={"User-Agent": "openai-python", **(headers or {})})
    body = dict(BODY if body is None else body)
    return RequestContext(http=request, policy=POLICY, request_id="req-42", tenant=Tenant(name=tenant),
                          endpoint="chat", body=body, requested_model="auto", stream=bool(body.get("stream")),
                          max_tokens=body.get("max_tokens"), prompt_tokens=12)


def decision() -> Decision:
    candidates = (Candidate(SMALL, 300.0, 40.0, Decimal("0.0001"), kept=True),
                  Candidate(LARGE, 900.0, 200.0, Decimal("0.002"), kept=False, reasons=("cost",)))
    return Decision(route=ROUTE, plan=(SMALL, LARGE), candidates=candidates, sla_met=True)


def drive_request(telemetry: Telemetry, ctx: RequestContext) -> tuple[dict[str, str], dict[str, str]]:
    """One request through every hook: routing, cache miss, a timed-out attempt, then a streamed answer."""
    telemetry.start_request(ctx, ctx.http.headers)
    with telemetry.route_span(ctx):
        ctx.decision = decision()
    with telemetry.cache_span(ctx):
        ctx.cache_status = "miss"
    failed = Attempt(model=SMALL, started_s=time.perf_counter())
    ctx.attempts.append(failed)
    failed_headers = telemetry.start_attempt(ctx, failed)
    failed.error_type, failed.status, failed.ended_s = "timeout", 504, time.perf_counter()
    failed.cost_usd = Decimal("0.0002")        # GPU time the timed-out call held
    telemetry.end_attempt(ctx, failed)
    answered = Attempt(model=LARGE, started_s=time.perf_counter())
    ctx.attempts.append(answered)
    answered_headers = telemetry.start_attempt(ctx, answered)
    answered.ttft_s, answered.status, answered.ended_s = 0.05, 200, answered.started_s + 0.3
    answered.usage = Usage(input_tokens=10, output_tokens=20, cached_input_tokens=4, reasoning_tokens=3)
    answered.response_id, answered.response_model = "chatcmpl-1", "sim-large-70b-0613"
    answered.finish_reasons = ("stop",)
    answered.cost_usd, answered.energy_j = Decimal("0.00103"), 12.5     # its GPUs measured
    telemetry.end_attempt(ctx, answered, chunk_gaps_s=[0.01, 0.02, 0.03])
    ctx.fallback_state, ctx.fallback_reason = "fallback", "timeout"
    ctx.cache_status, ctx.cost_usd, ctx.energy_j, ctx.usage = "stored", Decimal("0.00123"), 12.5, answered.usage
    telemetry.finish_request(ctx)
    return failed_headers, answered_headers


def start_one_attempt(telemetry: Telemetry, ctx: RequestContext) -> Attempt:
    """A request routed and its one attempt, on `small`, started; the test ends them."""
    telemetry.start_request(ctx, ctx.http.headers)
    with telemetry.route_span(ctx):
        ctx.decision = decision()
    attempt = Attempt(model=SMALL, started_s=time.perf_counter())
    ctx.attempts.append(attempt)
    telemetry.start_attempt(ctx, attempt)
    return attempt


def by_name(spans, name):
    return next(span for span in spans if span.name == name)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_span_tree_continues_caller_trace(receiver, make_telemetry, protocol):
    """The SERVER span continues the caller's traceparent and parents routing, cache and two sibling CLIENT spans."""
    telemetry = make_telemetry(otlp_env(receiver, protocol))
    ctx = make_ctx({"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    failed_headers, answered_headers = drive_request(telemetry, ctx)
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 5)

    server = by_name(spans, "POST /v1/chat/completions")
    assert (server.kind, server.trace_id, server.parent_span_id) == ("SERVER", CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert server.resource["service.name"] == "gw-test"
    assert server.resource["team"] == "ml ops" and server.resource["deployment.environment"] == "ci"
    assert server.schema_url == genai.SCHEMA_URL
    assert {span.trace_id for span in spans} == {CALLER_TRACE_ID}
    for name in ("gateway.route", "gateway.cache.lookup"):
        child = by_name(spans, name)
        assert (child.kind, child.parent_span_id) == ("INTERNAL", server.span_id)
    failed, answered = by_name(spans, "chat sim-small-1b"), by_name(spans, "chat sim-large-70b")
    assert failed.kind == answered.kind == "CLIENT"
    assert failed.parent_span_id == answered.parent_span_id == server.span_id
    assert (failed.status_code, failed.attributes["error.type"]) == ("ERROR", "timeout")
    assert answered.status_code == "UNSET" and "error.type" not in answered.attributes
    assert failed_headers["traceparent"] == f"00-{CALLER_TRACE_ID}-{failed.span_id}-01"
    assert answered_headers["traceparent"] == f"00-{CALLER_TRACE_ID}-{answered.span_id}-01"
    assert answered_headers["tracestate"] == "vendor=abc"
    assert ctx.attempts[1].traceparent == answered_headers["traceparent"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_span_attributes_follow_genai_conventions(receiver, make_telemetry, protocol):
    """Every GenAI, HTTP and gateway attribute arrives with its documented name, value and type."""
    telemetry = make_telemetry(otlp_env(receiver, protocol))
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 5)

    client = by_name(spans, "chat sim-large-70b").attributes
    assert client == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "sim-large-70b",
        "gen_ai.response.model": "sim-large-70b-0613", "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 4,
        "gen_ai.usage.reasoning.output_tokens": 3, "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.2, "gen_ai.request.top_p": 0.9, "gen_ai.request.seed": 7,
        "gen_ai.request.stream": True, "gen_ai.response.time_to_first_chunk": 0.05,
        "server.address": "api.example.com", "server.port": 443,
        "gateway.tenant": "acme", "gateway.route": "chat-default", "gateway.model.selected": "large"}
    assert by_name(spans, "chat sim-small-1b").attributes["server.port"] == 9101
    server = by_name(spans, "POST /v1/chat/completions").attributes
    assert server == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions", "url.path": "/v1/chat/completions",
        "url.scheme": "http", "user_agent.original": "openai-python", "gateway.request.id": "req-42",
        "gateway.tenant": "acme", "http.response.status_code": 200, "gateway.route": "chat-default",
        "gateway.model.selected": "large", "gateway.fallback.state": "fallback",
        "gateway.fallback.reason": "timeout", "gateway.cache.status": "stored", "gateway.sla.met": True,
        "gateway.cost.usd": 0.00123, "gateway.energy.joules": 12.5, "gateway.tokens.estimated": False,
        "gateway.outcome": "success"}
    route = by_name(spans, "gateway.route").attributes
    assert route["gateway.route.candidates"] == ["small", "large"]
    assert route["gateway.route.candidates.kept"] == ["small"]
    assert (route["gateway.model.selected"], route["gateway.sla.met"]) == ("small", True)
    assert by_name(spans, "gateway.cache.lookup").attributes["gateway.cache.status"] == "miss"


def points_by(metric, **labels):
    return [p for p in metric.points if all(p.attributes.get(k) == v for k, v in labels.items())]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_names_units_buckets_and_labels(receiver, make_telemetry, protocol):
    """GenAI histograms carry the advised buckets and labels; gateway counters carry tenant, route, model and state."""
    telemetry = make_telemetry(otlp_env(receiver, protocol))
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.requests")
    metrics = receiver.latest_metrics()

    tokens = metrics["gen_ai.client.token.usage"]
    assert (tokens.kind, tokens.unit) == ("histogram", "{token}")
    (inp,) = points_by(tokens, **{"gen_ai.token.type": "input"})
    (out,) = points_by(tokens, **{"gen_ai.token.type": "output"})
    assert (inp.sum, out.sum, inp.bounds) == (10, 20, list(map(float, TOKEN_BUCKETS)))
    assert inp.attributes["gen_ai.request.model"] == "sim-large-70b"
    assert inp.attributes["gen_ai.provider.name"] == "openai" and inp.attributes["gateway.tenant"] == "acme"
    assert inp.attributes["gateway.fallback.state"] == "fallback"
    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s" and duration.points[0].bounds == list(DURATION_BUCKETS_S)
    (failed,) = points_by(duration, **{"error.type": "timeout"})
    assert failed.attributes["gen_ai.request.model"] == "sim-small-1b" and failed.count == 1
    assert failed.attributes["gateway.fallback.state"] == "fallback"     # the request's state, as it ended
    assert points_by(duration, **{"gen_ai.request.model": "sim-large-70b"})[0].sum == pytest.approx(0.3)
    ttfc = metrics["gen_ai.client.operation.time_to_first_chunk"]
    assert (ttfc.unit, ttfc.points[0].sum, ttfc.points[0].bounds) == ("s", 0.05, list(DURATION_BUCKETS_S))
    tpoc = metrics["gen_ai.client.operation.time_per_output_chunk"]
    assert (tpoc.points[0].count, tpoc.points[0].bounds) == (3, list(DURATION_BUCKETS_S))

    labels = {"gateway.tenant": "acme", "gateway.route": "chat-default", "gateway.model.selected": "large",
              "gateway.fallback.state": "fallback"}
    requests = metrics["gateway.requests"]
    assert requests.monotonic and requests.points[0].attributes == labels and requests.points[0].value == 1
    cost = metrics["gateway.cost"]      # each attempt's cost under the model that ran it
    assert cost.unit == "USD" and points_by(cost, **labels)[0].value == pytest.approx(0.00103)
    (failed_cost,) = points_by(cost, **{"gateway.model.selected": "small"})
    assert failed_cost.value == pytest.approx(0.0002)
    assert failed_cost.attributes == {**labels, "gateway.model.selected": "small"}
    assert metrics["gateway.energy"].unit == "J" and metrics["gateway.energy"].points[0].value == 12.5
    assert points_by(metrics["gateway.cache.lookups"], **{"gateway.cache.status": "stored"})[0].value == 1
    assert points_by(metrics["gateway.fallbacks"], **{"gateway.fallback.reason": "timeout"})[0].value == 1
    assert points_by(metrics["gateway.sla"], **{"gateway.sla.status": "met"})[0].value == 1
    assert points_by(metrics["gateway.outcomes"], **{"gateway.outcome": "success"})[0].value == 1
    assert metrics["gateway.routing.duration"].unit == "s" and metrics["gateway.routing.duration"].points[0].count == 1
    assert {p.value for p in metrics["gateway.in_flight"].points} == {0}
    (error,) = metrics["gateway.tokens.estimate_error"].points
    assert (error.sum, error.attributes["gateway.tokens.error.direction"]) == (2, "over")
    assert {p.value for p in metrics["gateway.telemetry.dropped"].points} == {0}



def test_sla_counts_requests_their_plan_served_and_refusals_for_the_sla(receiver, make_telemetry):
    """gateway.sla counts a request refused at admission (after routing, before any model) not at all, and one
    refused because no model meets its SLA as missed; a served one by its decision (met here)."""
    from gateway.errors import NoModelMeetsSla, RateLimited
    telemetry = make_telemetry(otlp_env(receiver, "grpc"))
    drive_request(telemetry, make_ctx())                # served: met
    refused = make_ctx(tenant="limited")
    telemetry.start_request(refused, refused.http.headers)
    with telemetry.route_span(refused):
        refused.decision = decision()
    refused.error, refused.status = RateLimited("slow down"), 429
    telemetry.finish_request(refused)
    unmet = make_ctx(tenant="strict")
    telemetry.start_request(unmet, unmet.http.headers)
    unmet.error, unmet.status = NoModelMeetsSla("no model meets the SLA"), 503
    telemetry.finish_request(unmet)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.sla")
    sla = receiver.latest_metrics()["gateway.sla"]
    assert sorted((p.attributes["gateway.tenant"], p.attributes["gateway.sla.status"], p.value)
                  for p in sla.points) == [("acme", "met", 1), ("strict", "missed", 1)]


def test_an_error_without_a_code_has_an_outcome_of_its_status_not_a_class_name():
    """A 400 for JSON that does not parse (OpenAI's answer has no code) is outcome http_400 in metrics and the
    ledger, not the exception's class name; an error with a code keeps it."""
    from gateway.errors import ClientError
    ctx = make_ctx()
    ctx.error, ctx.status = ClientError("could not parse the body as JSON", code=None), 400
    assert genai.outcome(ctx) == "http_400"
    ctx.error = ClientError("bad", code="invalid_type")
    assert genai.outcome(ctx) == "invalid_type"

def test_invalid_traceparent_starts_a_new_trace(receiver, make_telemetry):
    """A malformed traceparent is ignored: the SERVER span becomes the root of a fresh trace."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx({"traceparent": "00-not-a-trace-01"})
    telemetry.start_request(ctx, ctx.http.headers)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    (server,) = receiver.wait_for_spans(lambda got: got)
    assert server.parent_span_id == "" and len(server.trace_id) == 32 and server.trace_id != "0" * 32


@pytest.mark.parametrize(("value", "disabled"), [
    ("true", True), ("TRUE", True), (" True ", True), ("1", True), ("yes", True), ("On", True),
    ("false", False), ("0", False), ("", False), ("no", False)])
def test_otel_sdk_disabled_takes_any_case_and_the_usual_yes_words(value, disabled):
    """OTEL_SDK_DISABLED (and every yes/no switch) is on for true, 1, yes or on in any case, spaces around ignored,
    and off for anything else: an operator's TRUE turns telemetry off as the OpenTelemetry spec says."""
    assert TelemetryConfig.from_env(environ={"OTEL_SDK_DISABLED": value}).disabled is disabled


def test_sdk_disabled_makes_every_hook_a_noop(receiver, make_telemetry):
    """OTEL_SDK_DISABLED=true: no providers, no span on the context, no headers, nothing exported."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"), "OTEL_SDK_DISABLED": "true"})
    ctx = make_ctx({"traceparent": TRACEPARENT})
    failed_headers, answered_headers = drive_request(telemetry, ctx)
    assert not telemetry.enabled and telemetry.tracer_provider is None and telemetry.meter_provider is None
    assert ctx.span is None and failed_headers == answered_headers == {} and ctx.attempts[0].span is None
    assert telemetry.force_flush() and telemetry.prometheus_text() == b""
    time.sleep(0.2)
    assert receiver.spans == [] and receiver.metric_exports == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_unreachable_collector_does_not_block_and_counts_failures(make_telemetry, protocol):
    """With no collector listening, hooks return at once and the lost spans and points are counted."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
           "OTEL_BSP_SCHEDULE_DELAY": "10"}
    telemetry = make_telemetry(env)
    started_s = time.perf_counter()
    drive_request(telemetry, make_ctx())
    assert time.perf_counter() - started_s < 0.5
    telemetry.force_flush(timeout_s=2)
    counts = telemetry.dropped_counter.by_kind()
    assert counts[("traces", "export_failed")] == 5
    assert counts[("metrics", "export_failed")] > 0 and telemetry.dropped >= 5


def test_full_span_queue_drops_are_counted_and_shutdown_is_bounded(receiver, make_telemetry):
    """While the collector stalls, spans beyond the bounded queue are counted as dropped; shutdown keeps its timeout."""
    env = {**otlp_env(receiver, "http/protobuf"), "OTEL_BSP_MAX_QUEUE_SIZE": "4",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2", "OTEL_METRICS_EXPORTER": "none"}
    telemetry = make_telemetry(env)
    receiver.hold()
    for _ in range(30):
        ctx = make_ctx()
        telemetry.start_request(ctx, ctx.http.headers)
        telemetry.finish_request(ctx)
    assert telemetry.dropped_counter.by_kind()[("traces", "queue_full")] >= 20
    started_s = time.perf_counter()
    assert telemetry.shutdown(timeout_s=0.5) is False
    assert time.perf_counter() - started_s < 1.5
    receiver.release()


def test_tenant_labels_keep_allowlist_and_first_n():
    """Allowlisted and the first top_n tenants keep their names; every later tenant becomes `other`."""
    labels = TenantLabels(allowlist=("vip",), top_n=2)
    assert [labels.label(t) for t in ("a", "b", "c", "vip", "a", "d")] == ["a", "b", "other", "vip", "a", "other"]


def test_tenants_a_reload_removed_give_their_label_places_to_the_next_ones_seen():
    """The first top_n tenants keep their names; once a reload removes one, the next new tenant takes its place
    rather than being `other` for as long as the process runs; the allowlist is kept whatever happens."""
    labels = TenantLabels(allowlist=("vip",), top_n=2)
    assert [labels.label(t) for t in ("a", "b", "c")] == ["a", "b", "other"]
    labels.keep_only(("b", "c", "d"))
    assert [labels.label(t) for t in ("c", "d", "b", "vip")] == ["c", "other", "b", "vip"]


def test_tenant_metric_label_is_bounded(receiver, make_telemetry):
    """With top_n=1, a second and third tenant are counted under `other` in gateway.requests."""
    policy = PolicyTelemetry(tenant_label_top_n=1)
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"), policy)
    for tenant in ("first", "second", "third"):
        ctx = make_ctx(tenant=tenant)
        telemetry.start_request(ctx, ctx.http.headers)
        telemetry.finish_request(ctx)
    telemetry.force_flush()
    requests = receiver.wait_for_metric("gateway.requests")
    assert {p.attributes["gateway.tenant"]: p.value for p in requests.points} == {"first": 1, "other": 2}


@pytest.mark.parametrize(("env_value", "captured"), [(None, False), ("false", False), ("true", True)])
def test_message_content_only_with_capture_env(receiver, make_telemetry, env_value, captured):
    """Prompt text reaches the CLIENT span as gen_ai.input.messages only when the capture variable is true."""
    env = otlp_env(receiver, "http/protobuf")
    if env_value is not None:
        env["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = env_value
    telemetry = make_telemetry(env)
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 5)
    assert not any("secret" in json.dumps(span.attributes) for span in spans if span.kind != "CLIENT")
    client = by_name(spans, "chat sim-large-70b").attributes
    if captured:
        assert json.loads(client["gen_ai.input.messages"]) == [
            {"role": "user", "parts": [{"type": "text", "content": "tell me a secret"}]}]
    else:
        assert "gen_ai.input.messages" not in client


def test_always_off_sampler_exports_no_spans_but_metrics(receiver, make_telemetry):
    """OTEL_TRACES_SAMPLER=always_off drops spans at the source while metrics still flow."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"), "OTEL_TRACES_SAMPLER": "always_off"})
    ctx = make_ctx()
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.requests")
    assert receiver.spans == [] and not ctx.span.is_recording()
    metrics = receiver.latest_metrics()     # an unsampled request's attempts are measured all the same
    assert sum(point.count for point in metrics["gen_ai.client.operation.duration"].points) == 2
    assert sum(point.sum for point in metrics["gen_ai.client.token.usage"].points) == 10 + 20


def test_unsampled_request_gets_no_child_spans_but_keeps_its_trace_context(make_telemetry):
    """A request whose trace is sampled out creates no route or cache span, yet still propagates upstream."""
    telemetry = make_telemetry({"OTEL_TRACES_SAMPLER": "always_off", "OTEL_METRICS_EXPORTER": "none"})
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    with telemetry.route_span(ctx) as route_span:
        ctx.decision = decision()
    with telemetry.cache_span(ctx) as cache_span:
        ctx.cache_status = "miss"
    assert route_span is None and cache_span is None
    attempt = Attempt(model=SMALL, started_s=time.perf_counter())
    ctx.attempts.append(attempt)
    headers = telemetry.start_attempt(ctx, attempt)
    _version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert int(flags, 16) & 0x01 == 0                    # propagated, flagged not sampled
    assert int(trace_id, 16) == ctx.span.context.trace_id and int(span_id, 16) != ctx.span.context.span_id
    assert ctx.span.children == []


def test_attribute_mapping_drops_unknown_and_mistyped_values():
    """The pure mapping never emits None, skips mistyped parameters, and names embeddings correctly."""
    ctx = make_ctx(body={"model": "auto", "input": "hi", "temperature": True, "seed": "7"})
    ctx.endpoint = "embeddings"
    attempt = Attempt(model=SMALL, started_s=0.0, usage=Usage(input_tokens=3))
    attributes = genai.attempt_attributes(ctx, attempt)
    assert attributes == {"gen_ai.operation.name": "embeddings", "gen_ai.provider.name": "openai",
                          "gen_ai.request.model": "sim-small-1b", "server.address": "10.0.0.5",
                          "server.port": 9101, "gen_ai.usage.input_tokens": 3}
    assert None not in genai.gateway_attributes(ctx).values()
    assert content.input_messages(ctx) == []


def test_prometheus_text_exposes_metrics(make_telemetry):
    """With prometheus on, prometheus_text() renders the GenAI histogram and gateway counters."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    telemetry = make_telemetry({}, PolicyTelemetry(prometheus=True))
    drive_request(telemetry, make_ctx())
    text = telemetry.prometheus_text().decode()
    assert telemetry.prometheus_enabled
    assert 'gen_ai_client_token_usage_bucket' in text and 'gateway_requests' in text
    assert 'gateway_tenant="acme"' in text


def test_policy_gauges_follow_the_current_policy(make_telemetry):
    """max_concurrency per model and budgets per tenant are exported, read from whatever policy is current."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    from gateway.policy.load import parse_policy

    def policy_text(concurrency: int) -> str:
        return f"""
version: 1
models:
  small: {{endpoint: "http://127.0.0.1:9/v1", max_concurrency: {concurrency}}}
routes:
  - {{name: chat, candidates: [small]}}
tenants:
  acme: {{keys_sha256: ["{'a' * 64}"], budget: {{usd_per_day: 5, usd_per_month: 90}}}}
"""
    current = {"policy": parse_policy(policy_text(8))}
    telemetry = make_telemetry({}, PolicyTelemetry(prometheus=True))
    telemetry.observe_policy(lambda: current["policy"])
    text = telemetry.prometheus_text().decode()
    assert re.search(r'^gateway_model_max_concurrency\S*\{[^}]*gateway_model_selected="small"[^}]*\} 8\.0$', text, re.M)
    assert re.search(r'^gateway_budget_limit_USD\{[^}]*gateway_budget_period="day"[^}]*\} 5\.0$', text, re.M)
    assert re.search(r'^gateway_budget_limit_USD\{[^}]*gateway_budget_period="month"[^}]*\} 90\.0$', text, re.M)
    current["policy"] = parse_policy(policy_text(32))
    text = telemetry.prometheus_text().decode()
    assert re.search(r'^gateway_model_max_concurrency\S*\{[^}]*\} 32\.0$', text, re.M)


def test_attribute_value_length_limit_cuts_string_values(receiver, make_telemetry, monkeypatch):
    """OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT cuts string attribute values on the wire, as the SDK's spans would."""
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx(tenant="acme-corporation")
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 5)
    server = by_name(spans, "POST /v1/chat/completions")
    assert server.attributes["gateway.tenant"] == "acme"
    assert server.attributes["http.response.status_code"] == 200


def test_attribute_count_limit_drops_extra_attributes(receiver, make_telemetry, monkeypatch):
    """OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT bounds every span's attributes, as the SDK's spans would be bounded."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 5)
    assert spans and all(len(span.attributes) <= 3 for span in spans)
    assert len(by_name(spans, "POST /v1/chat/completions").attributes) == 3


def test_a_5xx_answer_is_an_error_server_span_whose_error_type_is_its_status_code(receiver, make_telemetry):
    """A request answered 500 or 503 is an ERROR SERVER span with error.type its status code ("500"), as the HTTP
    conventions say; one answered 429 is the client's error: no error.type, status unset."""
    from gateway.errors import UpstreamStatus
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    for status in (500, 503, 429):
        ctx = make_ctx()
        telemetry.start_request(ctx, ctx.http.headers)
        ctx.error, ctx.status = UpstreamStatus("the model failed", upstream_status=status), status
        telemetry.finish_request(ctx)
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 3)
    exported = {span.attributes["http.response.status_code"]: (span.status_code, span.attributes.get("error.type"))
                for span in spans}
    assert exported == {500: ("ERROR", "500"), 503: ("ERROR", "503"), 429: ("UNSET", None)}


def test_route_span_says_what_was_considered_kept_and_planned(receiver, make_telemetry):
    """gateway.route carries the plan in its order (not the candidate list), whether the choice explored and the
    SLA verdict: here a decision that explored, planned only large and missed its SLA."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    with telemetry.route_span(ctx):
        ctx.decision = replace(decision(), plan=(LARGE,), sla_met=False, explored=True)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    spans = receiver.wait_for_spans(lambda got: len(got) >= 2)
    assert by_name(spans, "gateway.route").attributes == {
        "gateway.tenant": "acme", "gateway.route": "chat-default", "gateway.sla.met": False,
        "gateway.route.explored": True, "gateway.route.candidates": ["small", "large"],
        "gateway.route.candidates.kept": ["small"], "gateway.route.plan": ["large"],
        "gateway.model.selected": "large"}


def test_a_failed_attempts_metrics_name_the_model_that_ran_it_and_an_answer_its_response_model(
        receiver, make_telemetry):
    """The timed-out first attempt's duration is labelled with its own model (small, not large, whose fallback
    answered) and no response model; the answer's duration and token usage carry gen_ai.response.model."""
    telemetry = make_telemetry(otlp_env(receiver, "grpc"))
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    metrics = {name: receiver.wait_for_metric(name) for name in ("gen_ai.client.operation.duration",
                                                                  "gen_ai.client.token.usage")}
    common = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gateway.tenant": "acme",
              "gateway.route": "chat-default", "gateway.fallback.state": "fallback"}
    (failed,) = points_by(metrics["gen_ai.client.operation.duration"], **{"error.type": "timeout"})
    assert failed.attributes == {**common, "gen_ai.request.model": "sim-small-1b", "server.address": "10.0.0.5",
                                 "server.port": 9101, "gateway.model.selected": "small", "error.type": "timeout"}
    answered = {"gen_ai.request.model": "sim-large-70b", "server.address": "api.example.com", "server.port": 443,
                "gateway.model.selected": "large", "gen_ai.response.model": "sim-large-70b-0613"}
    (duration,) = points_by(metrics["gen_ai.client.operation.duration"], **{"gen_ai.request.model": "sim-large-70b"})
    assert duration.attributes == {**common, **answered}
    assert [point.attributes for point in metrics["gen_ai.client.token.usage"].points] == [
        {**common, **answered, "gen_ai.token.type": kind} for kind in ("input", "output")]


def test_chunk_gaps_and_routing_time_are_recorded_in_seconds(receiver, make_telemetry):
    """time_per_output_chunk sums the stream's gaps in seconds (0.01 + 0.02 + 0.03), and gateway.routing.duration
    is the routing time in seconds the request measured, not milliseconds."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.routing.duration")
    metrics = receiver.latest_metrics()
    (gaps,) = metrics["gen_ai.client.operation.time_per_output_chunk"].points
    assert (gaps.count, gaps.sum) == (3, pytest.approx(0.06))
    (routing,) = metrics["gateway.routing.duration"].points
    assert (routing.count, routing.sum) == (1, pytest.approx(ctx.routing_s))
    assert routing.attributes == {"gateway.tenant": "acme", "gateway.route": "chat-default"}


def test_no_metric_names_a_tenant_past_the_label_bound(receiver, make_telemetry):
    """With tenant_label_top_n: 1, the second and third tenants appear as `other` on every metric that carries
    a tenant (routing time, attempt durations, token usage, counters, task outcomes), never by name."""
    from gateway.outcomes import Task
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"), PolicyTelemetry(tenant_label_top_n=1))
    for tenant in ("first", "second", "third"):
        drive_request(telemetry, make_ctx(tenant=tenant))
        telemetry.record_outcome(Task(route="chat-default", tenant=tenant, workflow="wf", cost_usd=Decimal("0.001"),
                                      outcome="success"))
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.task.outcomes")
    tenants = {name: {point.attributes["gateway.tenant"] for point in metric.points
                      if "gateway.tenant" in point.attributes}
               for name, metric in receiver.latest_metrics().items()}
    assert {name for name, seen in tenants.items() if seen} >= {
        "gateway.routing.duration", "gen_ai.client.operation.duration", "gen_ai.client.token.usage",
        "gateway.requests", "gateway.cost", "gateway.task.outcomes", "gateway.task.cost"}
    assert {name: seen for name, seen in tenants.items() if seen - {"first", "other"}} == {}


def test_counters_count_only_what_happened(receiver, make_telemetry):
    """A request its first model answered from a cache-less route is no fallback and no cache lookup (bypass);
    an embeddings answer has input tokens only; an exact prompt estimate is an error of 0, direction `exact`;
    gateway.in_flight is an up-down counter."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    drive_request(telemetry, make_ctx())            # a fallback, a cache miss then stored
    embed = make_ctx(tenant="embedder", body={"model": "auto", "input": "hi"})
    embed.endpoint = "embeddings"
    attempt = start_one_attempt(telemetry, embed)
    attempt.status, attempt.ended_s, attempt.usage = 200, attempt.started_s + 0.1, Usage(input_tokens=12)
    telemetry.end_attempt(embed, attempt)
    embed.usage = attempt.usage
    telemetry.finish_request(embed)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.requests")
    metrics = receiver.latest_metrics()

    embedder = {"gateway.tenant": "embedder"}
    assert points_by(metrics["gateway.requests"], **embedder)[0].value == 1
    assert [p.attributes["gateway.tenant"] for p in metrics["gateway.fallbacks"].points] == ["acme"]
    assert {p.attributes["gateway.cache.status"] for p in metrics["gateway.cache.lookups"].points} == {"stored"}
    assert [(p.attributes["gen_ai.token.type"], p.sum) for p in points_by(
        metrics["gen_ai.client.token.usage"], **embedder)] == [("input", 12)]
    errors = {p.attributes["gateway.tokens.error.direction"]: p.sum
              for p in metrics["gateway.tokens.estimate_error"].points}
    assert errors == {"over": 2, "exact": 0}
    assert metrics["gateway.in_flight"].monotonic is False


def test_a_stage_that_raises_inside_a_child_span_ends_it_failed_with_its_error_type(receiver, make_telemetry):
    """Routing that raises (no model meets the SLA) ends the gateway.route span as an error whose error.type is
    the error's code, so a trace shows which stage failed and why."""
    from gateway.errors import NoModelMeetsSla
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    with pytest.raises(NoModelMeetsSla) as refused, telemetry.route_span(ctx):
        raise NoModelMeetsSla("no model meets the SLA")
    ctx.error, ctx.status = refused.value, 503
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    route = by_name(receiver.wait_for_spans(lambda got: len(got) >= 2), "gateway.route")
    assert (route.status_code, route.status_message, route.attributes.get("error.type")) == (
        "ERROR", "no model meets the SLA", "sla_unmet")


def test_a_request_the_client_left_has_outcome_client_disconnected(receiver, make_telemetry):
    """A request that ended 499 (the client left; no error raised) is gateway.outcome client_disconnected on its
    SERVER span and in gateway.outcomes, as its CLIENT span's error.type says, and is no server error."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    ctx.status = 499
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    (server,) = receiver.wait_for_spans(lambda got: got)
    assert server.attributes["gateway.outcome"] == "client_disconnected"
    assert server.status_code == "UNSET" and "error.type" not in server.attributes
    outcomes = receiver.wait_for_metric("gateway.outcomes")
    assert [p.attributes["gateway.outcome"] for p in outcomes.points] == ["client_disconnected"]


def label_sets(metric) -> list[list[tuple]]:
    return sorted(sorted(point.attributes.items()) for point in metric.points)


def test_every_per_request_counter_carries_the_four_dashboard_labels_and_its_own_only(receiver, make_telemetry):
    """gateway.requests, outcomes, cost, energy, cache.lookups, cache.saved, fallbacks and sla carry tenant, route,
    model and fallback state (and their own label), nothing per request: a fallback answer, then a cache hit."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    drive_request(telemetry, make_ctx())
    hit = make_ctx()
    telemetry.start_request(hit, hit.http.headers)
    with telemetry.route_span(hit):
        hit.decision = decision()
    with telemetry.cache_span(hit):
        hit.cache_status = "hit"
    hit.cache_saved_usd = Decimal("0.001")
    telemetry.finish_request(hit)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.cache.saved")
    metrics = receiver.latest_metrics()

    fallback = {"gateway.tenant": "acme", "gateway.route": "chat-default", "gateway.model.selected": "large",
                "gateway.fallback.state": "fallback"}
    cached = {**fallback, "gateway.model.selected": "small", "gateway.fallback.state": "none"}
    expected = {
        "gateway.requests": [fallback, cached],
        "gateway.outcomes": [{**fallback, "gateway.outcome": "success"}, {**cached, "gateway.outcome": "cache_hit"}],
        "gateway.cost": [fallback, {**fallback, "gateway.model.selected": "small"}, cached],
        "gateway.energy": [fallback],
        "gateway.cache.lookups": [{**fallback, "gateway.cache.status": "stored"},
                                  {**cached, "gateway.cache.status": "hit"}],
        "gateway.cache.saved": [cached],
        "gateway.fallbacks": [{**fallback, "gateway.fallback.reason": "timeout"}],
        "gateway.sla": [{**fallback, "gateway.sla.status": "met"}, {**cached, "gateway.sla.status": "met"}]}
    for name, labels in expected.items():
        assert label_sets(metrics[name]) == sorted(sorted(each.items()) for each in labels), name


def test_queue_waits_are_recorded_in_seconds_by_model_tenant_and_result(receiver, make_telemetry):
    """gateway.queue.wait records each attempt's wait for a call slot, in seconds, under its model, its tenant and
    its result (a slot taken at once is no wait); the SERVER span carries the request's total wait."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    for model, result, queued_s in ((SMALL, "timeout", 0.25), (LARGE, "granted", 0.0), (LARGE, "granted", 0.5)):
        ctx.attempts.append(Attempt(model=model, started_s=0.0, queued_s=queued_s, queue_result=result))
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    waits = receiver.wait_for_metric("gateway.queue.wait")
    assert waits.unit == "s"
    assert sorted((sorted(p.attributes.items()), p.count, p.sum) for p in waits.points) == [
        ([("gateway.model.selected", "large"), ("gateway.queue.result", "granted"), ("gateway.tenant", "acme")],
         1, 0.5),
        ([("gateway.model.selected", "small"), ("gateway.queue.result", "timeout"), ("gateway.tenant", "acme")],
         1, 0.25)]
    (server,) = receiver.wait_for_spans(lambda got: got)
    assert server.attributes["gateway.queue.wait"] == 0.75


def test_an_answer_cut_short_before_its_usage_counts_the_tokens_the_gateway_counted(receiver, make_telemetry):
    """The client left mid-stream before the model sent its usage: gen_ai.client.token.usage still counts the
    tokens the gateway counted for it (what it was charged for), under error.type client_disconnected."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    attempt = start_one_attempt(telemetry, ctx)
    attempt.error_type, attempt.ended_s = "client_disconnected", attempt.started_s + 0.2
    telemetry.end_attempt(ctx, attempt)
    ctx.status, ctx.usage = 499, Usage(input_tokens=12, output_tokens=7, estimated=True)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    tokens = receiver.wait_for_metric("gen_ai.client.token.usage")
    assert sorted((p.attributes["gen_ai.token.type"], p.attributes["error.type"], p.sum) for p in tokens.points) == [
        ("input", "client_disconnected", 12), ("output", "client_disconnected", 7)]


def test_the_server_span_ends_when_the_request_ended_not_when_it_was_recorded(receiver, make_telemetry):
    """A request's spans are recorded after its response was written: the SERVER span ends when the request
    ended (ctx.ended_s), not at the later moment finish_request ran."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    ctx.ended_s = time.perf_counter()
    time.sleep(0.2)                      # the recording comes later
    recorded_ns = time.time_ns()
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    (server,) = receiver.wait_for_spans(lambda got: got)
    assert server.end_ns <= recorded_ns - 100_000_000


def test_tenant_label_top_n_zero_names_only_the_allowlisted_tenants():
    """tenant_label_top_n: 0 keeps no tenant's name but the allowlisted ones: the first tenant seen is `other` too."""
    labels = TenantLabels(allowlist=("vip",), top_n=0)
    assert [labels.label(t) for t in ("a", "vip", "b")] == ["other", "vip", "other"]


def test_tenants_allowed_later_join_the_allowlist_rather_than_replace_it():
    """A reload allows the tenants it names: the ones allowed before keep their names too."""
    labels = TenantLabels(allowlist=("vip",), top_n=0)
    labels.allow(("gold",))
    assert [labels.label(t) for t in ("vip", "gold", "walk-in")] == ["vip", "gold", "other"]


@pytest.mark.parametrize(("preference", "histograms", "sums"), [("delta", "DELTA", "DELTA"),
                                                                ("lowmemory", "DELTA", "CUMULATIVE"),
                                                                ("cumulative", "CUMULATIVE", "CUMULATIVE"),
                                                                ("Delta", "DELTA", "DELTA")])
def test_the_temporality_preference_marks_histograms_and_sums_as_the_spec_says(receiver, make_telemetry, preference,
                                                                              histograms, sums):
    """OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE (any case): delta makes histograms and counters delta;
    lowmemory makes histograms delta and observable counters cumulative; a delta point holds only its interval."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"),
                                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": preference})
    for exports in (1, 2):
        drive_request(telemetry, make_ctx())
        telemetry.force_flush()
        receiver.wait_for(lambda: len(receiver.metric_exports) >= exports)
    metrics = receiver.latest_metrics()
    duration, requests = metrics["gen_ai.client.operation.duration"], metrics["gateway.requests"]
    assert (duration.temporality, requests.temporality) == (histograms, sums)
    (answered,) = points_by(duration, **{"gen_ai.request.model": "sim-large-70b"})
    assert answered.count == (1 if histograms == "DELTA" else 2)
    assert requests.points[0].value == (1 if sums == "DELTA" else 2)


def test_a_span_queue_smaller_than_the_export_batch_still_exports(receiver, make_telemetry):
    """OTEL_BSP_MAX_QUEUE_SIZE below the default batch size of 512: the batch is cut to the queue, not refused."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"), "OTEL_BSP_MAX_QUEUE_SIZE": "4"})
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    assert [span.kind for span in receiver.wait_for_spans(len)] == ["SERVER"]


def one_span():
    """A finished span as the SDK hands it to an exporter."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    return ReadableSpan("gateway.route", context=SpanContext(7, 9, is_remote=False), resource=Resource.create({}),
                        attributes={"gateway.tenant": "acme"}, start_time=1, end_time=2)


def test_a_span_batch_over_the_max_request_size_is_dropped_and_one_of_that_size_is_sent(receiver):
    """As the SDK exporter does: a batch of exactly max_request_size bytes is sent, one byte over is dropped and
    reported failed (so it is counted lost), and nothing of it reaches the collector."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    from gateway.telemetry.encoding import SpanEncoder
    from gateway.telemetry.otlp_http import HttpSpanExporter

    spans = [one_span()]
    size = len(SpanEncoder().encode(spans))
    endpoint = f"{receiver.http_endpoint}/v1/traces"
    too_small = HttpSpanExporter(endpoint=endpoint, max_request_size=size - 1)
    assert too_small.export(spans) is SpanExportResult.FAILURE
    exact = HttpSpanExporter(endpoint=endpoint, max_request_size=size)
    assert exact.export(spans) is SpanExportResult.SUCCESS
    assert len(receiver.spans) == 1
    for exporter in (too_small, exact):
        exporter.shutdown()


def test_a_shut_down_http_span_exporter_sends_nothing(receiver):
    """After shutdown, export fails at once, as the SDK's does, rather than posting through a closed client."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    from gateway.telemetry.otlp_http import HttpSpanExporter

    exporter = HttpSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces")
    assert exporter.export([one_span()]) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert exporter.export([one_span()]) is SpanExportResult.FAILURE
    assert len(receiver.spans) == 1


@pytest.mark.parametrize("signal", ["traces", "metrics"])
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_stalled_collector_fails_an_export_within_the_configured_timeout(receiver, protocol, signal):
    """OTEL_EXPORTER_OTLP_TIMEOUT bounds a span or metric export: a collector that stalls costs the exporter's
    thread that long, not the SDK's default of 10 s, and the batch is reported failed."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExportResult

    from gateway.telemetry.config import SignalExport
    from gateway.telemetry.exporters import otlp_metric_exporter, otlp_span_exporter

    endpoint = receiver.grpc_endpoint if protocol == "grpc" else f"{receiver.http_endpoint}/v1/{signal}"
    export = SignalExport(protocol, endpoint, timeout_s=0.5, insecure=True)
    if signal == "traces":
        exporter, batch, failure = otlp_span_exporter(export), [one_span()], SpanExportResult.FAILURE
    else:
        reader = InMemoryMetricReader()
        MeterProvider(metric_readers=[reader]).get_meter("gw").create_counter("gateway.requests").add(1)
        exporter = otlp_metric_exporter(export, "cumulative")
        batch, failure = reader.get_metrics_data(), MetricExportResult.FAILURE
    receiver.hold()
    try:
        started_s = time.perf_counter()
        assert exporter.export(batch) is failure
        assert time.perf_counter() - started_s < 4
    finally:
        receiver.release()
        exporter.shutdown()


def test_task_outcomes_count_tasks_and_task_cost_adds_their_usd_by_outcome(receiver, make_telemetry):
    """gateway.task.cost adds each judged task's cost in USD under its outcome, so cost per successful task is
    the sum over outcomes / successes; gateway.task.outcomes counts the tasks under the same labels."""
    from gateway.outcomes import Task
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    for cost_usd, outcome in (("0.25", "success"), ("0.5", "success"), ("0.125", "failure")):
        telemetry.record_outcome(Task(route="chat-default", tenant="acme", workflow="wf", cost_usd=Decimal(cost_usd),
                                      outcome=outcome))
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.task.cost")
    metrics = receiver.latest_metrics()
    labels = {"gateway.route": "chat-default", "gateway.tenant": "acme", "gateway.workflow": "wf"}
    for name, unit, success, failure in (("gateway.task.cost", "USD", 0.75, 0.125),
                                         ("gateway.task.outcomes", "{task}", 2, 1)):
        metric = metrics[name]
        assert (metric.unit, metric.monotonic) == (unit, True), name
        assert sorted((sorted(p.attributes.items()), p.value) for p in metric.points) == [
            (sorted({**labels, "gateway.task.outcome": "failure"}.items()), failure),
            (sorted({**labels, "gateway.task.outcome": "success"}.items()), success)], name


def test_money_counters_are_in_usd_and_energy_in_joules(receiver, make_telemetry):
    """Every counter a finance dashboard sums is declared in USD (cost, what the cache saved, task cost) and the
    attributed GPU energy in J, as the unit a backend shows and converts by."""
    from gateway.outcomes import Task
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    drive_request(telemetry, make_ctx())
    hit = make_ctx()
    telemetry.start_request(hit, hit.http.headers)
    hit.cache_status, hit.cache_saved_usd = "hit", Decimal("0.001")
    telemetry.finish_request(hit)
    telemetry.record_outcome(Task(route="chat-default", tenant="acme", workflow="wf", cost_usd=Decimal("0.001"),
                                  outcome="success"))
    telemetry.force_flush()
    receiver.wait_for(lambda: {"gateway.cache.saved", "gateway.task.cost"} <= set(receiver.latest_metrics()))
    metrics = receiver.latest_metrics()
    units = {name: metrics[name].unit for name in ("gateway.cost", "gateway.cache.saved", "gateway.task.cost",
                                                    "gateway.energy")}
    assert units == {"gateway.cost": "USD", "gateway.cache.saved": "USD", "gateway.task.cost": "USD",
                     "gateway.energy": "J"}
    assert [p.value for p in metrics["gateway.cache.saved"].points] == [pytest.approx(0.001)]


def test_the_prompt_estimate_error_is_its_size_either_way_and_only_against_a_reported_count(receiver, make_telemetry):
    """An estimate 3 tokens under the model's count is recorded as 3, direction `under`; an answer whose usage the
    gateway counted itself (estimated) has no upstream count to judge the estimate by, so records none."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    for usage in (Usage(input_tokens=15, output_tokens=4), Usage(input_tokens=20, output_tokens=5, estimated=True)):
        ctx = make_ctx()                                    # the gateway estimated 12 prompt tokens
        attempt = start_one_attempt(telemetry, ctx)
        attempt.status, attempt.ended_s, attempt.usage = 200, attempt.started_s + 0.1, usage
        telemetry.end_attempt(ctx, attempt)
        ctx.usage = usage
        telemetry.finish_request(ctx)
    telemetry.force_flush()
    errors = receiver.wait_for_metric("gateway.tokens.estimate_error")
    assert [(p.attributes, p.count, p.sum) for p in errors.points] == [
        ({"gateway.model.selected": "small", "gateway.tokens.error.direction": "under"}, 1, 3)]


def test_a_retry_without_a_known_reason_is_still_counted_as_a_fallback(receiver, make_telemetry):
    """A request that retried its model is counted in gateway.fallbacks under its state, with reason `unknown`
    when no attempt said why: every retried or fallen-back request is counted, whatever is known of it."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    ctx.attempts.extend(Attempt(model=SMALL, started_s=0.0) for _ in range(2))
    ctx.fallback_state = "retried"
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    fallbacks = receiver.wait_for_metric("gateway.fallbacks")
    assert [(p.attributes["gateway.fallback.state"], p.attributes["gateway.fallback.reason"], p.value)
            for p in fallbacks.points] == [("retried", "unknown", 1)]


def test_an_attempts_duration_leaves_out_its_wait_for_a_call_slot(receiver, make_telemetry):
    """gen_ai.client.operation.duration is the model's time, from the slot taken to the answer: the 0.5 s the
    attempt queued for a slot is gateway.queue.wait, not part of its 0.3 s duration."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    attempt = start_one_attempt(telemetry, ctx)
    attempt.queued_s, attempt.queue_result = 0.5, "granted"
    attempt.status, attempt.ended_s = 200, attempt.started_s + 0.3
    attempt.usage = ctx.usage = Usage(input_tokens=12, output_tokens=3)
    telemetry.end_attempt(ctx, attempt)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.queue.wait")
    metrics = receiver.latest_metrics()
    assert [(p.count, p.sum) for p in metrics["gen_ai.client.operation.duration"].points] == [(1, pytest.approx(0.3))]
    assert [(p.count, p.sum) for p in metrics["gateway.queue.wait"].points] == [(1, 0.5)]


def test_a_request_finished_twice_is_counted_once(receiver, make_telemetry):
    """finish_request is idempotent: a second call for the same request (an error path after the normal end)
    adds nothing to its counters, histograms or spans."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    drive_request(telemetry, ctx)
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.requests")
    metrics = receiver.latest_metrics()
    assert [p.value for p in metrics["gateway.requests"].points] == [1]
    assert sum(p.value for p in metrics["gateway.cost"].points) == pytest.approx(0.00123)
    assert [p.count for p in metrics["gen_ai.client.token.usage"].points] == [1, 1]
    assert len([span for span in receiver.spans if span.kind == "SERVER"]) == 1


def test_a_bare_http_endpoint_gets_metrics_at_its_v1_metrics_path_by_the_default_protocol(receiver, make_telemetry):
    """OTEL_EXPORTER_OTLP_ENDPOINT alone (no protocol, a trailing slash) sends metrics over http/protobuf, the
    spec's default, to {endpoint}/v1/metrics."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": f"{receiver.http_endpoint}/"})
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    assert receiver.wait_for_metric("gateway.requests").points[0].value == 1


@pytest.mark.parametrize(("environ", "endpoint"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/metrics"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/otlp/"}, "http://collector:4318/otlp/v1/metrics"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "http://collector:4317"),
    ({"OTEL_METRICS_EXPORTER": "otlp"}, "http://localhost:4318/v1/metrics")])
def test_the_metrics_url_is_the_generic_endpoint_with_one_v1_metrics_path(environ, endpoint):
    """Over http/protobuf the generic endpoint gets `/v1/metrics` appended once, a trailing slash or not (a
    collector may not take `//v1/metrics`); gRPC takes the endpoint as is; `otlp` alone means localhost:4318."""
    assert TelemetryConfig.from_env(environ=environ).metrics.endpoint == endpoint


def test_a_per_signal_endpoint_and_protocol_override_the_generic_ones(receiver, make_telemetry):
    """OTEL_EXPORTER_OTLP_METRICS_ENDPOINT is used as is and OTEL_EXPORTER_OTLP_METRICS_PROTOCOL wins over the
    generic protocol: metrics go over HTTP to that URL while spans follow the generic gRPC settings."""
    service = "gw-per-signal"
    telemetry = make_telemetry({
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{receiver.http_endpoint}/v1/metrics",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": service})
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    assert receiver.wait_for_metric("gateway.requests", service=service).points[0].value == 1
    assert receiver.wait_for_spans(lambda got: any(span.resource.get("service.name") == service for span in got))


def test_metrics_are_exported_every_export_interval_without_a_flush(receiver, make_telemetry):
    """OTEL_METRIC_EXPORT_INTERVAL (ms) sets how often the periodic reader exports: at 100 ms the request's
    counters arrive on their own, long before the 60 s default would send them."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRIC_EXPORT_INTERVAL": "100",
                                "OTEL_TRACES_EXPORTER": "none", "OTEL_SERVICE_NAME": "gw-interval"})
    drive_request(telemetry, make_ctx())
    assert receiver.wait_for_metric("gateway.requests", timeout_s=10, service="gw-interval").points[0].value == 1


@pytest.mark.parametrize("exporter", ["none", "prometheus"])
def test_a_metrics_exporter_list_without_otlp_pushes_no_metrics_even_with_an_endpoint(exporter, receiver,
                                                                                     make_telemetry):
    """OTEL_METRICS_EXPORTER names every metrics exporter, as the spec reads it: `none`, or `prometheus` alone
    (which serves /metrics), pushes no metrics to the OTLP endpoint, where spans still go (a collector that also
    scraped the gateway would count every request twice)."""
    service = f"gw-metrics-{exporter}"
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRICS_EXPORTER": exporter,
                                "OTEL_SERVICE_NAME": service})
    drive_request(telemetry, make_ctx())
    assert telemetry.force_flush()                      # a metric export, if any, has been answered by now
    assert receiver.wait_for_spans(lambda got: any(span.resource.get("service.name") == service for span in got))
    assert telemetry.prometheus_enabled == (exporter == "prometheus")
    assert receiver.latest_metrics(service) == {}


@pytest.mark.parametrize(("environ", "traces", "metrics"), [
    ({"OTEL_METRICS_EXPORTER": "otlp,prometheus"}, True, True),
    ({"OTEL_METRICS_EXPORTER": " Prometheus "}, True, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, False, True),
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True, True)])
def test_the_exporter_variables_list_every_exporter_and_unsupported_ones_are_named(environ, traces, metrics,
                                                                                  caplog):
    """With an endpoint set, a signal goes over OTLP when its exporter list is unset or names `otlp`; a list of
    others only (one the gateway has not, `console`, included) sends nothing there, and an unsupported name is
    said in a warning."""
    config = TelemetryConfig.from_env(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **environ})
    assert (config.traces is not None, config.metrics is not None) == (traces, metrics)
    assert ("unsupported exporter(s) console" in caplog.text) == ("console" in environ.get("OTEL_TRACES_EXPORTER", ""))


def test_a_prometheus_metrics_exporter_serves_the_metrics_text(make_telemetry):
    """OTEL_METRICS_EXPORTER=prometheus turns on the /metrics exposition, as the policy's prometheus flag does."""
    telemetry = make_telemetry({"OTEL_METRICS_EXPORTER": "prometheus"})
    drive_request(telemetry, make_ctx())
    assert telemetry.prometheus_enabled
    assert 'gateway_requests_total{' in telemetry.prometheus_text().decode()


def test_the_service_name_variable_wins_over_one_in_the_resource_attributes(receiver, make_telemetry):
    """OTEL_SERVICE_NAME names the service whose metrics these are, over a service.name in
    OTEL_RESOURCE_ATTRIBUTES, as the spec says; the resource's other attributes are kept."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_SERVICE_NAME": "gw-named-by-variable",
                                "OTEL_RESOURCE_ATTRIBUTES": "service.name=gw-named-by-resource,team=ml%20ops"})
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    requests = receiver.wait_for_metric("gateway.requests", service="gw-named-by-variable")
    assert requests.resource["team"] == "ml ops"
    assert receiver.latest_metrics("gw-named-by-resource") == {}
