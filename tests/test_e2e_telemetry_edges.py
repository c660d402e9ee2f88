"""End to end: what the real gateway exports at the edges an operator reads in an OTLP backend or Prometheus.

A stream that breaks after its first byte, and a Prometheus scrape after telemetry was flushed; the
gateway is configured only through its environ, and a real OTLP receiver decodes what arrives.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

import openai
import pytest

from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.policies import latency, model, models, price, short_timeouts, standard_model
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, chunk, json_answer, sse
from tests.test_e2e_telemetry import CALLER_SPAN_ID, exported_trace, new_traceparent, one, otel_environ, points

SERVICE = "gw-e2e-edges"


def priced_raw_policy(raw_url: str) -> str:
    """The standard models, and `raw` (a scripted, priced model server) alone on route `raw-only`."""
    return models(*(standard_model(name, timeouts=short_timeouts()) for name in DEFAULT_SIMS),
                  model("raw", endpoint=raw_url, upstream_model="fake", size_b=0.5,
                        price=price(1000.0, 1000.0), latency_prior=latency(5, 1),
                        timeouts=short_timeouts(first_byte_s=1))) + """
routes:
  - name: raw-only
    match: {{models: ["raw-only"]}}
    candidates: [raw]
"""


@pytest.fixture(scope="module")
def raw_env(receiver):
    """A gateway exporting over OTLP/HTTP, in front of a scripted model server `raw`."""
    raw = RawUpstream().start()
    harness = Harness(priced_raw_policy(raw.url), sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS},
                      environ=otel_environ(receiver.http_endpoint, "http/protobuf", SERVICE)).start()
    try:
        yield harness, raw
    finally:
        harness.stop()
        raw.stop()


def broken_stream(harness: Harness, raw: RawUpstream, traceparent: str) -> None:
    """A streamed chat whose model sends two chunks, then garbage: the SDK sees an in-band error."""
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello")), 0.0), (b"garbage, not SSE\n\n", 0.05)]
    with pytest.raises(openai.APIError):
        list(harness.openai().chat.completions.create(
            model="raw-only", stream=True, messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"traceparent": traceparent}))


def test_a_stream_broken_after_its_first_byte_marks_the_server_span_failed(raw_env, receiver):
    """A stream that fails after its 200 head is an ERROR SERVER span with error.type, not a clean 200."""
    harness, raw = raw_env
    trace_id, traceparent = new_traceparent()
    broken_stream(harness, raw, traceparent)
    spans = exported_trace(harness, receiver, trace_id, spans=3)

    server = one(spans, "POST /v1/chat/completions")
    assert server.parent_span_id == CALLER_SPAN_ID
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gateway.outcome"] not in ("success", "cache_hit")
    assert server.status_code == "ERROR"
    assert server.attributes.get("error.type") == server.attributes["gateway.outcome"]
    # its one model failed after the first byte: no fallback, so no fallback reason (as the headers say)
    assert server.attributes["gateway.fallback.state"] == "none" and "gateway.fallback.reason" not in server.attributes
    attempt = one(spans, "chat fake")
    assert attempt.status_code == "ERROR" and attempt.attributes["error.type"]


def test_a_refusal_not_worth_another_model_has_no_fallback_reason(raw_env, receiver):
    """An upstream 422 no other model would answer differently: one attempt, fallback state none, and neither
    the span nor the headers give a fallback reason (a reason says why a request left its first model)."""
    harness, raw = raw_env
    raw.script = json_answer({"error": {"message": "bad param", "type": "invalid_request_error"}}, status=422)
    trace_id, traceparent = new_traceparent()
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        harness.openai(max_retries=0).chat.completions.create(
            model="raw-only", messages=[{"role": "user", "content": "Hi"}], extra_headers={"traceparent": traceparent})
    assert refused.value.response.headers["x-gateway-fallback"] == "none"
    assert "x-gateway-fallback-reason" not in refused.value.response.headers
    server = one(exported_trace(harness, receiver, trace_id, spans=2), "POST /v1/chat/completions")
    assert server.attributes["gateway.fallback.state"] == "none" and "gateway.fallback.reason" not in server.attributes


def raw_only_totals(harness: Harness, receiver: OtlpReceiver) -> dict[str, float]:
    """Route raw-only's cumulative cost and input and output token sums, as last exported."""
    harness.flush_telemetry()
    metrics = receiver.latest_metrics(SERVICE)
    route = {"gateway.route": "raw-only"}
    usage = metrics.get("gen_ai.client.token.usage")
    totals = {kind: sum(p.sum for p in points(usage, **route, **{"gen_ai.token.type": kind})) if usage else 0.0
              for kind in ("input", "output")}
    cost = metrics.get("gateway.cost")
    return {"cost": sum(p.value for p in points(cost, **route)) if cost else 0.0, **totals}


