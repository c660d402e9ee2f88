"""End to end: spans and metrics the real gateway exports over OTLP (gRPC and HTTP/protobuf) for SDK requests.

The gateway is configured only through the standard OTEL_* variables of the
harness environ; a real OTLP receiver decodes what arrives on the wire.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from gateway.telemetry.metrics import DURATION_BUCKETS_S, TOKEN_BUCKETS
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.otlp_receiver import OtlpReceiver, SpanRecord
from tests.support.policies import latency, model, models, price, short_timeouts, tenants
from tests.support.redis_server import free_port

PROTOCOLS = ("grpc", "http/protobuf")
KEYS = {"acme": "key-acme", "globex": "key-globex", "initech": "key-initech", "umbrella": "key-umbrella"}
SIMS = {**DEFAULT_SIMS, "slow": dict(ttft_ms=20, tpot_ms=50)}

POLICY = models(*(
    model(name, size_b=size_b, tier=tier, price=price(1.00, 2.00), latency_prior=latency(10, 2),
          timeouts=short_timeouts())
    for name, size_b, tier in (("small", 1, 1), ("medium", 8, 2), ("large", 70, 3), ("slow", 3, 1)))) + """
routes:
  - name: chat-default
    match: {{models: ["auto"], endpoints: [chat, completions]}}
    candidates: [small, medium, large]
    sla: {{p95_latency_ms: 5000, min_tier: 1}}
    cache: {{enabled: true, ttl_s: 60}}
  - name: chat-slow
    match: {{models: ["slow"], endpoints: [chat]}}
    candidates: [slow]
""" + tenants(KEYS)

CALLER_SPAN_ID = "00f067aa0ba902b7"


def otel_environ(endpoint: str, protocol: str, service: str, **extra: str) -> dict[str, str]:
    """Only standard OTEL_* variables: where to export, how, and as whom."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": service, "OTEL_METRIC_EXPORT_INTERVAL": "60000",
            "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


def endpoint_of(receiver: OtlpReceiver, protocol: str) -> str:
    return receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint


def start(environ: dict[str, str], template: str = POLICY) -> Harness:
    return Harness(template, sims=SIMS, environ=environ).start()


@pytest.fixture(scope="module", params=PROTOCOLS)
def gw(request, receiver):
    """A gateway exporting to the receiver over one OTLP protocol, named after it."""
    protocol = request.param
    harness = start(otel_environ(endpoint_of(receiver, protocol), protocol, f"gw-e2e-{protocol}"))
    harness.service = f"gw-e2e-{protocol}"
    yield harness
    harness.stop()


def new_traceparent(flags: str = "01") -> tuple[str, str]:
    """A fresh caller trace id and its W3C traceparent with the given flags (01: sampled)."""
    trace_id = uuid.uuid4().hex
    return trace_id, f"00-{trace_id}-{CALLER_SPAN_ID}-{flags}"


def exported_trace(gw: Harness, receiver: OtlpReceiver, trace_id: str, spans: int) -> list[SpanRecord]:
    """Flush the gateway and wait until `spans` spans of the trace, the SERVER span among them, have arrived."""
    gw.flush_telemetry()
    return receiver.wait_for_trace(trace_id, spans)


def one(spans: list[SpanRecord], name: str) -> SpanRecord:
    (span,) = [span for span in spans if span.name == name]
    return span


def chat(gw: Harness, tenant: str = "acme", traceparent: str | None = None, **kwargs):
    """A chat completion through the gateway with the official SDK, as `tenant`."""
    headers = {"traceparent": traceparent, "tracestate": "vendor=abc"} if traceparent else {}
    client = gw.openai(api_key=KEYS[tenant])
    kwargs.setdefault("messages", [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}])
    return client.chat.completions.with_raw_response.create(
        model=kwargs.pop("model", "auto"), max_tokens=kwargs.pop("max_tokens", 5),
        extra_headers={**headers, **kwargs.pop("extra_headers", {})}, **kwargs)


