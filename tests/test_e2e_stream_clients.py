"""Streams and clients that read slowly or not at all: a client that takes nothing for `server.client_timeout_s`
is cut (its call would hold the model's slot and the router's count of the model's load for as long as it liked),
and a slow client's time is never the model's: neither `first_byte_s` nor `total_s` counts it.

The gateway here gives clients 1.5 s (`server.client_timeout_s`) and the scripted model `raw` a total_s of 3 s and
a price (so a cache hit saves money).
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from tests.support.harness import Harness, ledgered_raw_model_gateway, raw_model_gateway, reset_raw_model
from tests.support.raw_calls import breaker_failures, ledger_record, post
from tests.support.raw_upstream import SSE_HEAD, chunk, http_head, sse

CLIENT_TIMEOUT_S = 1.5
TOTAL_S = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tail = ("  - name: raw-cached\n    match: {{models: [raw-cached]}}\n    candidates: [raw]\n"
            "    cache: {{enabled: true, ttl_s: 60}}\n"
            f"server: {{{{client_timeout_s: {CLIENT_TIMEOUT_S}}}}}\n")
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1, tail=tail, total_s=TOTAL_S,
                                    raw_keys="    price: {{input_per_mtok: 1, output_per_mtok: 2}}\n") as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


def big_stream(chunks: int, gap_s: float = 0.0) -> list[tuple[bytes, float]]:
    """A stream of `chunks` 8 KB chunks, `gap_s` apart, then its end."""
    payload = "y" * 8000
    usage = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                        "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 1000 * chunks,
                                                 "total_tokens": 8 + 1000 * chunks}}).encode()
    return [(SSE_HEAD + sse(chunk("", role=True)), 0.0)] + [(sse(chunk(payload)), gap_s)] * chunks + \
           [(sse(chunk(None, finish="stop"), usage, b"[DONE]"), 0.0)]


def open_stream(harness: Harness, request_id: str, receive_buffer: int = 4096,
                model: str = "raw-only") -> socket.socket:
    """A client on a small receive buffer that has sent a streamed chat request and read nothing yet."""
    body = json.dumps({"model": model, "stream": True, "temperature": 0,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.socket()
    if receive_buffer:                                  # else the system's, grown as the kernel sees fit
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    client.connect(("127.0.0.1", harness.port))
    client.settimeout(20)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"x-request-id: %s\r\nContent-Length: %d\r\n\r\n" % (request_id.encode(), len(body)) + body)
    return client


def read_to_end(client: socket.socket, pauses: int = 0, pause_s: float = 0.0) -> bytes:
    """What the gateway sends until it closes the connection or ends the chunked body; the first `pauses` reads
    each followed by `pause_s` of reading nothing."""
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        try:
            part = client.recv(1 << 20)
        except ConnectionResetError:
            break
        if not part:
            break
        received += part
        if pauses > 0:
            pauses -= 1
            time.sleep(pause_s)
    return received


def wait_for_the_call_to_end(harness: Harness, within_s: float) -> float:
    """Wait until model `raw` has no call in flight, at most `within_s`; the seconds it took."""
    started_s = time.monotonic()
    while harness.services.fleet.estimates.in_flight("raw") and time.monotonic() - started_s < within_s:
        time.sleep(0.05)
    return time.monotonic() - started_s


def test_a_model_trickling_past_total_s_is_cut_at_total_s(env):
    """A model that sends a chunk every 0.5 s (each within first_byte_s) is cut at total_s with an in-band
    timeout naming it: the gateway's own total_s deadline for streams holds the model's time to it."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True)), 0.0)] + [(sse(chunk(" tick")), 0.5)] * 40
    started_s = time.monotonic()
    body = post(harness).content
    assert TOTAL_S - 0.5 < time.monotonic() - started_s < TOTAL_S + 2
    assert b'"upstream_timeout"' in body and f"took longer than {TOTAL_S} s".encode() in body
    assert breaker_failures(harness, "raw") == 1


