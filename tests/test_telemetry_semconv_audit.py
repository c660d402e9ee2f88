"""What an OTLP backend receives, checked against the OpenTelemetry semantic conventions (audit)."""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from openai import AzureOpenAI

from gateway import __version__
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.otlp_receiver import OtlpReceiver
from tests.test_e2e_telemetry import POLICY as E2E_POLICY
from tests.test_e2e_telemetry import SIMS as E2E_SIMS
from tests.test_e2e_telemetry import otel_environ
from tests.test_telemetry import drive_request, make_ctx
from tests.test_telemetry_semconv import KEYS as SEMCONV_KEYS
from tests.test_telemetry_semconv import POLICY as SEMCONV_POLICY
from tests.test_telemetry_semconv import environ as semconv_environ


def test_the_exported_resource_names_the_gateways_version(receiver, make_telemetry):
    """The resource every span and metric arrives with carries service.version, the gateway's version (so a
    backend can tell a deploy's before from its after), beside the process's service.instance.id."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_SERVICE_NAME": "gw-version", "OTEL_BSP_SCHEDULE_DELAY": "10"})
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()

    def mine(span) -> bool:
        return span.resource.get("service.name") == "gw-version"

    resources = [receiver.wait_for_metric("gateway.requests", service="gw-version").resource,
                 next(span for span in receiver.wait_for_spans(lambda spans: [s for s in spans if mine(s)])
                      if mine(span)).resource]
    assert [resource.get("service.version") for resource in resources] == [__version__, __version__]
    assert all(resource.get("service.instance.id") for resource in resources)


@pytest.mark.parametrize("key, value", [
    ("OTEL_METRIC_EXPORT_INTERVAL", "0"), ("OTEL_METRIC_EXPORT_INTERVAL", "-5"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "0"), ("OTEL_BSP_MAX_QUEUE_SIZE", "inf"), ("OTEL_BSP_MAX_QUEUE_SIZE", "1e30"),
    ("OTEL_BSP_SCHEDULE_DELAY", "-1"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "10s")])
def test_an_otel_number_out_of_range_or_unreadable_is_ignored_with_a_warning_not_fatal(receiver, make_telemetry,
                                                                                       caplog, key, value):
    """An OTEL_* number the SDK cannot take (zero or negative where it must be positive, infinite, not a number)
    is named in a warning and treated as unset, as the specification asks (and as the gateway already does for
    a sampler ratio out of range): the gateway starts and exports, instead of failing to start."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_SERVICE_NAME": "gw-odd-numbers", key: value})
    assert key in caplog.text
    drive_request(telemetry, make_ctx())
    telemetry.force_flush()
    receiver.wait_for_metric("gateway.requests", service="gw-odd-numbers")


@pytest.fixture(scope="module")
def gw(receiver):
    """The gateway exporting to the receiver over OTLP/HTTP, as tests/test_telemetry_semconv.py runs it."""
    harness = Harness(SEMCONV_POLICY, sims={"small": DEFAULT_SIMS["small"]},
                      environ=semconv_environ(receiver, "gw-semconv-audit")).start()
    yield harness
    harness.stop()


def test_a_request_with_a_query_string_has_url_query_on_its_server_span(gw, receiver):
    """The AzureOpenAI client's `?api-version=...` arrives as url.query on the SERVER span (conditionally
    required by the HTTP server span conventions: "if and only if one was received")."""
    trace_id = uuid.uuid4().hex
    client = AzureOpenAI(api_key=SEMCONV_KEYS["acme"], api_version="2024-10-21", azure_endpoint=gw.base_url,
                         default_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    gw.flush_telemetry()
    (server,) = [span for span in receiver.wait_for_trace(trace_id, 3) if span.kind == "SERVER"]
    assert server.attributes["http.route"] == "/openai/deployments/{deployment}/chat/completions"
    assert server.attributes.get("url.query") == "api-version=2024-10-21"


@pytest.fixture(scope="module")
def slow_gw(receiver):
    """A gateway in front of a model that streams a token every 50 ms (`slow`)."""
    harness = Harness(E2E_POLICY, sims=E2E_SIMS,
                      environ=otel_environ(receiver.http_endpoint, "http/protobuf", "gw-semconv-slow")).start()
    yield harness
    harness.stop()


def server_span_when_recorded(gw: Harness, receiver: OtlpReceiver, trace_id: str, timeout_s: float = 5.0):
    """The trace's SERVER span, flushing until it has been recorded and exported."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        gw.flush_telemetry()
        servers = [span for span in receiver.trace(trace_id) if span.kind == "SERVER"]
        if servers:
            return servers[0]
        time.sleep(0.02)
    raise AssertionError("no SERVER span")


def test_a_stream_whose_client_left_after_its_200_head_reports_the_status_it_was_sent(slow_gw, receiver):
    """A client that reads the 200 head and a first chunk, then hangs up: the SERVER span's
    http.response.status_code is 200, the status the gateway sent (as the HTTP conventions define it), not a
    499 no client ever received; the outcome still says client_disconnected."""
    trace_id = uuid.uuid4().hex
    body = json.dumps({"model": "slow", "stream": True, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", int(slow_gw.base_url.rsplit(":", 1)[1]))) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer key-acme\r\n"
                       + f"traceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n".encode()
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data:" not in received:
            received += client.recv(4096)
    assert received.startswith(b"HTTP/1.1 200 OK")
    server = server_span_when_recorded(slow_gw, receiver, trace_id)
    assert server.attributes["gateway.outcome"] == "client_disconnected"
    assert server.attributes["http.response.status_code"] == 200


def test_a_request_parameter_past_int64_is_left_off_the_span_without_an_error_log(receiver, make_telemetry, caplog):
    """A client's seed past int64 (which JSON and the gateway's parse stage allow) is left off the CLIENT span
    quietly: not handed to the exporter, which drops the pair and logs an ERROR with a traceback for it on every
    such request (a log any client could flood); the span's other parameters still arrive."""
    telemetry = make_telemetry({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
                                "OTEL_SERVICE_NAME": "gw-big-seed", "OTEL_METRICS_EXPORTER": "none"})
    ctx = make_ctx(body={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64,
                         "temperature": 0.5})
    drive_request(telemetry, ctx)
    telemetry.force_flush()
    trace_id = f"{ctx.span.context.trace_id:032x}"
    client = next(span for span in receiver.wait_for_trace(trace_id, spans=4) if span.kind == "CLIENT")
    assert client.attributes["gen_ai.request.temperature"] == 0.5
    assert "gen_ai.request.seed" not in client.attributes
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text