def test_span_tree_continues_caller_trace_and_injects_upstream(gw, receiver):
    """SERVER continues the caller's trace, parents route, cache and CLIENT spans; upstream gets the CLIENT context."""
    trace_id, traceparent = new_traceparent()
    chat(gw, traceparent=traceparent, seed=7)
    spans = exported_trace(gw, receiver, trace_id, spans=4)

    server = one(spans, "POST /v1/chat/completions")
    assert (server.kind, server.parent_span_id) == ("SERVER", CALLER_SPAN_ID)
    assert server.resource["service.name"] == gw.service
    for name in ("gateway.route", "gateway.cache.lookup"):
        assert (one(spans, name).kind, one(spans, name).parent_span_id) == ("INTERNAL", server.span_id)
    client = one(spans, "chat sim-small")
    assert (client.kind, client.parent_span_id) == ("CLIENT", server.span_id)
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    upstream = gw.sim_requests("small")[-1]["headers"]
    assert upstream["traceparent"] == f"00-{trace_id}-{client.span_id}-01"
    assert upstream["tracestate"] == "vendor=abc"


def test_the_route_span_names_the_limits_the_request_tightened_its_sla_to(gw, receiver):
    """x-gateway-* headers that tighten the route's SLA appear on gateway.route as gateway.sla.tightened.*, so a
    trace whose gateway.sla.met is false says which limits it was judged by; a request that asked for none has
    none of them."""
    trace_id, traceparent = new_traceparent()
    chat(gw, traceparent=traceparent, extra_headers={"x-gateway-max-latency-ms": "4000", "x-gateway-min-tier": "2",
                                                     "x-gateway-max-cost-usd": "0.5"})
    plain_id, plain = new_traceparent()
    chat(gw, traceparent=plain)
    route = one(exported_trace(gw, receiver, trace_id, spans=3), "gateway.route").attributes    # no cache lookup
    assert {key: value for key, value in route.items() if key.startswith("gateway.sla.tightened.")} == {
        "gateway.sla.tightened.max_latency_ms": 4000.0, "gateway.sla.tightened.min_tier": 2,
        "gateway.sla.tightened.max_cost_usd": 0.5}
    assert route["gateway.model.selected"] == "medium"          # tier 2 asked for: small is left out
    plain_route = one(exported_trace(gw, receiver, plain_id, spans=3), "gateway.route").attributes
    assert not [key for key in plain_route if key.startswith("gateway.sla.tightened.")]


