"""Model servers that answer oddly, and clients that leave: what the client gets, what the breaker records.

The odd model, `raw`, is a RawUpstream writing scripted bytes; `medium` (a
simulated backend) is its fallback.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from email.utils import formatdate

import pytest
import requests

from gateway.upstream import retry_after_s
from tests.support.harness import Harness, raw_model_gateway, reset_raw_model
from tests.support.raw_upstream import COMPLETION, SSE_HEAD, TEXT_EVENTS, json_answer, sse

TAIL = """  - name: chat-default
    match: {{models: ["auto"]}}
    candidates: [small, medium, large]
"""


@pytest.fixture(scope="module")
def env():
    with raw_model_gateway(first_byte_s=2, tail=TAIL) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


def post(harness: Harness, model: str = "raw", stream: bool = False, **extra) -> requests.Response:
    return requests.post(f"{harness.base_url}/v1/chat/completions", timeout=30, stream=stream,
                         json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                               **extra})


def breaker_failures(harness: Harness, model: str) -> int:
    circuit = harness.services.fleet.breakers._circuits.get(model)
    return circuit.failures if circuit is not None else 0


def test_a_client_leaving_mid_stream_is_not_the_models_failure(env):
    """Six clients that hang up mid-stream ("stop generating") leave small's circuit closed, with no failure."""
    harness, _ = env
    body = json.dumps({"model": "auto", "stream": True, "max_tokens": 4000,
                       "messages": [{"role": "user", "content": "a long story"}]}).encode()
    for _ in range(6):
        client = socket.create_connection(("127.0.0.1", harness.port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"data:" not in received:
            received += client.recv(4096)
        client.close()
        time.sleep(0.2)
    assert breaker_failures(harness, "small") == 0
    assert harness.services.fleet.estimates.in_flight("small") == 0
    reply = harness.openai().chat.completions.with_raw_response.create(
        model="auto", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert reply.headers["x-gateway-model"] == "small"


def test_a_stream_with_crlf_line_ends_is_relayed_whole(env):
    """SSE allows CRLF: a complete CRLF stream ends in [DONE], not an error, and the SDK reads it."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS, eol=b"\r\n"), 0.0)]
    assert b'"error"' not in post(harness, stream=True).content
    text = "".join(c.choices[0].delta.content or "" for c in harness.openai().chat.completions.create(
        model="raw", stream=True, messages=[{"role": "user", "content": "again"}]) if c.choices)
    assert text == "Hello world"
    assert breaker_failures(harness, "raw") == 0


@pytest.mark.parametrize("message", [{"role": "assistant", "content": [{"type": "text", "text": "Hello there"}]},
                                     None], ids=["content-parts", "message-null"])
def test_an_answer_of_odd_shape_without_usage_is_relayed_and_counted(env, message):
    """A 200 whose content is a list of parts, or whose message is null, reaches the client as 200 and leaves
    the model's in-flight count as it was (it used to answer 500 and leak one)."""
    harness, raw = env
    body = {key: value for key, value in COMPLETION.items() if key != "usage"}
    body["choices"] = [{"index": 0, "message": message, "finish_reason": "stop"}]
    raw.script = json_answer(body)
    in_flight = harness.services.fleet.estimates.in_flight
    deadline_s = time.monotonic() + 10
    while in_flight("raw") and time.monotonic() < deadline_s:     # an earlier test's call still winding down
        time.sleep(0.01)
    reply = post(harness)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"] == message
    assert in_flight("raw") == 0


@pytest.mark.parametrize("value", ["inf", "nan", "1e9"])
def test_a_wild_retry_after_is_bounded(env, value):
    """Retry-After inf or nan is ignored, 1e9 is capped at an hour: the client gets the 429, never a 500, and
    the model's circuit is not opened for ever."""
    harness, raw = env
    harness.sim_config("medium", rate_limit_rate=1.0)
    raw.script = json_answer({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429,
                             headers={"Retry-After": value})
    try:
        reply = post(harness)
    finally:
        harness.sim_config("medium", rate_limit_rate=0.0)
    assert reply.status_code == 429, reply.text
    assert harness.services.fleet.breakers.retry_in_s("raw") <= 3600


def test_a_200_carrying_an_error_body_falls_back(env):
    """A non-streamed 200 whose body is an OpenAI error is a failure, as it is in a stream: the next model
    answers, and no latency sample is learned from it."""
    harness, raw = env
    raw.script = json_answer({"error": {"message": "CUDA out of memory", "type": "server_error"}})
    reply = post(harness)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "bad_response"
    assert reply.json()["choices"]


def test_a_gzipped_request_is_forwarded_plain_without_its_encoding_header(env):
    """aiohttp decodes a gzipped request body; the upstream gets plain JSON, so no Content-Encoding."""
    harness, raw = env
    raw.script = json_answer(COMPLETION)
    body = gzip.compress(json.dumps({"model": "raw", "messages": [{"role": "user", "content": "hi"}]}).encode())
    reply = requests.post(f"{harness.base_url}/v1/chat/completions", data=body, timeout=30,
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert reply.status_code == 200
    head, sent = raw.requests[-1]
    assert b"content-encoding" not in head.lower()
    assert json.loads(sent)["messages"][0]["content"] == "hi"


def test_a_model_refusing_the_gateways_credentials_is_a_502_and_falls_back(env):
    """An upstream 401 is the gateway's key, not the client's: the next model answers; with none left the
    client gets 502 upstream_auth_failed, never a 401 that reads as its own key being wrong."""
    harness, raw = env
    raw.script = json_answer({"error": {"message": "Incorrect API key provided: sk-abc***", "type": "invalid_request_error",
                                        "code": "invalid_api_key"}}, status=401)
    reply = post(harness)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "auth_failed"
    assert breaker_failures(harness, "raw") == 1
    raw.script = json_answer({"error": {"message": "Incorrect API key provided: sk-abc***"}}, status=403)
    reply = post(harness, model="raw-only")
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "upstream_auth_failed" and "api_key_env" in error["message"]
    assert "sk-abc" not in reply.text


def test_retry_after_is_read_as_seconds_or_an_http_date():
    """Both forms of Retry-After count; garbage is no answer."""
    assert retry_after_s({"Retry-After": "7"}) == 7.0
    assert 25 < retry_after_s({"Retry-After": formatdate(time.time() + 30, usegmt=True)}) <= 30
    assert retry_after_s({"Retry-After": "soon"}) is None
    assert retry_after_s({}) is None


def test_a_non_streamed_answer_may_take_longer_than_first_byte_s(env):
    """A non-streamed answer comes whole, once generated: one taking 2.5 s (past `raw`'s first_byte_s of 2, within
    its total_s of 10) is the answer, not a timeout and a fallback."""
    harness, raw = env
    raw.script = [(script[0], 2.5) for script in json_answer(COMPLETION)]
    answer = post(harness, "raw-only")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-fallback"] == "none"
    assert answer.json()["choices"][0]["message"]["content"] == COMPLETION["choices"][0]["message"]["content"]


def test_a_non_streamed_body_that_keeps_coming_is_not_cut_at_first_byte_s(env):
    """A head, then a body sent in six parts 0.4 s apart (2.4 s in all, past `raw`'s first_byte_s of 2): each part
    comes within first_byte_s of the last, so it is the answer, as it was before the body got a deadline of its
    own; a body that stops is still a timeout (test_e2e_upstream_shapes)."""
    harness, raw = env
    body = json.dumps(COMPLETION).encode()
    step = len(body) // 6 + 1
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body))
    raw.script = [(head, 0.0)] + [(body[i:i + step], 0.4) for i in range(0, len(body), step)]
    answer = post(harness, "raw-only")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == COMPLETION["choices"][0]["message"]["content"]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_retry_after_that_is_no_number_of_seconds_is_no_answer(value):
    """`inf` or `nan` in either header is unreadable, as garbage is: no wait is taken from it (never an hour's, nor
    none at all)."""
    assert retry_after_s({"Retry-After": value}) is None
    assert retry_after_s({"retry-after-ms": value}) is None


def test_retry_after_ms_is_read_before_retry_after():
    """A model sending both (OpenAI does) is waited on for its `retry-after-ms`, the finer one its SDKs read
    first; `Retry-After` counts only when `retry-after-ms` is absent or unreadable."""
    assert retry_after_s({"retry-after-ms": "1500", "Retry-After": "30"}) == 1.5
    assert retry_after_s({"retry-after-ms": "soon", "Retry-After": "30"}) == 30.0


def test_a_retry_after_in_the_past_is_no_wait():
    """A Retry-After date already past, or a negative retry-after-ms, asks for no wait (never a negative one)."""
    assert retry_after_s({"Retry-After": formatdate(time.time() - 30, usegmt=True)}) == 0.0
    assert retry_after_s({"retry-after-ms": "-500"}) == 0.0