def test_total_s_counts_from_the_calls_start_not_from_the_streams_head():
    """total_s bounds the model's whole call: a model whose head comes 3 s in (within its first_byte_s of 4 s)
    and that then trickles chunks is cut at total_s (5 s) from the call's start, not 5 s after its head."""
    with raw_model_gateway(first_byte_s=4, total_s=5) as (harness, raw):
        raw.script = [(SSE_HEAD, 3.0)] + [(sse(chunk(" tick")), 0.5)] * 40
        started_s = time.monotonic()
        body = post(harness).content
        elapsed_s = time.monotonic() - started_s
    assert b'"upstream_timeout"' in body and b"took longer than 5 s" in body
    assert elapsed_s < 5 + 2                            # not 3 + 5


def test_a_total_s_shorter_than_first_byte_s_bounds_the_wait_for_the_first_event():
    """A model given a total_s (1.5 s) shorter than its first_byte_s (5 s) that sends its stream's head and then
    nothing is given up at total_s, a 504 well before first_byte_s: total_s bounds every wait of the call."""
    with raw_model_gateway(first_byte_s=5, total_s=1.5) as (harness, raw):
        raw.script = [(SSE_HEAD, 0.0), (sse(chunk("late")), 10.0)]
        started_s = time.monotonic()
        answer = post(harness)
        elapsed_s = time.monotonic() - started_s
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"
    assert elapsed_s < 1.5 + 2                          # not 5


def test_a_slow_client_past_total_s_does_not_time_the_model_out(env):
    """A client that pauses between reads (each pause under client_timeout_s) makes a stream the model sent at
    once take longer than total_s: the model is not timed out for the client's time, the stream completes.
    It used to end with an in-band timeout at total_s, counted against the model's circuit."""
    harness, raw = env
    raw.script = big_stream(1500)                       # 12 MB, sent as fast as it is taken
    client = open_stream(harness, "slow-reader", receive_buffer=256 * 1024)     # takes about 0.5 MB a read
    started_s = time.monotonic()
    received = read_to_end(client, pauses=20, pause_s=0.2)
    client.close()
    assert time.monotonic() - started_s > TOTAL_S
    assert b'"error"' not in received and received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert breaker_failures(harness, "raw") == 0


def test_a_client_that_stops_reading_is_cut_and_frees_the_model(env):
    """A client that reads the start of a long stream and then nothing is cut after client_timeout_s: the call
    ends (no longer in flight on the model, so its slot and the router's load count are free), the request is
    booked as a client that left (499, its output charged), and the model's circuit counts nothing against it.
    It used to be held until the client read again, however long."""
    harness, raw = env
    raw.script = big_stream(1500)                       # 12 MB: more than the sockets' buffers hold
    client = open_stream(harness, "stops-reading")
    client.recv(4096)
    held_s = wait_for_the_call_to_end(harness, within_s=6)
    assert harness.services.fleet.estimates.in_flight("raw") == 0 and held_s < CLIENT_TIMEOUT_S + 2.5
    read_to_end(client)                                 # what was queued, then the cut: no hang
    client.close()
    record = ledger_record(harness, "stops-reading")
    assert record["status"] == 499 and record["attempts"][0]["error"] == "client_disconnected"
    assert record["output_tokens"] > 0
    assert breaker_failures(harness, "raw") == 0


