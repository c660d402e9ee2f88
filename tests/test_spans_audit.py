"""A request's spans as an OTLP backend receives them: sampling continued from the caller, statuses and their
descriptions, and the message content a capture setting lets through."""

from __future__ import annotations

import json
import uuid

import pytest

from gateway.errors import ClientError, NotFound
from gateway.policy.model import Telemetry as PolicyTelemetry
from gateway.telemetry import TelemetryConfig
from tests.test_e2e_telemetry import new_traceparent
from tests.test_telemetry import CALLER_SPAN_ID, by_name, drive_request, make_ctx, otlp_env, start_one_attempt

WAIT_S = 30.0
CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def trace_of(ctx) -> str:
    """The trace id of a request's SERVER span, as the receiver writes it."""
    return f"{ctx.span.context.trace_id:032x}"


def answer_one_attempt(telemetry, ctx) -> None:
    """One attempt answered with 200 in 0.1 s, the request finished and its telemetry flushed."""
    attempt = start_one_attempt(telemetry, ctx)
    attempt.status, attempt.ended_s = 200, attempt.started_s + 0.1
    telemetry.end_attempt(ctx, attempt)
    telemetry.finish_request(ctx)
    telemetry.force_flush()


def test_a_caller_that_sampled_its_trace_out_gets_no_spans_and_its_flag_goes_upstream(receiver, make_telemetry):
    """Under the default parent-based sampler, a traceparent flagged 00 (the caller dropped its trace) records
    nothing: no span of that trace is exported, while the trace id and the 00 flag still go upstream."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    dropped_id, dropped = new_traceparent("00")
    kept_id, kept = new_traceparent("01")
    unsampled = make_ctx({"traceparent": dropped})
    headers, _ = drive_request(telemetry, unsampled)
    drive_request(telemetry, make_ctx({"traceparent": kept}))
    telemetry.force_flush()
    receiver.wait_for_trace(kept_id, 5, WAIT_S)     # exported after the unsampled request's would have been
    assert not unsampled.span.is_recording() and unsampled.span.children == []
    assert receiver.trace(dropped_id) == []
    _version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (trace_id, flags) == (dropped_id, "00") and span_id != CALLER_SPAN_ID


def test_a_failed_attempts_client_span_says_why_in_its_status_description(receiver, make_telemetry):
    """The timed-out attempt's CLIENT span is an ERROR whose description is its error type, as a trace view
    shows it; the attempt that answered keeps an unset status with no description."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    trace_id, caller = new_traceparent("01")
    drive_request(telemetry, make_ctx({"traceparent": caller}))
    telemetry.force_flush()
    spans = receiver.wait_for_trace(trace_id, 5, WAIT_S)
    failed, answered = by_name(spans, "chat sim-small-1b"), by_name(spans, "chat sim-large-70b")
    assert (failed.status_code, failed.status_message) == ("ERROR", "timeout")
    assert (answered.status_code, answered.status_message) == ("UNSET", "")


@pytest.mark.parametrize("error", [ClientError("could not parse the body as JSON", code=None),
                                   NotFound("no such model")], ids=["400", "404"])
def test_a_client_error_is_no_server_span_error(receiver, make_telemetry, error):
    """A 4xx the gateway answered (a body that does not parse, an unknown model) is the client's error: the
    SERVER span keeps an unset status and no error.type, as the HTTP server conventions say."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"))
    ctx = make_ctx()
    telemetry.start_request(ctx, ctx.http.headers)
    ctx.error, ctx.status = error, error.status
    telemetry.finish_request(ctx)
    telemetry.force_flush()
    (server,) = receiver.wait_for_trace(trace_of(ctx), 1, WAIT_S)
    assert server.attributes["http.response.status_code"] == error.status
    assert (server.status_code, server.attributes.get("error.type")) == ("UNSET", None)


def test_each_prompt_of_a_completions_list_is_a_captured_user_message(receiver, make_telemetry):
    """A legacy completions request whose `prompt` is a list of texts records each text as its own user message
    in gen_ai.input.messages (a token-id prompt has no text to record)."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"), CAPTURE: "true"})
    ctx = make_ctx(body={"model": "auto", "prompt": ["first prompt", [1, 2, 3], "second prompt"], "max_tokens": 4})
    ctx.endpoint = "completions"
    answer_one_attempt(telemetry, ctx)
    client = by_name(receiver.wait_for_trace(trace_of(ctx), 3, WAIT_S), "text_completion sim-small-1b")
    assert json.loads(client.attributes["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "first prompt"}]},
        {"role": "user", "parts": [{"type": "text", "content": "second prompt"}]}]


def test_an_answer_without_a_finish_reason_is_captured_with_reason_unknown(receiver, make_telemetry):
    """finish_reason is required in every output message: a whole answer whose choice says none (null) is
    recorded as `unknown`, never as the text "None"."""
    telemetry = make_telemetry({**otlp_env(receiver, "http/protobuf"), CAPTURE: "true"})
    ctx = make_ctx(body={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    ctx.response_body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                      "finish_reason": None}]}
    answer_one_attempt(telemetry, ctx)
    client = by_name(receiver.wait_for_trace(trace_of(ctx), 3, WAIT_S), "chat sim-small-1b")
    assert json.loads(client.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "hello"}], "finish_reason": "unknown"}]


