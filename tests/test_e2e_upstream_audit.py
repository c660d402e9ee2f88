"""An SRE's audit of the upstream call against model servers that misbehave as real ones do: what the client
gets, whether fallback happens, and what the circuit breaker and the ledger learn.

`KeepAliveRaw` is a raw-TCP model server that keeps its connections alive (RawUpstream closes each one), so a
test can make it close an idle pooled connection just as the gateway reuses it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest

from tests.support.harness import raw_model_gateway, reset_raw_model
from tests.support.raw_calls import breaker_failures, post
from tests.support.raw_upstream import (COMPLETION, TEXT_EVENTS, RawUpstream, http_head, json_answer, read_request,
                                       sse)


class KeepAliveRaw(RawUpstream):
    """A keep-alive HTTP/1.1 model server on 127.0.0.1 (RawUpstream closes each connection): answers every
    request on a connection with a completion (or a stream), or, with `drop_reused`, closes a connection on reading
    its second request (what a server closing an idle connection at that moment looks like); `reset` makes that
    close an RST."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_reused = False
        self.reset = False
        self.stream = False
        self.connections = 0
        self.read_requests = 0
        self.answered = 0
        self.dropped = 0

    def _answer(self) -> bytes:
        if self.stream:
            body = sse(*TEXT_EVENTS)
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
                    % len(body)) + body
        body = json.dumps(COMPLETION).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body)) + body

    async def _drops_reused(self, writer: asyncio.StreamWriter) -> bool:
        """Whether a connection's second (or later) request, read, ends the connection unanswered: with
        `drop_reused`, at once (an RST with `reset`)."""
        if not self.drop_reused:
            return False
        self.dropped += 1
        if self.reset:
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                await read_request(reader)
                self.read_requests += 1
                if served and await self._drops_reused(writer):
                    return
                writer.write(self._answer())
                await writer.drain()
                served += 1
                self.answered += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def keepalive_gateway():
    with raw_model_gateway(first_byte_s=1, raw=KeepAliveRaw()) as (harness, raw):
        yield harness, raw


@pytest.fixture
def keepalive(keepalive_gateway):
    harness, raw = keepalive_gateway
    raw.drop_reused = raw.reset = raw.stream = False
    raw.dropped = 0
    harness.services.fleet.breakers._circuits.clear()
    return harness, raw


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_pooled_connection_the_model_closed_as_it_was_reused_is_retried_on_a_fresh_one(keepalive, stream, reset):
    """A model server that closes an idle keep-alive connection just as the gateway reuses it (uvicorn, which
    vLLM runs on, closes them after 5 s; the gateway keeps them 60 s) never saw the request: the gateway sends it
    again on a new connection, and the client gets the model's answer: no 502, no fallback to another model, and
    no failure counted against the model's circuit."""
    harness, raw = keepalive
    raw.stream = stream
    assert post(harness, model="raw-only", stream=stream).status_code == 200      # a connection now in the pool
    raw.drop_reused, raw.reset = True, reset
    reply = post(harness, model="raw", stream=stream)
    assert raw.dropped == 1                         # the race happened, once
    assert reply.status_code == 200, reply.text[:300]
    assert reply.headers["x-gateway-model"] == "raw", reply.headers.get("x-gateway-fallback-reason")
    assert reply.headers["x-gateway-fallback"] == "none"
    assert breaker_failures(harness, "raw") == 0


# redirects --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from tests.support.harness import ledgered_raw_model_gateway
    elsewhere = RawUpstream().start()
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1) as (harness, raw):
        yield harness, raw, elsewhere
    elsewhere.stop()


@pytest.mark.parametrize("status", [301, 307])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_model_server_redirecting_is_a_broken_answer_and_the_prompt_goes_nowhere_else(scripted, status, stream):
    """A model server that answers a redirect (an ingress sending http to https, a moved deployment, a server
    that was taken over) gets no second request: the prompt is never re-sent to the host the Location names (nor
    turned into a GET there, as aiohttp does on a 301 or 302), the client gets a 502 `upstream_bad_response` as
    the README says of a 3xx, and the route's fallback answers instead."""
    harness, raw, elsewhere = scripted
    reset_raw_model(harness, raw)
    elsewhere.requests.clear()
    elsewhere.script = json_answer({**COMPLETION, "model": "someone-else"})
    raw.script = [(http_head(status, {"Location": elsewhere.url + "/chat/completions"}, 0), 0.0)]
    reply = post(harness, model="raw-only", stream=stream)
    assert elsewhere.requests == []
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_bad_response"
    reply = post(harness, model="raw", stream=stream)
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert elsewhere.requests == []