def test_every_attribute_arrives_with_its_convention_type(gw, receiver):
    """CLIENT and SERVER spans carry every GenAI, HTTP and gateway attribute, typed as the conventions say."""
    trace_id, traceparent = new_traceparent()
    raw = chat(gw, traceparent=traceparent, temperature=0.5, top_p=0.9, seed=11,
               extra_headers={"x-request-id": f"req-{trace_id[:8]}"})
    completion = raw.parse()
    spans = exported_trace(gw, receiver, trace_id, spans=4)

    client = one(spans, "chat sim-small").attributes
    assert {key: client[key] for key in client if key.startswith(("gen_ai.request.", "gen_ai.operation",
                                                                     "gen_ai.provider", "server."))} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "sim-small",
        "gen_ai.request.max_tokens": 5, "gen_ai.request.temperature": 0.5, "gen_ai.request.top_p": 0.9,
        "gen_ai.request.seed": 11, "server.address": "127.0.0.1", "server.port": gw.sims["small"].port}
    assert client["gen_ai.response.model"] == completion.model and client["gen_ai.response.id"] == completion.id
    assert client["gen_ai.response.finish_reasons"] == [completion.choices[0].finish_reason]
    assert client["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert client["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens == 5
    assert "gen_ai.request.stream" not in client and "error.type" not in client
    assert (client["gateway.tenant"], client["gateway.route"], client["gateway.model.selected"]) == (
        "acme", "chat-default", "small")
    for key in ("gen_ai.usage.input_tokens", "gen_ai.request.max_tokens", "gen_ai.request.seed", "server.port"):
        assert type(client[key]) is int, key
    assert type(client["gen_ai.request.temperature"]) is float and type(client["gen_ai.request.top_p"]) is float

    server = one(spans, "POST /v1/chat/completions").attributes
    assert {key: server[key] for key in ("http.request.method", "http.route", "url.path",
                                         "http.response.status_code", "gateway.request.id")} == {
        "http.request.method": "POST", "http.route": "/v1/chat/completions", "url.path": "/v1/chat/completions",
        "http.response.status_code": 200, "gateway.request.id": f"req-{trace_id[:8]}"}
    assert {key: server[key] for key in ("gateway.tenant", "gateway.route", "gateway.model.selected",
                                         "gateway.fallback.state", "gateway.cache.status", "gateway.sla.met",
                                         "gateway.tokens.estimated")} == {
        "gateway.tenant": "acme", "gateway.route": "chat-default", "gateway.model.selected": "small",
        "gateway.fallback.state": "none", "gateway.cache.status": "stored", "gateway.sla.met": True,
        "gateway.tokens.estimated": False}
    assert type(server["gateway.cost.usd"]) is float
    assert server["gateway.cost.usd"] == pytest.approx(float(raw.headers["x-gateway-cost-usd"]))
    assert server["gateway.cost.usd"] > 0
    assert "gateway.energy.joules" not in server and "gateway.fallback.reason" not in server


def test_fallback_attempts_are_sibling_client_spans(gw, receiver):
    """A failing small model and the answering medium one are sibling CLIENT spans; the failed one has error.type."""
    trace_id, traceparent = new_traceparent()
    gw.sim_config("small", error_rate=1.0)
    try:
        raw = chat(gw, traceparent=traceparent)
    finally:
        gw.sim_config("small", error_rate=0.0)
    assert raw.headers["x-gateway-model"] == "medium"
    spans = exported_trace(gw, receiver, trace_id, spans=3)

    server = one(spans, "POST /v1/chat/completions")
    failed, answered = one(spans, "chat sim-small"), one(spans, "chat sim-medium")
    assert failed.kind == answered.kind == "CLIENT"
    assert failed.parent_span_id == answered.parent_span_id == server.span_id
    assert (failed.status_code, failed.attributes["error.type"]) == ("ERROR", "http_500")
    assert answered.status_code == "UNSET" and "error.type" not in answered.attributes
    assert failed.end_ns <= answered.start_ns
    assert gw.sim_requests("medium")[-1]["headers"]["traceparent"] == f"00-{trace_id}-{answered.span_id}-01"
    assert (server.attributes["gateway.fallback.state"], server.attributes["gateway.fallback.reason"]) == (
        "fallback", "http_500")
    assert server.attributes["gateway.model.selected"] == "medium"


def test_stream_spans_cover_the_whole_stream(gw, receiver):
    """A ~0.5 s stream's SERVER and CLIENT spans end only after the client has received its last chunk."""
    trace_id, traceparent = new_traceparent()
    client = gw.openai(api_key=KEYS["acme"])
    received_ns = []
    for _ in client.chat.completions.create(
            model="slow", stream=True, max_tokens=10, messages=[{"role": "user", "content": "Count"}],
            extra_headers={"traceparent": traceparent}):
        received_ns.append(time.time_ns())
    spans = exported_trace(gw, receiver, trace_id, spans=3)

    server, attempt = one(spans, "POST /v1/chat/completions"), one(spans, "chat sim-slow")
    slack_ns = 50_000_000        # the gateway and the client share a GIL: the last write and the last read race
    for span in (server, attempt):
        assert span.end_ns >= received_ns[-1] - slack_ns
        assert span.end_ns - span.start_ns >= 400_000_000
    assert attempt.attributes["gen_ai.request.stream"] is True
    ttfc_s = attempt.attributes["gen_ai.response.time_to_first_chunk"]
    assert type(ttfc_s) is float and 0.01 < ttfc_s < (attempt.end_ns - attempt.start_ns) / 1e9
    # the nine tokens after the first (50 ms each) are inside the CLIENT span, timed by the gateway alone (the
    # in-process client may read its first chunk late)
    assert attempt.end_ns - attempt.start_ns - ttfc_s * 1e9 >= 400_000_000
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 10


def test_streamed_client_span_has_response_id_and_model(gw, receiver):
    """A streamed (uncacheable) answer's CLIENT span still carries gen_ai.response.id and gen_ai.response.model."""
    trace_id, traceparent = new_traceparent()
    client = gw.openai(api_key=KEYS["acme"])
    chunks = list(client.chat.completions.create(
        model="auto", stream=True, max_tokens=3, messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"traceparent": traceparent}))
    attributes = one(exported_trace(gw, receiver, trace_id, spans=3), "chat sim-small").attributes
    assert attributes.get("gen_ai.response.id") == chunks[0].id
    assert attributes.get("gen_ai.response.model") == chunks[0].model