def test_a_client_cut_for_taking_nothing_finds_its_connection_closed_and_is_booked_as_one_that_left(env):
    """A client cut after client_timeout_s of reading nothing, when it reads again, gets what was queued and then
    a closed connection, never the end of the chunked body (an SDK raises, rather than take the cut answer, with
    no [DONE], for a whole one); the request is booked as a client that left (499, client_disconnected)."""
    harness, raw = env
    words = "word " * 1600                              # 8 KB a chunk, of text quick to count
    raw.script = [(SSE_HEAD + sse(chunk("", role=True)), 0.0)] + [(sse(chunk(words)), 0.0)] * 1500 + \
                 [(sse(chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    client = open_stream(harness, "cut-then-reads")
    client.recv(4096)
    wait_for_the_call_to_end(harness, within_s=20)      # the cut ends it
    received = read_to_end(client)
    client.close()
    assert b"[DONE]" not in received and not received.endswith(b"\r\n0\r\n\r\n")
    record = ledger_record(harness, "cut-then-reads")
    assert (record["status"], record["attempts"][0]["error"]) == (499, "client_disconnected")


def test_a_client_leaving_a_cached_stream_is_booked_as_one_that_left(env, caplog):
    """A client that leaves while a cached stream is replayed to it is booked as one that left (499,
    client_disconnected), with no saving for the answer it did not get; it used to be an ERROR with a traceback,
    booked 200 with the exception's class name as its outcome."""
    harness, raw = env
    raw.script = big_stream(480)                        # 3.8 MB: stored (it compresses to little), long to replay
    first = open_stream(harness, "stores-it", receive_buffer=1 << 20, model="raw-cached")
    assert read_to_end(first).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    first.close()
    assert ledger_record(harness, "stores-it")["cache"] == "stored"
    client = open_stream(harness, "leaves-a-hit", model="raw-cached")
    client.recv(4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()                                      # a reset, mid-replay
    record = ledger_record(harness, "leaves-a-hit")
    assert (record["cache"], record["status"], record["outcome"], record["saved_usd"]) == \
        ("hit", 499, "client_disconnected", "0")
    assert not [r for r in caplog.records if r.levelname == "ERROR" and "leaves-a-hit" in r.getMessage()]


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_a_client_leaving_a_cached_stream_while_it_waits_saves_nothing(env, close):
    """A client that takes the start of a cached stream and leaves while the replay waits for it to read (the
    server cancels the handler then, rather than a write failing): 499, and no saving, as when a write fails.
    It was booked the whole saving of an answer it never got."""
    harness, raw = env
    raw.script = big_stream(480)
    first = open_stream(harness, f"stores-{close}", receive_buffer=1 << 20, model="raw-cached")
    assert read_to_end(first).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    first.close()
    client = open_stream(harness, f"waits-then-leaves-{close}", model="raw-cached")
    client.recv(4096)
    time.sleep(0.5)                                     # the replay is blocked on the full socket meanwhile
    if close == "rst":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    record = ledger_record(harness, f"waits-then-leaves-{close}")
    assert (record["cache"], record["status"], record["saved_usd"]) == ("hit", 499, "0")


def test_a_client_reading_steadily_but_slowly_is_not_cut(env):
    """An SDK client that takes a chunk every 30 ms (270 KB/s), never pausing, for 5 s (over 3 times
    client_timeout_s), then the rest at once, gets the whole stream: a single write may wait on it longer than
    client_timeout_s (the sockets' buffers grow to megabytes, and the kernel says a full socket is writable again
    only once a good part of its buffer is free), but the client takes some of the stream all along, so it is
    not stalled. It was cut after a few seconds (the SDK raised APIConnectionError) and booked as a client that
    left."""
    harness, raw = env
    raw.script = big_stream(1000)                       # 8 MB: more than the sockets hold
    response = harness.openai().chat.completions.with_raw_response.create(
        model="raw-only", stream=True, messages=[{"role": "user", "content": "hi"}])
    chunks = 0
    started_s = time.monotonic()
    for chunk_ in response.parse():
        chunks += 1
        if time.monotonic() - started_s < 5:
            time.sleep(0.03)
    assert chunks == 1002
    record = ledger_record(harness, response.headers["x-request-id"])
    assert (record["status"], record["outcome"]) == (200, "success")


def test_an_error_body_that_trickles_is_cut_at_total_s(env):
    """A model that answers a stream with a 500 whose body comes a byte every 0.5 s (each within first_byte_s):
    a 504 at total_s, as a whole answer's would be; it was held as long as the body came, the model's call slot
    with it."""
    harness, raw = env
    raw.script = [(http_head(500, {"Content-Type": "application/json"}, length=200), 0.0)] + [(b" ", 0.5)] * 200
    started_s = time.monotonic()
    answer = post(harness)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started_s < TOTAL_S + 1.5
