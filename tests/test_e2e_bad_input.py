"""Client input that used to reach a 500, or stall the event loop: each is now a clear 4xx, or harmless."""

from __future__ import annotations

import asyncio
import json
import socket

import openai
import pytest
import requests
from aiohttp.test_utils import make_mocked_request

from gateway.context import RequestContext
from gateway.stages.count import LARGE_BODY_BYTES, Count
from gateway.tenancy.identity import sha256_hex
from tests.support.harness import DEFAULT_POLICY, Harness
from tests.support.policies import tenants

POLICY = DEFAULT_POLICY + tenants({"acme": "key-acme"}) + 'server:\n  admin_token_sha256: "%s"\n' % sha256_hex(
    "admin-token")
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY).start()
    yield harness
    harness.stop()


def raw_request(port: int, head: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


@pytest.mark.parametrize("depth", [300, 2000])
@pytest.mark.parametrize("where", ["in a message", "at the top"])
def test_json_nested_deeper_than_the_gateway_can_write_is_a_400(gw, where, depth):
    """300 levels parse (orjson reads 1024) but cannot be sent on (it writes 254): a 400, not a 500; 2000 levels,
    past what orjson reads, get the same 400 (`invalid_request`), not the one for JSON that does not parse."""
    extra = nested(depth)
    raw = ('{"model":"auto","messages":[{"role":"user","content":"hi","meta":%s}]}' % extra if where == "in a message"
           else '{"model":"auto","messages":[{"role":"user","content":"hi"}],"meta":%s}' % extra)
    reply = requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=20,
                          headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
    assert reply.status_code == 400 and "nested more than 254 levels" in reply.json()["error"]["message"]
    assert reply.json()["error"]["code"] == "invalid_request"
    ok = '{"model":"auto","max_tokens":3,"messages":[{"role":"user","content":"hi"}],"meta":%s}' % nested(250)
    assert requests.post(f"{gw.base_url}/v1/chat/completions", data=ok, timeout=20, headers={
        "Content-Type": "application/json", "Authorization": "Bearer key-acme"}).status_code == 200


@pytest.mark.parametrize("path, method, header", [
    (b"/v1/chat/completions", b"POST", b"Authorization: Bearer \xff\xfe"),
    (b"/v1/chat/completions", b"POST", b"api-key: \xff"),
    (b"/v1/models", b"GET", b"Authorization: Bearer \xff\xfe"),
    (b"/v1/outcomes", b"POST", b"Authorization: Bearer \xff"),
    (b"/admin/policy", b"GET", b"x-admin-token: \xff\xfe"),
])
def test_a_credential_that_is_not_utf8_is_a_401(gw, path, method, header):
    """Bytes that are not UTF-8 in a key or token are a key that matches nothing: 401, never 500."""
    head = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header + b"\r\n"
    answer = raw_request(gw.port, head, json.dumps(CHAT).encode() if method == b"POST" else b"")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 401 Unauthorized"), answer[:300]
    assert b"x-request-id" in answer.lower()


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/outcomes"])
def test_a_body_that_does_not_decode_as_its_content_encoding_is_a_400(gw, path):
    """Content-Encoding: gzip on a body that is not gzip: a 400 saying the body could not be read."""
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer key-acme\r\nContent-Encoding: gzip\r\n")
    answer = raw_request(gw.port, head, b"this is not gzip")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:300]
    assert b"could not read the request body" in answer


def test_an_unknown_path_answers_with_a_request_id(gw):
    """Errors answered by the outermost middleware (404 here) carry x-request-id like every other answer."""
    reply = requests.get(f"{gw.base_url}/v1/nowhere", timeout=10, headers={"x-request-id": "find-me-1"})
    assert reply.status_code == 404 and reply.headers["x-request-id"] == "find-me-1"


async def test_a_large_body_is_counted_off_the_event_loop_whatever_its_transfer_encoding():
    """The size read decides, not Content-Length (a chunked body has none): the loop keeps ticking meanwhile."""
    text = " ".join(f"w{i % 9973}x" for i in range(300_000))
    ctx = RequestContext(http=make_mocked_request("POST", "/v1/chat/completions"), policy=None, request_id="r")
    ctx.body = {"model": "auto", "messages": [{"role": "user", "content": text}]}
    ctx.body_bytes = len(text)
    assert ctx.http.content_length is None and ctx.body_bytes > LARGE_BODY_BYTES
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    await Count(services=None).handle(ctx)
    ticker.cancel()
    assert ctx.prompt_tokens > 300_000 and ticks >= 5


async def test_a_large_embeddings_body_is_counted_as_embeddings():
    """An embeddings body past LARGE_BODY_BYTES, counted in a thread, is counted as embeddings input: two token
    arrays of 40,000 and 30,000 ids are 70,000 tokens."""
    ctx = RequestContext(http=make_mocked_request("POST", "/v1/embeddings"), policy=None, request_id="r",
                         endpoint="embeddings")
    ctx.body = {"model": "auto", "input": [[7] * 40_000, [8] * 30_000]}
    ctx.body_bytes = len(json.dumps(ctx.body))
    assert ctx.body_bytes > LARGE_BODY_BYTES
    await Count(services=None).handle(ctx)
    assert ctx.prompt_tokens == 70_000