def test_cache_hit_has_lookup_span_and_no_client_span(gw, receiver):
    """A repeated cacheable request is answered by the cache: a `hit` lookup span and no upstream CLIENT span."""
    messages = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    chat(gw, messages=messages, temperature=0)
    trace_id, traceparent = new_traceparent()
    raw = chat(gw, messages=messages, temperature=0, traceparent=traceparent)
    assert raw.headers["x-gateway-cache"] == "hit"
    spans = exported_trace(gw, receiver, trace_id, spans=3)
    assert sorted(span.kind for span in spans) == ["INTERNAL", "INTERNAL", "SERVER"]
    assert one(spans, "gateway.cache.lookup").attributes["gateway.cache.status"] == "hit"
    server = one(spans, "POST /v1/chat/completions").attributes
    assert (server["gateway.cache.status"], server["gateway.cost.usd"]) == ("hit", 0.0)


def points(metric, **labels):
    return [p for p in metric.points if all(p.attributes.get(k) == v for k, v in labels.items())]


def test_metrics_by_token_type_model_tenant_route_and_fallback_state(gw, receiver):
    """Token usage by gen_ai.token.type, durations, streaming chunk timing and gateway counters arrive labelled."""
    completion = chat(gw, tenant="globex").parse()
    client = gw.openai(api_key=KEYS["globex"])
    *_, last = client.chat.completions.create(model="auto", stream=True, max_tokens=4,
                                              stream_options={"include_usage": True},
                                              messages=[{"role": "user", "content": "Count"}])
    time.sleep(0.05)                 # a stream's metrics are recorded just after its last byte
    gw.flush_telemetry()
    receiver.wait_for(lambda: points(receiver.latest_metrics(gw.service).get("gateway.requests", _NONE),
                                     **{"gateway.tenant": "globex"}))
    metrics = receiver.latest_metrics(gw.service)

    tokens = metrics["gen_ai.client.token.usage"]
    assert (tokens.kind, tokens.unit) == ("histogram", "{token}")
    globex = {"gateway.tenant": "globex", "gen_ai.request.model": "sim-small", "gateway.route": "chat-default"}
    inputs, outputs = (points(tokens, **globex, **{"gen_ai.token.type": kind}) for kind in ("input", "output"))
    assert sum(p.count for p in inputs) == sum(p.count for p in outputs) == 2
    assert sum(p.sum for p in inputs) == completion.usage.prompt_tokens + last.usage.prompt_tokens
    assert sum(p.sum for p in outputs) == 5 + 4
    assert all(p.bounds == list(map(float, TOKEN_BUCKETS)) for p in inputs + outputs)
    assert {p.attributes["gen_ai.operation.name"] for p in inputs + outputs} == {"chat"}

    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s" and sum(p.count for p in points(duration, **globex)) == 2
    assert duration.points[0].bounds == list(DURATION_BUCKETS_S)
    (ttfc,) = points(metrics["gen_ai.client.operation.time_to_first_chunk"], **globex)
    assert ttfc.count == 1 and 0 < ttfc.sum < 2

    labels = {"gateway.tenant": "globex", "gateway.route": "chat-default", "gateway.model.selected": "small",
              "gateway.fallback.state": "none"}
    (requests,) = [p for p in metrics["gateway.requests"].points if p.attributes == labels]
    assert requests.value == 2 and metrics["gateway.requests"].monotonic
    (cost,) = points(metrics["gateway.cost"], **labels)
    assert metrics["gateway.cost"].unit == "USD" and cost.value > 0
    assert points(metrics["gateway.sla"], **labels, **{"gateway.sla.status": "met"})[0].value == 2
    assert points(metrics["gateway.outcomes"], **labels, **{"gateway.outcome": "success"})[0].value == 2


