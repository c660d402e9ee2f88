"""The upstream call and the stream relay against model servers that misbehave in ways seen in production, and
clients that leave: what the client gets, what the breaker, the in-flight count and the ledger record.

The odd model, `raw` (first_byte_s 1, total_s 10), is a RawUpstream; `medium`
(a simulated backend) is its fallback on the `raw` route, and `raw-only` has none.
"""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from bench.machine import free_port
from gateway.upstream import MAX_ERROR_MESSAGE_CHARS
from tests.support.harness import Harness, ledgered_raw_model_gateway, raw_model_gateway, reset_raw_model
from tests.support.raw_calls import breaker_failures, ledger_record, post, sdk_text, settled
from tests.support.raw_upstream import COMPLETION, SSE_HEAD, TEXT_EVENTS, chunk, http_head, json_answer, sse

#: the environment variable holding `raw`'s own credential (unset unless a test sets it)
RAW_KEY_ENV = "RAW_MODEL_KEY"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1,
                                    raw_keys=f"    api_key_env: {RAW_KEY_ENV}\n") as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


# errors a model server reports in the stream ------------------------------------------------------------

TGI_ERROR = (b'{"error": "Request failed during generation: Server error: CUDA out of memory", '
             b'"error_type": "generation"}')


def test_a_string_error_as_the_first_event_falls_back(env):
    """A model that reports its failure as `{"error": "..."}` (TGI's shape) before any chunk has failed: the
    fallback answers and the breaker counts it, rather than the client getting a committed 200 stream that
    the SDK raises on."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(TGI_ERROR), 0.0)]
    reply = post(harness, model="raw")
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "bad_response"
    assert b"CUDA" not in reply.content and reply.content.endswith(b"data: [DONE]\n\n")
    assert breaker_failures(harness, "raw") == 1


def test_a_string_error_mid_stream_is_the_models_failure_in_band(env):
    """A `{"error": "..."}` event mid-stream ends the stream with the gateway's in-band error (the SDK raises
    it) and counts as the model's failure, like an error object does."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hi"), TGI_ERROR), 0.0)]
    with pytest.raises(openai.APIError, match="CUDA out of memory"):
        sdk_text(harness)
    assert breaker_failures(harness, "raw") == 1
    body = post(harness).content
    assert b'"upstream_bad_response"' in body and b"[DONE]" not in body


# events SSE says are not dispatched ----------------------------------------------------------------------

@pytest.mark.parametrize("empty", [b"data:\n\n", b"data: \n\n"], ids=["no-space", "space"])
def test_an_event_with_empty_data_is_not_an_error(env, empty):
    """An event whose data is empty is not dispatched (SSE), so it is dropped: the stream completes, the SDK
    reads the answer and the breaker counts nothing."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:2]) + empty + sse(*TEXT_EVENTS[2:]), 0.0)]
    assert sdk_text(harness) == "Hello world"
    body = post(harness).content
    assert b'"error"' not in body and body.endswith(b"data: [DONE]\n\n")
    assert breaker_failures(harness, "raw") == 0


# upstreams that hang --------------------------------------------------------------------------------------

def test_a_model_that_hangs_before_its_head_times_out_and_falls_back(env):
    """A model that accepts the request and never answers is given up at first_byte_s (1 s), not total_s."""
    harness, raw = env
    raw.script = [(b"", 30.0)]
    started_s = time.monotonic()
    reply = post(harness, model="raw")
    assert time.monotonic() - started_s < 2.5
    assert reply.headers["x-gateway-model"] == "medium" and reply.headers["x-gateway-fallback-reason"] == "timeout"


def test_a_non_streamed_answer_that_hangs_mid_body_times_out_and_falls_back(env):
    """A non-streamed answer whose body stops half way is a timeout after first_byte_s; the fallback answers."""
    harness, raw = env
    body = json.dumps(COMPLETION).encode()
    raw.script = [(http_head(200, {"Content-Type": "application/json"}, len(body)) + body[:20], 0.0), (b"", 30.0)]
    started_s = time.monotonic()
    reply = post(harness, model="raw", stream=False)
    assert time.monotonic() - started_s < 2.5
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"


# clients that leave ---------------------------------------------------------------------------------------

def assert_hung_up(harness: Harness, raw, before: int) -> None:
    """The model's connection of the call whose client left is closed within moments, and nothing of it is in
    flight any more."""
    deadline_s = time.monotonic() + 3
    while raw.in_flight > before and time.monotonic() < deadline_s:
        time.sleep(0.02)
    assert raw.in_flight == before
    settled(harness, "raw")
    assert harness.services.fleet.estimates.in_flight("raw") == 0


def _leave_after(harness: Harness, events: int, request_id: str, model: str = "raw-only") -> None:
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.create_connection(("127.0.0.1", harness.port))
    client.settimeout(10)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"x-request-id: %s\r\nContent-Length: %d\r\n\r\n" % (request_id.encode(), len(body)) + body)
    received = b""
    while received.count(b"data:") < events:
        received += client.recv(65536)
    client.close()


def test_a_client_leaving_mid_stream_hangs_up_on_the_model(env):
    """A client that leaves mid-stream has the gateway close the model's connection within moments, and the
    model's in-flight count returns to zero."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("a")), 0.0)] + [(sse(chunk("x")), 0.05)] * 400
    before = raw.in_flight                      # calls of earlier tests that hang may still be open
    _leave_after(harness, 2, "leaves-early")
    assert_hung_up(harness, raw, before)
    record = ledger_record(harness, "leaves-early")
    assert record["status"] == 499 and record["outcome"] == "client_disconnected"


