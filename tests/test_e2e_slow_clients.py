"""Clients that stall while sending a request (slowloris): its head, or its body, must come within
`server.client_timeout_s`, else the client is answered 408 and the connection closed; a slow but steady upload, and
an idle keep-alive connection, are left alone.

The client is a raw socket, writing the bytes a stalling client would.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.support.harness import DEFAULT_POLICY, Harness

TIMEOUT_S = 0.6
BODY = json.dumps({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY))


@pytest.fixture(scope="module")
def gw():
    harness = Harness(DEFAULT_POLICY + "server: {{client_timeout_s: %s}}\n" % TIMEOUT_S,
                      sims={"small": dict(ttft_ms=1, tpot_ms=0), "medium": dict(ttft_ms=1, tpot_ms=0),
                            "large": dict(ttft_ms=1, tpot_ms=0)}).start()
    yield harness
    harness.stop()


def connect(gw) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def read_until_closed(client: socket.socket) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and how long that took."""
    started_s = time.monotonic()
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    return received, time.monotonic() - started_s


def one_answer(client: socket.socket, with_body: bool = False):
    """One whole HTTP answer (head and Content-Length body) from a keep-alive connection: its head (and body)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += client.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += client.recv(65536)
    return (head, body) if with_body else head


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"],
                         ids=["nothing", "half-a-head"])
def test_a_new_connection_whose_head_does_not_come_is_answered_408_and_closed(gw, sent):
    """A connection that sends nothing, or half a request head, is answered 408 in OpenAI's error shape after
    client_timeout_s and closed (aiohttp alone waited an hour)."""
    with connect(gw) as client:
        client.sendall(sent)
        received, waited_s = read_until_closed(client)
    assert received.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in received
    assert b"client_timeout_s" in received and b"\r\nx-request-id: " in received
    assert TIMEOUT_S * 0.8 < waited_s < TIMEOUT_S + 5


def test_a_head_trickled_after_a_keep_alive_answer_is_answered_408_and_closed(gw):
    """After a whole request and its answer, a next head that starts and stalls gets the same 408 and close."""
    with connect(gw) as client:
        client.sendall(HEAD + BODY)
        assert one_answer(client).startswith(b"HTTP/1.1 200")
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        received, waited_s = read_until_closed(client)
    assert received.startswith(b"HTTP/1.1 408 ") and TIMEOUT_S * 0.8 < waited_s < TIMEOUT_S + 5


def test_a_body_that_stops_coming_is_answered_408_and_nothing_is_called(gw):
    """A head, then part of the body, then nothing: a 408 naming the setting, `Connection: close` (aiohttp then
    closes once its lingering read of the rest, at most 10 s, ends); the model was never called."""
    before = sum(gw.sim_stats(name)["total"] for name in gw.sims)
    with connect(gw) as client:
        client.sendall(HEAD + BODY[:10])
        started_s = time.monotonic()
        head, body = one_answer(client, with_body=True)
        waited_s = time.monotonic() - started_s
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout" and b"client_timeout_s" in body
    assert TIMEOUT_S * 0.8 < waited_s < TIMEOUT_S + 5
    assert sum(gw.sim_stats(name)["total"] for name in gw.sims) == before


def test_a_slow_but_steady_upload_and_an_idle_keep_alive_connection_are_left_alone(gw):
    """A body sent a few bytes at a time, each within client_timeout_s but all of it over twice as long, is
    answered; then the connection, idle (no byte) for longer than client_timeout_s, still serves a request."""
    with connect(gw) as client:
        client.sendall(HEAD)
        started_s = time.monotonic()
        piece = len(BODY) // 8 + 1                      # 8 pieces, each a quarter of client_timeout_s apart
        for start in range(0, len(BODY), piece):
            time.sleep(TIMEOUT_S / 4)
            client.sendall(BODY[start:start + piece])
        assert one_answer(client).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started_s > TIMEOUT_S * 1.5
        time.sleep(TIMEOUT_S * 2)
        client.sendall(HEAD + BODY)
        assert one_answer(client).startswith(b"HTTP/1.1 200")