@pytest.mark.parametrize(("environ", "policy", "captured"), [
    ({}, True, True),                               # the policy turns capture on when the variable is unset
    ({CAPTURE: "false"}, True, False),              # the variable, when set, wins over the policy: off
    ({CAPTURE: " "}, True, True),                   # a blank variable counts as unset
    ({CAPTURE: "TRUE"}, False, True),               # the variable's value is read in any case
    ({CAPTURE: "span_only"}, False, True),
    ({CAPTURE: "no"}, False, False)])
def test_the_capture_variable_wins_over_the_policy_and_is_read_in_any_case(environ, policy, captured):
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT decides content capture when it is set (any case; false
    turns off what the policy turned on); the policy's capture_content decides only when it is unset."""
    config = TelemetryConfig.from_env(PolicyTelemetry(capture_content=policy), environ=environ)
    assert config.capture_content is captured


def test_a_policy_that_captures_content_puts_the_prompt_on_the_client_span(receiver, make_telemetry):
    """telemetry.capture_content: true in the policy (no variable set) records the prompt as gen_ai.input.messages
    on the CLIENT span, and only there."""
    telemetry = make_telemetry(otlp_env(receiver, "http/protobuf"), PolicyTelemetry(capture_content=True))
    ctx = make_ctx()
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    spans = receiver.wait_for_trace(trace_of(ctx), 5, WAIT_S)
    client = by_name(spans, "chat sim-large-70b").attributes
    assert json.loads(client["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "tell me a secret"}]}]
    assert not any("secret" in json.dumps(span.attributes) for span in spans if span.kind != "CLIENT")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_configured_export_headers_go_to_the_collector_with_the_spans(receiver, make_telemetry, protocol):
    """OTEL_EXPORTER_OTLP_HEADERS (a backend's API key, its value percent-encoded) is sent with the span export,
    as gRPC metadata or HTTP headers: a collector that requires it would otherwise refuse every span."""
    key = uuid.uuid4().hex
    telemetry = make_telemetry({**otlp_env(receiver, protocol), "OTEL_METRICS_EXPORTER": "none",
                                "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={key}%3D%3D,x-team=ml"})
    ctx = make_ctx()
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    receiver.wait_for_trace(trace_of(ctx), 5, WAIT_S)
    assert any(headers.get("x-api-key") == f"{key}==" and headers.get("x-team") == "ml"
               for headers in receiver.span_headers)


@pytest.mark.parametrize(("sampler", "caller_flags", "recording"), [
    ("parentbased_always_off", None, False),        # a new trace: off
    ("parentbased_always_off", "01", True),         # the caller sampled its trace: the gateway follows it
    ("parentbased_traceidratio", "01", True),       # ratio 0 decides new traces only
    ("parentbased_traceidratio", None, False),
    ("traceidratio", "01", False),                  # the ratio alone decides, whatever the caller did
    ("always_on", "00", True)])
def test_each_sampler_follows_or_ignores_the_callers_decision_as_named(make_telemetry, sampler, caller_flags,
                                                                       recording):
    """OTEL_TRACES_SAMPLER (with OTEL_TRACES_SAMPLER_ARG=0): the parentbased_* samplers follow a caller's sampled
    flag and apply their own rule to new traces; traceidratio and always_on ignore the caller."""
    telemetry = make_telemetry({"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0",
                                "OTEL_METRICS_EXPORTER": "none"})
    headers = {"traceparent": new_traceparent(caller_flags)[1]} if caller_flags else {}
    ctx = make_ctx(headers)
    telemetry.start_request(ctx, ctx.http.headers)
    assert ctx.span.is_recording() is recording