def test_a_completions_prompt_longer_than_every_window_names_prompt():
    """A legacy completions prompt no model of the route has room for is a 400 context_length_exceeded naming
    `prompt`, the field to shorten (it named `messages`, which a completions request has none of)."""
    harness = Harness(DEFAULT_POLICY).start()
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            harness.openai().completions.create(model="auto", prompt="hi " * 140_000)
    finally:
        harness.stop()
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")


def test_a_completions_request_of_max_tokens_0_scores_the_prompt(gw):
    """`max_tokens: 0` on legacy completions (an evaluation harness scoring a prompt with echo and logprobs) is
    forwarded, not refused; on chat it stays a 400, as OpenAI answers it."""
    client = gw.openai(api_key="key-acme")
    answer = client.completions.with_raw_response.create(model="auto", prompt="Score me", max_tokens=0, echo=True)
    assert answer.http_response.status_code == 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert (caught.value.code, caught.value.param) == ("integer_below_min_value", "max_tokens")


def padded_chat(size: int) -> bytes:
    """A chat body of one answer token, padded with spaces to exactly `size` bytes."""
    body = json.dumps({**CHAT, "max_tokens": 1}).encode()
    return body + b" " * (size - len(body))


def test_a_body_of_exactly_max_body_bytes_is_taken_whether_declared_or_chunked():
    """server.max_body_bytes is the largest body taken: that size is answered, one byte more is a 413
    `request_too_large`, both for a body of declared length and for one sent in chunks (no Content-Length)."""
    harness = Harness(DEFAULT_POLICY + "server:\n  max_body_bytes: 2048\n").start()
    try:
        for chunked in (False, True):
            for size, status in ((2048, 200), (2049, 413)):
                data = padded_chat(size)
                reply = requests.post(f"{harness.base_url}/v1/chat/completions", timeout=10,
                                      data=iter([data]) if chunked else data,
                                      headers={"Content-Type": "application/json"})
                assert reply.status_code == status, (chunked, size, reply.text)
                if status == 413:
                    assert reply.json()["error"]["code"] == "request_too_large"
    finally:
        harness.stop()


def test_json_exactly_254_levels_deep_is_taken_and_255_is_a_400(gw):
    """The body itself is the first level: 254 levels are forwarded, 255 are the 400 about nesting."""
    for depth, status in ((254, 200), (255, 400)):
        raw = '{"model":"auto","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"meta":%s}' % nested(
            depth - 1)
        reply = requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=20,
                              headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
        assert reply.status_code == status, (depth, reply.text)
    assert "nested more than 254 levels" in reply.json()["error"]["message"]


@pytest.mark.parametrize("header", ["x-gateway-task-id", "x-gateway-workflow"])
def test_a_grouping_header_of_exactly_256_characters_is_taken(gw, header):
    """A task id or workflow of MAX_GROUPING_CHARS characters is the longest taken (257 are a 400)."""
    reply = requests.post(f"{gw.base_url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=10,
                          headers={"Authorization": "Bearer key-acme", header: "t" * 256})
    assert reply.status_code == 200, reply.text


def test_an_empty_body_is_a_400_asking_for_a_json_object(gw):
    """An empty body is the gateway's `invalid_request` saying a JSON object was expected, not the answer to
    JSON that does not parse."""
    reply = requests.post(f"{gw.base_url}/v1/chat/completions", data=b"", timeout=10,
                          headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["message"]) == ("invalid_request", "request body is empty; expected a JSON object")


def test_a_string_cut_in_the_middle_of_an_emoji_is_served_with_a_replacement_character(gw):
    """JavaScript's JSON.stringify writes half a surrogate pair as an escape (`"\\ud83d"`) for a string cut in the
    middle of an emoji: valid JSON, which orjson cannot read (such a string has no UTF-8 form). It is served, the
    lone half replaced by U+FFFD, as a browser encodes it; a pair stays the emoji it is."""
    raw = (b'{"model": "auto", "max_tokens": 5, '
           b'"messages": [{"role": "user", "content": "cut \\ud83d | \\ud83d\\ude00"}]}')
    response = requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=10,
                             headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
    assert response.status_code == 200, response.text
    sent = gw.sim_requests("small", last=1)[-1]["body"]
    assert sent["messages"][0]["content"] == "cut \ufffd | \U0001F600"


@pytest.mark.parametrize("raw", [
    b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud83d"}], "temperature": NaN}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud83d"}], "seed": 123456789012345678901234}',
    b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud83d"}], "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"model": "auto", "messages": [{"role": "user", "content": "\\ud83d"}] x',
])
def test_a_lone_surrogate_beside_what_is_not_json_is_still_a_400(gw, raw):
    response = requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=10,
                             headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_lone_surrogate_in_a_body_past_a_mebibyte_is_a_400(gw):
    """The stdlib's reading of such JSON takes the event loop about 8 times orjson's time: it is done for bodies
    of text, up to a MiB; a larger body with a lone surrogate is the 400 any JSON orjson cannot read is."""
    filler = "x" * (1024 * 1024)
    raw = (b'{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "cut \\ud83d"}, '
           b'{"role": "user", "content": "' + filler.encode() + b'"}]}')
    response = requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=10,
                             headers={"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]