# errors a model server reports in its answer -------------------------------------------------------------

def test_a_200_carrying_a_string_error_falls_back(env):
    """A non-streamed 200 whose body is `{"error": "..."}` (TGI's shape) is a failure: the next model answers,
    rather than the client getting a 200 with no choices."""
    harness, raw = env
    raw.script = json_answer({"error": "CUDA out of memory", "error_type": "generation"})
    reply = post(harness, model="raw", stream=False)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "bad_response" and reply.json()["choices"]


VLLM_CONTEXT_ERROR = {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you "
                      "requested 2100 tokens (100 in the messages, 2000 in the completion).",
                      "type": "BadRequestError", "param": None, "code": 400}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_vllm_context_length_error_falls_back(env, stream):
    """vLLM's own error shape (`{"object": "error", "message": ...}`, before 0.10) saying the prompt is too long is
    a context-length error: the next model answers, as with OpenAI's shape."""
    harness, raw = env
    raw.script = json_answer(VLLM_CONTEXT_ERROR, status=400)
    reply = post(harness, model="raw", stream=stream)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "context_length"


def test_a_vllm_context_length_error_with_no_fallback_is_named_for_the_client(env):
    """With no model left, vLLM's context-length error reaches the client as OpenAI's 400
    context_length_exceeded, carrying the model's message."""
    harness, raw = env
    raw.script = json_answer(VLLM_CONTEXT_ERROR, status=400)
    reply = post(harness, stream=False)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]


def test_a_llama_cpp_context_size_error_falls_back(env):
    """llama.cpp's context overflow (400, type `exceed_context_size_error`, "exceeds the available context size") is
    a context-length error: the next model answers."""
    harness, raw = env
    raw.script = json_answer({"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 9412,
                                        "n_ctx": 8192, "message": "request (9412 tokens) exceeds the available "
                                        "context size (8192 tokens), try increasing it"}}, status=400)
    reply = post(harness, model="raw", stream=False)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "context_length"


VLLM_NO_SUCH_MODEL = {"object": "error", "message": "The model `llama-3-8b` does not exist.",
                      "type": "NotFoundError", "param": None, "code": 404}


def test_a_model_server_without_the_model_falls_back_and_counts_against_it(env):
    """A 404 from the model server (it serves no such `upstream_model`, or the endpoint's path is wrong) is the
    gateway's set-up, not the client's request: the next model answers and the breaker counts it."""
    harness, raw = env
    raw.script = json_answer(VLLM_NO_SUCH_MODEL, status=404)
    reply = post(harness, model="raw", stream=False)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "not_found"
    assert breaker_failures(harness, "raw") == 1