def test_a_stream_broken_after_its_first_byte_counts_the_tokens_it_was_charged_for(raw_env, receiver):
    """The tokens a broken stream produced, and was charged for, are in gen_ai.client.token.usage beside its cost."""
    harness, raw = raw_env
    before = raw_only_totals(harness, receiver)
    trace_id, traceparent = new_traceparent()
    broken_stream(harness, raw, traceparent)
    client = one(exported_trace(harness, receiver, trace_id, spans=3), "chat fake").attributes
    time.sleep(0.05)                 # a stream's metrics are recorded just after its last byte
    after = raw_only_totals(harness, receiver)

    assert after["cost"] > before["cost"]
    assert after["input"] - before["input"] == client["gen_ai.usage.input_tokens"]
    assert after["output"] - before["output"] == client["gen_ai.usage.output_tokens"] > 0
    usage = receiver.latest_metrics(SERVICE)["gen_ai.client.token.usage"]
    assert {p.attributes["error.type"] for p in points(usage, **{"gateway.route": "raw-only"})} == {
        client["error.type"]}


def test_flushing_telemetry_leaves_the_prometheus_exposition_without_duplicate_series():
    """After telemetry is flushed, /metrics still names each metric family and each series once."""
    harness = Harness(environ={"GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}).start()
    try:
        harness.openai().chat.completions.create(model="auto", max_tokens=3,
                                                 messages=[{"role": "user", "content": "Hi"}])
        harness.flush_telemetry()
        harness.flush_telemetry()
        with urllib.request.urlopen(f"{harness.base_url}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        harness.stop()
    lines = text.splitlines()
    helps = Counter(line.split()[2] for line in lines if line.startswith("# HELP "))
    samples = Counter(line.rsplit(" ", 1)[0] for line in lines if line and not line.startswith("#"))
    assert "gateway_requests_total" in helps and "gen_ai_client_token_usage" in helps
    assert [name for name, seen in helps.items() if seen > 1] == []
    assert [series for series, seen in samples.items() if seen > 1] == []


def test_a_telemetry_hook_that_raises_does_not_fail_the_request(receiver, monkeypatch, caplog):
    """A fault in telemetry's own mapping (here a span attribute function made to raise) leaves every request
    answered, is logged once with its traceback, and counted in gateway.telemetry.dropped (reason hook_failed)."""
    from gateway.telemetry import genai

    def broken(*_args, **_kwargs):
        raise KeyError("a mapping fault")

    harness = Harness(environ=otel_environ(receiver.http_endpoint, "http/protobuf", "gw-hook-fault")).start()
    try:
        monkeypatch.setattr(genai, "attempt_attributes", broken)
        monkeypatch.setattr(genai, "gateway_attributes", broken)
        for _ in range(3):
            assert harness.openai().chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices
        harness.flush_telemetry()
        metrics = receiver.latest_metrics("gw-hook-fault")
    finally:
        harness.stop()
    failed = [r for r in caplog.records if "telemetry hook" in r.getMessage()]
    assert sorted(r.getMessage().split()[2] for r in failed) == ["finish_request", "start_attempt"]
    dropped = {p.attributes["gateway.telemetry.reason"]: p.value for p in metrics["gateway.telemetry.dropped"].points}
    assert dropped["hook_failed"] == 6


def test_a_stream_opening_with_an_empty_id_and_model_gets_them_from_the_chunks_after(raw_env, receiver):
    """Azure opens a stream with a content-filter chunk whose `id` and `model` are "": the CLIENT span takes
    gen_ai.response.id and gen_ai.response.model from the first chunks that have them."""
    harness, raw = raw_env
    opening = json.dumps({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                          "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}).encode()
    raw.script = [(SSE_HEAD + sse(opening, chunk("", role=True), chunk("Hello"), chunk(None, finish="stop"),
                                  b"[DONE]"), 0.0)]
    trace_id, traceparent = new_traceparent()
    list(harness.openai().chat.completions.create(model="raw-only", stream=True, extra_headers={
        "traceparent": traceparent}, messages=[{"role": "user", "content": "Hi"}]))
    attempt = one(exported_trace(harness, receiver, trace_id, spans=3), "chat fake")
    assert (attempt.attributes["gen_ai.response.id"], attempt.attributes["gen_ai.response.model"]) == (
        "chatcmpl-1", "fake")
