"""The HTTP surface as real and broken clients meet it: a request refused on its head is refused before its body is
sent, every refusal is in OpenAI's shape, and a refusal that ends the connection says so first.

The client is a raw socket or `http.client`, writing the bytes such a client writes.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import time

import pytest

from tests.support.harness import DEFAULT_POLICY, Harness
from tests.support.policies import tenants

MAX_BODY_BYTES = 4096
POLICY = DEFAULT_POLICY + tenants({"acme": "key-acme"}) + "server: {{max_body_bytes: %d, client_timeout_s: 2}}\n" % (
    MAX_BODY_BYTES)
CHAT = json.dumps({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer key-acme"}


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY).start()
    yield harness
    harness.stop()


def head_of(path: str, *, length: int, extra: bytes = b"", key: bytes = b"key-acme") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (path.encode(), key, length, extra))


def first_answer_line(client: socket.socket) -> bytes:
    """The status line of the first thing the gateway sends (a 100 Continue counts)."""
    received = b""
    while b"\r\n" not in received:
        chunk = client.recv(65536)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0]


def read_until_closed(client: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (what came, should it not close in time)."""
    received = b""
    try:
        while chunk := client.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def test_a_keep_alive_client_is_told_to_reconnect_after_a_body_that_does_not_decode(gw):
    """A body that is not the gzip its Content-Encoding says is a 400 that carries `Connection: close` (the gateway
    closes the connection after it): the client's next request, on the same `http.client` connection as SDKs keep
    them, opens a new connection and is served, rather than being written into a connection the gateway resets."""
    client = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    client.request("POST", "/v1/chat/completions", body=b"this is not gzip",
                   headers={**HEADERS, "Content-Encoding": "gzip"})
    refused = client.getresponse()
    assert refused.status == 400 and b"could not read the request body" in refused.read()
    assert refused.getheader("Connection", "").lower() == "close"
    client.request("POST", "/v1/chat/completions", body=CHAT, headers=HEADERS)
    assert client.getresponse().status == 200
    client.close()


def test_a_body_that_does_not_decode_logs_no_unhandled_exception(gw, caplog):
    """A client's undecodable body (gzip with trailing bytes that are not gzip) is the client's error, answered 400:
    it leaves no ERROR `Unhandled exception` traceback in the gateway's log, which alerting would page on."""
    with caplog.at_level(logging.ERROR, logger="aiohttp.server"), \
            socket.create_connection(("127.0.0.1", gw.port), timeout=5) as client:
        body = gzip.compress(CHAT) + b"trailing bytes that are not gzip"
        client.sendall(head_of("/v1/chat/completions", length=len(body), extra=b"Content-Encoding: gzip\r\n") + body)
        assert first_answer_line(client).endswith(b" 400 Bad Request")
        read_until_closed(client)
    unhandled = [record for record in caplog.records if "Unhandled exception" in record.getMessage()]
    assert not unhandled, unhandled[0].exc_info


def test_a_body_announced_past_the_limit_is_refused_before_100_continue(gw):
    """A client that asks `Expect: 100-continue` for a body whose Content-Length is past `server.max_body_bytes` is
    answered 413 at once, not `100 Continue` (which tells it to upload the whole body only to be refused)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=2) as client:
        client.sendall(head_of("/v1/chat/completions", length=MAX_BODY_BYTES * 10, extra=b"Expect: 100-continue\r\n"))
        answer = read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), answer[:100]
    assert b"\r\nconnection: close\r\n" in answer.lower()    # the body it announced never comes on it


def test_a_request_with_an_unknown_key_is_refused_before_100_continue(gw):
    """A client that asks `Expect: 100-continue` with a key the gateway does not know is answered 401 at once, before
    it uploads its prompt to a gateway that will not take it."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=2) as client:
        client.sendall(head_of("/v1/chat/completions", length=len(CHAT), key=b"key-nobody",
                               extra=b"Expect: 100-continue\r\n"))
        answer = read_until_closed(client)
    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer[:100]
    assert b"\r\nconnection: close\r\n" in answer.lower()


def test_a_request_taken_with_100_continue_is_told_to_continue_and_answered(gw):
    """`Expect: 100-continue` on a request the gateway takes (curl sends it for large bodies): `100 Continue` comes
    before the body is sent, then the answer (a guard for the two tests above: the 100 must still be sent)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as client:
        client.sendall(head_of("/v1/chat/completions", length=len(CHAT),
                               extra=b"Expect: 100-continue\r\nConnection: close\r\n"))
        assert first_answer_line(client) == b"HTTP/1.1 100 Continue"
        client.sendall(CHAT)
        assert b"HTTP/1.1 200 OK" in read_until_closed(client)


def test_an_expectation_other_than_100_continue_is_a_417_in_openais_shape(gw):
    """An `Expect` other than 100-continue is a 417 like every other refusal: OpenAI's error shape in JSON with an
    x-request-id, not aiohttp's plain-text `Unknown Expect`."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as client:
        client.sendall(head_of("/v1/chat/completions", length=len(CHAT),
                               extra=b"Expect: something-else\r\nConnection: close\r\n") + CHAT)
        answer = read_until_closed(client)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417 "), answer[:200]
    assert b"content-type: application/json" in head.lower() and b"x-request-id: " in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def healthz_round_trip_s(gw) -> float:
    started_s = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        read_until_closed(client)
    return time.monotonic() - started_s


def test_a_compressed_body_refused_at_once_is_not_inflated_after_its_answer(gw):
    """A 1 MB gzip body that inflates to 1 GB, sent with a key the gateway does not know, is answered 401 before its
    body is read, and the connection is closed: the gateway does not go on decoding the body it refused (aiohttp's
    lingering read decodes on the event loop), so other clients are not held up for a second meanwhile."""
    member = gzip.compress(b"\0" * (64 << 20), compresslevel=9)     # 64 MiB of zeros in about 64 KB
    bomb = member * 16
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as client:
        head = head_of("/v1/chat/completions", length=len(bomb), key=b"key-nobody",
                       extra=b"Content-Encoding: gzip\r\n")
        try:
            client.sendall(head + bomb)
        except OSError:             # closed by the gateway while the body was still being sent
            pass
        slowest_s = max(healthz_round_trip_s(gw) for _ in range(3))
    assert slowest_s < 0.3, f"a /healthz took {slowest_s:.2f} s while the refused body was being inflated"