def test_fallback_metrics_carry_state_and_reason(gw, receiver):
    """A fallback is counted by state and reason, and the failed attempt's duration carries error.type."""
    gw.sim_config("small", error_rate=1.0)
    try:
        chat(gw, tenant="initech")
    finally:
        gw.sim_config("small", error_rate=0.0)
    gw.flush_telemetry()
    metrics = receiver.latest_metrics(gw.service)
    (fallback,) = points(metrics["gateway.fallbacks"], **{"gateway.tenant": "initech"})
    assert fallback.attributes == {"gateway.tenant": "initech", "gateway.route": "chat-default",
                                   "gateway.model.selected": "medium", "gateway.fallback.state": "fallback",
                                   "gateway.fallback.reason": "http_500"}
    (failed,) = points(metrics["gen_ai.client.operation.duration"],
                       **{"gateway.tenant": "initech", "error.type": "http_500"})
    assert failed.attributes["gen_ai.request.model"] == "sim-small" and failed.count == 1


def test_streams_record_time_per_output_chunk(gw, receiver):
    """A streamed answer of 6 chunks records gen_ai.client.operation.time_per_output_chunk samples."""
    client = gw.openai(api_key=KEYS["umbrella"])
    list(client.chat.completions.create(model="auto", stream=True, max_tokens=6,
                                        messages=[{"role": "user", "content": "Count"}]))
    time.sleep(0.05)
    gw.flush_telemetry()
    metric = receiver.latest_metrics(gw.service).get("gen_ai.client.operation.time_per_output_chunk", _NONE)
    (gaps,) = points(metric, **{"gateway.tenant": "umbrella"}) or [None]
    assert gaps is not None and gaps.count >= 5 and gaps.bounds == list(DURATION_BUCKETS_S)


class _NoMetric:
    points: list = []


_NONE = _NoMetric()


def test_prompt_and_answer_text_are_not_exported_by_default(gw, receiver):
    """Without the capture variable, neither the prompt nor the answer text appears in any exported span."""
    secret = f"secret-{uuid.uuid4().hex}"
    trace_id, traceparent = new_traceparent()
    answer = chat(gw, traceparent=traceparent, messages=[{"role": "user", "content": secret}]).parse()
    spans = exported_trace(gw, receiver, trace_id, spans=3)
    exported = json.dumps([span.attributes for span in spans] + [span.name for span in spans])
    assert secret not in exported and answer.choices[0].message.content not in exported
    assert not any(key.endswith(("input.messages", "output.messages")) for span in spans for key in span.attributes)