def test_a_model_server_without_the_model_and_no_fallback_is_a_502_not_a_404(env):
    """With no model left, the client gets 502 `upstream_not_found` that the SDK does not retry, not a 404 the
    SDK would read as the client's own model being unknown."""
    harness, raw = env
    raw.script = json_answer(VLLM_NO_SUCH_MODEL, status=404)
    before = len(raw.requests)
    with pytest.raises(openai.InternalServerError) as caught:
        harness.openai(max_retries=2).chat.completions.create(model="raw-only",
                                                             messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and caught.value.code == "upstream_not_found"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(raw.requests) - before == 1


# models that drop, clients that leave, answers of odd shapes --------------------------------------------------

CHUNKED_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_model_dropping_a_chunked_stream_mid_way_is_an_in_band_bad_response(env):
    """A model that closes its connection in the middle of a chunked stream ends the client's stream with an
    in-band upstream_bad_response (the SDK raises it), is the model's failure, and the request is recorded as
    failed with what it was sent."""
    harness, raw = env
    raw.script = [(CHUNKED_SSE_HEAD + _chunked(sse(chunk("", role=True), chunk("Hello"))), 0.0),
                  (_chunked(b'data: {"id": "chatcmpl-1", "choi'), 0.05)]
    with pytest.raises(openai.APIError, match="dropped the connection"):
        sdk_text(harness)
    assert breaker_failures(harness, "raw") == 1
    reply = requests.post(f"{harness.base_url}/v1/chat/completions", timeout=30,
                          headers={"x-request-id": "dropped-mid-way"},
                          json={"model": "raw-only", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert b'"upstream_bad_response"' in reply.content and b"[DONE]" not in reply.content
    record = ledger_record(harness, "dropped-mid-way")
    assert record["attempts"][0]["error"] == "bad_response" and record["output_tokens"] >= 1


def test_a_model_closing_the_connection_without_a_word_dropped_it(env):
    """A model server that takes the request and closes the connection without answering (a crash mid-request)
    dropped the connection: a 502 upstream_bad_response that says so, streamed or not, not one for a model that
    could not be reached."""
    harness, raw = env
    raw.script = []                                     # the request read, then the connection closed
    for stream in (False, True):
        answer = post(harness, stream=stream)
        error = answer.json()["error"]
        assert answer.status_code == 502 and error["code"] == "upstream_bad_response", answer.text
        assert error["message"] == "model 'raw' dropped the connection"


def test_a_client_leaving_before_the_first_event_hangs_up_on_the_model(env):
    """A client that leaves while the model has not yet sent its first event has the model's connection closed,
    the in-flight count back to zero and a 499 in the ledger."""
    harness, raw = env
    raw.script = [(SSE_HEAD, 0.0)] + [(b": ping\n\n", 0.1)] * 60
    before = raw.in_flight
    body = json.dumps({"model": "raw-only", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.create_connection(("127.0.0.1", harness.port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"x-request-id: leaves-before-first\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    time.sleep(0.3)
    client.close()
    assert_hung_up(harness, raw, before)
    record = ledger_record(harness, "leaves-before-first")
    assert record["status"] == 499 and record["attempts"][0]["error"] == "client_disconnected"
    assert breaker_failures(harness, "raw") == 0


def _tool_call_chunk(index: int, arguments: str | None, name: str | None = None, finish: str | None = None) -> bytes:
    """One chat chunk of choice `index`: a piece of its tool call's arguments (and name), or its finish."""
    function = {"arguments": arguments, **({"name": name} if name else {})}
    delta = {"tool_calls": [{"index": 0, "id": "t", "type": "function", "function": function}]} \
        if arguments is not None else {}
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}).encode()


def test_two_choices_of_tool_call_deltas_reach_the_sdk_with_usage_only_when_asked(env):
    """An n=2 stream of tool-call deltas reaches the SDK whole per choice; the usage chunk reaches a client that
    asked for it (`stream_options.include_usage`) and no other."""
    harness, raw = env
    tc = _tool_call_chunk
    usage = json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake", "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}).encode()
    events = [tc(0, "", "f"), tc(1, "", "f"), tc(0, '{"a"'), tc(1, '{"b"'), tc(0, ': 1}'), tc(1, ': 2}'),
              tc(0, None, finish="tool_calls"), tc(1, None, finish="tool_calls"), usage, b"[DONE]"]
    raw.script = [(SSE_HEAD + sse(*events), 0.0)]
    client = harness.openai()
    stream = client.chat.completions.create(model="raw-only", stream=True, n=2, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 9
    args = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            if ch.delta.tool_calls:
                args[ch.index] += ch.delta.tool_calls[0].function.arguments or ""
    assert args == {0: '{"a": 1}', 1: '{"b": 2}'}
    raw.script = [(SSE_HEAD + sse(*events), 0.0)]
    chunks = list(client.chat.completions.create(model="raw-only", stream=True, n=2,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"x" * 3_000_000, b'{"error": [1, 2]}', b"[]"],
                         ids=["html", "huge", "odd-error", "list"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_5xx_of_any_body_is_a_short_openai_error(env, body, stream):
    """A 500 whose body is HTML, 3 MB, an odd error or a JSON list reaches the client as OpenAI's error shape,
    short, with no stack trace, streamed or not."""
    harness, raw = env
    raw.script = [(http_head(500, {"Content-Type": "text/html"}, len(body)) + body, 0.0)]
    reply = post(harness, stream=stream)
    assert reply.status_code == 500, reply.text[:300]
    error = reply.json()["error"]
    assert error["code"] == "upstream_error" and "Traceback" not in reply.text
    assert len(reply.content) < 2000


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_long_error_message_from_the_model_is_cut_short(env, stream):
    """A model's error whose message runs to 100 000 characters (an echoed prompt, a dump) reaches the client cut
    to its first MAX_ERROR_MESSAGE_CHARS, marked as cut with an ellipsis."""
    harness, raw = env
    raw.script = json_answer({"error": {"message": "x" * 100_000, "type": "server_error"}}, status=500)
    reply = post(harness, stream=stream)
    assert reply.status_code == 500, reply.text[:300]
    message = reply.json()["error"]["message"]
    assert message.endswith("x" * MAX_ERROR_MESSAGE_CHARS + "…") and len(message) < MAX_ERROR_MESSAGE_CHARS + 100


def test_a_stream_answered_as_plain_json_is_a_bad_response_that_falls_back(env):
    """A model that ignores `stream: true` and answers one JSON body sent no stream: the fallback answers."""
    harness, raw = env
    raw.script = json_answer(COMPLETION)
    reply = post(harness, model="raw")
    assert reply.headers["x-gateway-model"] == "medium" and reply.headers["x-gateway-fallback-reason"] == "bad_response"
    assert reply.content.endswith(b"data: [DONE]\n\n")


def test_the_clients_openai_organization_and_project_are_not_sent_upstream(env):
    """`OpenAI-Organization` and `OpenAI-Project` (which the SDK sends from OPENAI_ORG_ID and OPENAI_PROJECT_ID)
    belong to the client's credential, which the gateway replaces with the model's own: they are not passed on,
    where a provider would refuse the gateway's key for an organization it is not in."""
    harness, raw = env
    raw.script = json_answer(COMPLETION)
    client = harness.openai(organization="org-client", project="proj-client")
    client.chat.completions.create(model="raw-only", messages=[{"role": "user", "content": "hi"}])
    head = raw.requests[-1][0].lower()
    assert b"openai-organization" not in head and b"openai-project" not in head
    assert b"org-client" not in head and b"proj-client" not in head



def test_the_admin_token_and_an_x_api_key_are_not_sent_upstream(env):
    """A client (an ops script, an SDK with default headers) that sends the gateway's admin token, or an
    Anthropic-style `x-api-key`, on a model call does not hand either credential to the model's provider."""
    harness, raw = env
    raw.script = json_answer(COMPLETION)
    client = harness.openai(default_headers={"x-admin-token": "admin-secret-token", "x-api-key": "client-key"})
    client.chat.completions.create(model="raw-only", messages=[{"role": "user", "content": "hi"}])
    head = raw.requests[-1][0].lower()
    assert b"x-admin-token" not in head and b"admin-secret-token" not in head
    assert b"x-api-key" not in head and b"client-key" not in head


def test_the_models_own_key_goes_upstream_in_place_of_the_clients(env, monkeypatch):
    """The model's credential, read from the variable its `api_key_env` names, is sent upstream as a Bearer
    token in place of the client's key; with that variable unset, no Authorization header is sent at all."""
    harness, raw = env
    raw.script = json_answer(COMPLETION)
    monkeypatch.setitem(harness.environ, RAW_KEY_ENV, "sk-model-own")
    client = harness.openai(api_key="client-secret-key")
    client.chat.completions.create(model="raw-only", messages=[{"role": "user", "content": "hi"}])
    head = raw.requests[-1][0].lower()
    assert b"\r\nauthorization: bearer sk-model-own\r\n" in head and b"client-secret-key" not in head
    monkeypatch.delitem(harness.environ, RAW_KEY_ENV)
    client.chat.completions.create(model="raw-only", messages=[{"role": "user", "content": "hi"}])
    head = raw.requests[-1][0].lower()
    assert b"authorization" not in head and b"client-secret-key" not in head


# a half-open probe whose client leaves --------------------------------------------------------------------

PROBE_TAIL = """routing: {{breaker: {{failure_threshold: 1, open_s: 3}}}}
"""


@pytest.fixture(scope="module")
def probing():
    with raw_model_gateway(first_byte_s=1, tail=PROBE_TAIL) as running:
        yield running


def test_a_probe_whose_client_left_frees_the_half_open_circuit(probing):
    """A half-open model whose probe call was abandoned by its client (before the model answered) is tried by
    the next request, rather than skipped for another open_s as if the probe were still out."""
    harness, raw = probing
    _half_open(harness, raw)
    raw.script = [(b"", 5.0)]                                                               # the probe hangs
    client = _send_chat(harness, "raw")
    time.sleep(0.3)
    client.close()                                                                          # ... and its client leaves
    settled(harness, "raw")
    raw.script = json_answer(COMPLETION)
    assert post(harness, model="raw", stream=False).headers["x-gateway-model"] == "raw"


def test_a_last_hope_call_whose_client_left_does_not_give_back_another_calls_probe(probing):
    """A call sent to a half-open model as its plan's last hope, while another call holds the probe, took no
    probe: its client leaving leaves the other call's probe held."""
    harness, raw = probing
    _half_open(harness, raw)
    raw.script = [(b"", 5.0)]                                                               # every call hangs
    prober = _send_chat(harness, "raw")             # takes the probe (its first_byte_s is 1 s)
    breakers = harness.services.fleet.breakers
    _until(lambda: breakers.probe_since("raw") is not None, "the probe was never taken")
    probe_since_s = breakers.probe_since("raw")
    last_hope = _send_chat(harness, "raw-only")     # raw alone in its plan: sent although the probe is out
    in_flight = harness.services.fleet.estimates.in_flight
    _until(lambda: in_flight("raw") == 2, "the last hope never reached the model")
    last_hope.close()
    time.sleep(0.2)
    assert breakers.probe_since("raw") == probe_since_s
    prober.close()


def _until(condition, failure: str, timeout_s: float = 5.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, failure
        time.sleep(0.005)


def _half_open(harness: Harness, raw) -> None:
    """Open raw's circuit with a failure (the fallback answers), then wait until it is half-open."""
    reset_raw_model(harness, raw)
    raw.script = json_answer({"error": {"message": "down"}}, status=503)
    assert post(harness, model="raw", stream=False).headers["x-gateway-model"] == "medium"
    time.sleep(3.1)                                 # past open_s


def _send_chat(harness: Harness, model: str) -> socket.socket:
    """A chat completion for `model` sent over a raw connection, left open for the test to close."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.create_connection(("127.0.0.1", harness.port))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return client


# a model that cannot be reached --------------------------------------------------------------------------------

def lone_model_gateway(name: str, port: int, timeouts: str, host: str = "127.0.0.1") -> Harness:
    """A started gateway whose one model, `name`, is served at `host`:`port` with these `timeouts` (YAML)."""
    timeouts = timeouts.replace("{", "{{").replace("}", "}}")          # the harness formats the template
    policy = f"""version: 1
models:
  {name}:
    endpoint: http://{host}:{port}/v1
    upstream_model: {name}-1b
    latency_prior: {{{{ttft_ms: 5, tpot_ms: 1}}}}
    timeouts: {timeouts}
routes:
  - name: {name}-only
    match: {{{{models: ["{name}"]}}}}
    candidates: [{name}]
"""
    return Harness(policy_template=policy, sims={}).start()


def test_an_unreachable_model_is_named_without_its_address():
    """A model whose server refuses connections is reported to the client by name and reason (502
    upstream_unreachable), never by the model server's internal address."""
    port = free_port()                              # nothing listens there
    harness = lone_model_gateway("dead", port, "{connect_s: 1, first_byte_s: 1, total_s: 5}")
    try:
        for stream in (False, True):
            answer = post(harness, model="dead", stream=stream)
            error = answer.json()["error"]
            assert answer.status_code == 502 and error["code"] == "upstream_unreachable"
            assert "model 'dead' is unreachable: connection refused" in error["message"]
            assert "127.0.0.1" not in answer.text and str(port) not in answer.text
    finally:
        harness.stop()


def test_a_model_whose_host_name_does_not_resolve_is_named_without_its_host():
    """A model whose host name does not resolve (a typo, a service not deployed) is reported to the client by
    name and reason, "its host name does not resolve" (502 upstream_unreachable), never by the host name."""
    harness = lone_model_gateway("lost", 8000, "{connect_s: 1, first_byte_s: 1, total_s: 5}",
                                 host="model-server.invalid")     # .invalid never resolves (RFC 6761)
    try:
        for stream in (False, True):
            answer = post(harness, model="lost", stream=stream)
            error = answer.json()["error"]
            assert answer.status_code == 502 and error["code"] == "upstream_unreachable"
            assert error["message"].endswith("model 'lost' is unreachable: its host name does not resolve")
            assert "model-server" not in answer.text
    finally:
        harness.stop()


def test_an_open_circuit_on_the_only_model_is_still_tried(probing):
    """A route whose plan has one model, its circuit open: the call is made anyway as the last hope (the client
    gets the model's answer), not refused with no model tried."""
    harness, raw = probing
    reset_raw_model(harness, raw)
    raw.script = json_answer({"error": {"message": "down"}}, status=503)
    assert post(harness, model="raw", stream=False).headers["x-gateway-model"] == "medium"
    assert harness.services.fleet.breakers.state("raw") == "open"
    raw.script = json_answer(COMPLETION)
    before = len(raw.requests)
    reply = post(harness, model="raw-only", stream=False)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-gateway-model"] == "raw" and len(raw.requests) == before + 1


def test_a_probe_answered_with_the_clients_own_error_closes_the_circuit(probing):
    """A half-open model's probe answered with a 400 (the client's own mistake) shows the model is up: the
    circuit closes, and the next call goes to it, not past it for another open_s."""
    harness, raw = probing
    _half_open(harness, raw)
    raw.script = json_answer({"error": {"message": "temperature too high", "type": "invalid_request_error",
                                        "param": "temperature"}}, status=400)
    assert post(harness, model="raw", stream=False).status_code == 400
    settled(harness, "raw")
    assert harness.services.fleet.breakers.state("raw") == "closed"
    raw.script = json_answer(COMPLETION)
    assert post(harness, model="raw", stream=False).headers["x-gateway-model"] == "raw"


def test_a_model_that_never_accepts_the_connection_is_given_up_at_connect_s():
    """A model host whose accept queue is full (connects hang): a whole answer's call gives up at connect_s
    (504 upstream_timeout), not at total_s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):                  # fill the accept queue: the next SYNs are dropped, a connect hangs
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    harness = lone_model_gateway("stuck", port, "{connect_s: 0.5, first_byte_s: 6, total_s: 8}")
    try:
        started_s = time.monotonic()
        answer = post(harness, model="stuck", stream=False)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started_s < 3
    finally:
        harness.stop()
        for filler in fillers:
            filler.close()
        listener.close()
