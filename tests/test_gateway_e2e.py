"""End to end: the official openai SDK through the real gateway to simulated backends."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import openai
import pytest

from tests.support.harness import Harness


@pytest.fixture(scope="module")
def gw():
    harness = Harness().start()
    yield harness
    harness.stop()


def test_chat_completion_through_gateway(gw):
    """A non-streamed chat completion reaches the small model and comes back in OpenAI's shape."""
    client = gw.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hello there"}], max_tokens=5)
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 5
    assert raw.headers["x-gateway-model"] == "small"
    assert raw.headers["x-gateway-route"] == "chat-default"
    assert raw.headers["x-gateway-fallback"] == "none"
    assert float(raw.headers["x-gateway-cost-usd"]) > 0
    assert raw.headers["x-request-id"]


def test_streaming_chat_through_gateway(gw):
    """A streamed chat completion arrives as chunks the SDK assembles, with usage only when asked."""
    client = gw.openai()
    chunks = list(client.chat.completions.create(
        model="auto", stream=True, max_tokens=8, messages=[{"role": "user", "content": "Count"}]))
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    with_usage = list(client.chat.completions.create(
        model="auto", stream=True, max_tokens=8, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count"}]))
    assert with_usage[-1].usage.completion_tokens == 8
    assert with_usage[-1].choices == []


async def test_async_client_chat_and_stream(gw):
    """The async SDK works too, streamed and not."""
    client = gw.async_openai()
    completion = await client.chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "Plan"}], max_tokens=3)
    assert completion.model == "sim-medium"
    stream = await client.chat.completions.create(
        model="smart", stream=True, messages=[{"role": "user", "content": "Plan"}], max_tokens=3)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 3
    await client.close()


def test_completions_and_embeddings(gw):
    """Text completions and embeddings pass through as well."""
    client = gw.openai()
    completion = client.completions.create(model="auto", prompt="Once upon a time", max_tokens=4)
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 4
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2
    assert len(embedding.data[0].embedding) > 0


def test_models_lists_policy_aliases(gw):
    """GET /v1/models lists the aliases the policy routes."""
    ids = {m.id for m in gw.openai().models.list()}
    assert {"auto", "gpt-4o-mini", "smart", "text-embedding-3-small"} <= ids


def test_stream_is_relayed_incrementally(gw):
    """The first chunk reaches the client long before the upstream has finished generating."""
    gw.sim_config("small", tpot_ms=50)
    try:
        client = gw.openai()
        started = time.perf_counter()
        arrivals = []
        for chunk in client.chat.completions.create(
                model="auto", stream=True, max_tokens=20, messages=[{"role": "user", "content": "Go"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - started)
        assert len(arrivals) == 20
        # 20 tokens at 50 ms each: the whole answer takes about a second; the first word came early
        assert arrivals[-1] - arrivals[0] > 0.5
        assert arrivals[0] < arrivals[-1] / 3
    finally:
        gw.sim_config("small", tpot_ms=1)


def test_client_authorization_not_forwarded(gw):
    """The client's API key never travels upstream; the request id and hop-by-hop hygiene hold."""
    client = gw.openai(api_key="client-secret-key")
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                   extra_headers={"X-Custom": "kept", "Proxy-Authorization": "secret"})
    seen = gw.sim_requests("small", last=1)[-1]["headers"]
    assert "client-secret-key" not in str(seen)
    assert "authorization" not in seen
    assert "proxy-authorization" not in seen
    assert seen.get("x-custom") == "kept"
    assert seen.get("x-request-id")


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, "invalid_request"),
    (b'{"model": "auto"}', 400, "missing_required_parameter"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, None),
    (b'{"model": "auto", "messages": "hello"}', 400, "invalid_type"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400,
     "invalid_type"),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
])
def test_bad_input_gets_openai_errors(gw, body, status, code):
    """Each malformed request gets its status and an OpenAI-shaped error, and the server keeps serving."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{gw.base_url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    import json

    error = json.loads(caught.value.read())["error"]
    assert caught.value.code == status
    assert error["code"] == code
    assert set(error) == {"message", "type", "code", "param"}
    assert "Traceback" not in error["message"]
    assert gw.http("GET", f"{gw.base_url}/healthz") == {"status": "ok"}


def test_a_phone_photo_sent_inline_is_taken_with_the_default_body_limit(gw):
    """A vision request with a phone camera's photo as a base64 data URL (6 MB of JPEG, 8 MB encoded), as the
    SDK sends one, is served with the default server.max_body_bytes: OpenAI takes images up to 20 MB, and an
    application that changes only its base URL must not start getting 413s."""
    photo = base64.b64encode(os.urandom(6 * 1024 * 1024)).decode()
    answer = gw.openai().chat.completions.create(model="auto", max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this photo?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}}]}])
    assert answer.choices[0].message.content


def test_body_over_limit_is_413(gw):
    """A body larger than server.max_body_bytes (20 MiB by default) is refused with 413 before it is parsed."""
    client = gw.openai()
    huge = "x" * (21 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": huge}])
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"


def test_unknown_model_via_sdk_is_404(gw):
    """The SDK sees NotFoundError for a model alias no route serves."""
    with pytest.raises(openai.NotFoundError):
        gw.openai().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_unknown_path_is_openai_404(gw):
    """An unknown path gets a 404 in OpenAI's error shape."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{gw.base_url}/v1/nothing-here", timeout=10)
    assert caught.value.code == 404
    assert b'"error"' in caught.value.read()


def test_headers_the_connection_header_names_and_gateway_headers_stay_here(gw):
    """Headers the client's Connection header names (hop-by-hop, for the gateway alone) and the gateway's own
    x-gateway-* headers (task ids, SLA hints) are not sent on to the model."""
    body = json.dumps({"model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close, X-Hop-Secret\r\n"
                     b"X-Hop-Secret: s3cret\r\nx-gateway-task-id: task-7\r\nx-gateway-min-tier: 1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    seen = gw.sim_requests("small", last=1)[-1]["headers"]
    assert "x-hop-secret" not in {k.lower() for k in seen} and "s3cret" not in str(seen)
    assert not [k for k in seen if k.lower().startswith("x-gateway-")]