def test_content_capture_env_records_messages(receiver):
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true records input and output messages on the CLIENT span."""
    environ = otel_environ(receiver.http_endpoint, "http/protobuf", "gw-e2e-capture",
                           OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true")
    harness = start(environ)
    try:
        secret = f"secret-{uuid.uuid4().hex}"
        trace_id, traceparent = new_traceparent()
        answer = chat(harness, traceparent=traceparent, messages=[{"role": "user", "content": secret}]).parse()
        spans = exported_trace(harness, receiver, trace_id, spans=3)
    finally:
        harness.stop()
    client = one(spans, "chat sim-small").attributes
    assert json.loads(client["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": secret}]}]
    assert json.loads(client["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer.choices[0].message.content}],
         "finish_reason": answer.choices[0].finish_reason}]
    assert secret not in json.dumps(one(spans, "POST /v1/chat/completions").attributes)


def test_tenant_label_cardinality_is_bounded(receiver):
    """With telemetry.tenant_label_top_n: 1, the second and third tenants are counted under `other`."""
    template = POLICY + "telemetry: {{tenant_label_top_n: 1}}\n"
    harness = start(otel_environ(receiver.http_endpoint, "http/protobuf", "gw-e2e-tenants"), template)
    try:
        for tenant in ("acme", "globex", "initech"):
            chat(harness, tenant=tenant)
        harness.flush_telemetry()
        metrics = receiver.latest_metrics("gw-e2e-tenants")
    finally:
        harness.stop()
    requests = {p.attributes["gateway.tenant"]: p.value for p in metrics["gateway.requests"].points}
    assert requests == {"acme": 1, "other": 2}
    tokens = {p.attributes["gateway.tenant"] for p in metrics["gen_ai.client.token.usage"].points}
    assert tokens == {"acme", "other"}


@pytest.mark.parametrize("by_reload", [False, True], ids=["at-start-up", "by-a-reload"])
def test_a_tenant_with_a_budget_keeps_its_name_past_the_label_bound(receiver, by_reload):
    """With tenant_label_top_n: 1, a tenant with a budget seen third still has its cost labelled by name, as its
    budget gauge is: a dashboard shows its spend against its budget (under `other` it showed 0 %); a budget a
    reload gives, not the start-up policy, too."""
    from gateway.tenancy.identity import sha256_hex

    budgeted = f'  initech: {{{{keys_sha256: ["{sha256_hex(KEYS["initech"])}"]}}}}\n'
    assert budgeted in POLICY
    bounded = POLICY + "telemetry: {{tenant_label_top_n: 1}}\n"
    with_budget = bounded.replace(budgeted, budgeted.replace("]}}", "], budget: {{usd_per_day: 100}}}}"))
    service = f"gw-e2e-budget-labels-{by_reload}"
    harness = start(otel_environ(receiver.http_endpoint, "http/protobuf", service),
                    bounded if by_reload else with_budget)
    try:
        if by_reload:
            harness.write_policy(with_budget)
            assert harness.holder.reload() is True
        for tenant in ("acme", "globex", "initech"):
            chat(harness, tenant=tenant)
        harness.flush_telemetry()
        metrics = receiver.latest_metrics(service)
    finally:
        harness.stop()
    requests = {p.attributes["gateway.tenant"]: p.value for p in metrics["gateway.requests"].points}
    assert requests == {"acme": 1, "other": 1, "initech": 1}
    assert {p.attributes["gateway.tenant"] for p in metrics["gateway.budget.limit"].points} == {"initech"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_collector_leaves_requests_unaffected_and_counts_drops(protocol):
    """With the collector's port closed, every request succeeds promptly and the lost telemetry is counted."""
    environ = otel_environ(f"http://127.0.0.1:{free_port()}", protocol, "gw-e2e-unreachable",
                           OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_BSP_EXPORT_TIMEOUT="1000")
    harness = start(environ)
    try:
        for _ in range(5):
            started_s = time.perf_counter()
            stream = harness.openai(api_key=KEYS["acme"]).chat.completions.create(
                model="auto", stream=True, max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
            assert len([chunk for chunk in stream if chunk.choices]) >= 3
            assert chat(harness).parse().usage.completion_tokens == 5
            assert time.perf_counter() - started_s < 3.0
        telemetry = harness.services.telemetry
        telemetry.force_flush(timeout_s=2)
        assert telemetry.dropped > 0
        assert telemetry.dropped_counter.by_kind()[("traces", "export_failed")] > 0
    finally:
        harness.stop()


def test_sdk_disabled_exports_nothing_and_passes_traceparent_on():
    """OTEL_SDK_DISABLED=true: requests work, nothing is exported, the caller's trace context goes upstream as is."""
    quiet = OtlpReceiver().start()
    environ = otel_environ(quiet.http_endpoint, "http/protobuf", "gw-e2e-disabled", OTEL_SDK_DISABLED="true")
    harness = start(environ)
    try:
        _, traceparent = new_traceparent()
        assert chat(harness, traceparent=traceparent).parse().choices[0].message.content
        upstream = harness.sim_requests("small")[-1]["headers"]
        chat(harness)
        bare = harness.sim_requests("small")[-1]["headers"]
        assert not harness.services.telemetry.enabled and harness.flush_telemetry()
        time.sleep(0.2)
        assert quiet.spans == [] and quiet.metric_exports == []
    finally:
        harness.stop()
        quiet.stop()
    assert (upstream["traceparent"], upstream["tracestate"]) == (traceparent, "vendor=abc")
    assert "traceparent" not in bare


def sums_by(gw: Harness, receiver: OtlpReceiver, name: str, key: str | None, **labels) -> dict:
    """The metric's values (sums and counters) added up by the value of attribute `key`, after a flush."""
    time.sleep(0.05)                 # a request's metrics are recorded just after its response
    gw.flush_telemetry()
    found: dict = {}
    for point in points(receiver.latest_metrics(gw.service).get(name, _NONE), **labels):
        value = point.attributes.get(key) if key else None
        found[value] = found.get(value, 0) + point.value
    return found


def grew(before: dict, after: dict) -> dict:
    return {key: value - before.get(key, 0) for key, value in after.items() if value != before.get(key, 0)}


def test_a_cache_hit_records_its_saving_its_outcome_and_its_sla(gw, receiver):
    """A request stored, then the same request answered from the cache: gateway.cache.saved grows by what the
    stored answer cost, gateway.outcomes counts one success and one cache_hit, and gateway.sla counts both as
    met (the hit was served within the route's SLA); the hit's span says cache_hit too."""
    tenant = {"gateway.tenant": "umbrella"}
    metrics = ("gateway.cache.saved", None), ("gateway.outcomes", "gateway.outcome"), \
        ("gateway.sla", "gateway.sla.status")
    before = {name: sums_by(gw, receiver, name, key, **tenant) for name, key in metrics}
    messages = [{"role": "user", "content": f"cache me {uuid.uuid4().hex}"}]
    stored = chat(gw, tenant="umbrella", messages=messages, temperature=0)
    assert stored.headers["x-gateway-cache"] == "stored"
    trace_id, traceparent = new_traceparent()
    hit = chat(gw, tenant="umbrella", messages=messages, temperature=0, traceparent=traceparent)
    assert hit.headers["x-gateway-cache"] == "hit"
    after = {name: sums_by(gw, receiver, name, key, **tenant) for name, key in metrics}
    assert grew(before["gateway.cache.saved"], after["gateway.cache.saved"])[None] == \
        pytest.approx(float(stored.headers["x-gateway-cost-usd"]))
    assert grew(before["gateway.outcomes"], after["gateway.outcomes"]) == {"success": 1, "cache_hit": 1}
    assert grew(before["gateway.sla"], after["gateway.sla"]) == {"met": 2}
    server = one(exported_trace(gw, receiver, trace_id, spans=2), "POST /v1/chat/completions")
    assert server.attributes["gateway.outcome"] == "cache_hit"


def test_a_structured_output_request_has_json_output_type(gw, receiver):
    """`response_format: json_schema` (what the SDK's `.parse()` sends) is gen_ai.output.type `json`."""
    trace_id, traceparent = new_traceparent()
    chat(gw, traceparent=traceparent, response_format={"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object", "properties": {}}}})
    client = one(exported_trace(gw, receiver, trace_id, spans=3), "chat sim-small")
    assert client.attributes["gen_ai.output.type"] == "json"


def test_an_answer_without_usage_is_marked_estimated_on_its_span(gw, receiver):
    """A model that reports no usage: the gateway's count is what the span carries, marked
    gateway.tokens.estimated; a model's own usage is not marked."""
    estimated = {}
    gw.sim_config("small", usage=False)
    try:
        trace_id, traceparent = new_traceparent()
        chat(gw, traceparent=traceparent)
        estimated[True] = one(exported_trace(gw, receiver, trace_id, spans=3), "POST /v1/chat/completions")
    finally:
        gw.sim_config("small", usage=True)
    trace_id, traceparent = new_traceparent()
    chat(gw, traceparent=traceparent)
    estimated[False] = one(exported_trace(gw, receiver, trace_id, spans=3), "POST /v1/chat/completions")
    assert {marked: span.attributes["gateway.tokens.estimated"] for marked, span in estimated.items()} == \
        {True: True, False: False}
