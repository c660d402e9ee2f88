"""Sending an answer: a paced SSE stream, a delayed JSON body, or one of the injected failures."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import GatewayError, RateLimited
from gateway.simulator.answers import StreamScript
from gateway.simulator.plan import Plan
from gateway.simulator.state import SimState

OUTCOME = web.RequestKey("sim_outcome", str)
#: how often a hanging request checks whether its client went away
HANG_POLL_S = 0.05
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE_EVENT = b"data: [DONE]\n\n"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response serialized with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, headers=headers,
                        content_type="application/json")


def raise_fault(fault: str | None, retry_after_s: float) -> None:
    """Raise the injected 429 or 500, if that is what was drawn."""
    if fault == "rate_limit":
        headers = {"Retry-After": str(math.ceil(retry_after_s)), "retry-after-ms": str(round(retry_after_s * 1000))}
        raise RateLimited("Rate limit reached for requests (simulated). Please try again later.",
                          headers=headers)
    if fault == "error":
        raise GatewayError("The server had an error while processing your request (simulated).")


async def hang(request: web.Request, state: SimState) -> web.StreamResponse:
    """Never answer: wait until the client goes away or the simulator shuts down."""
    request[OUTCOME] = "hang"
    while not _client_gone(request):
        try:
            await asyncio.wait_for(state.closing.wait(), HANG_POLL_S)
        except TimeoutError:
            continue
        _close_connection(request)
    return web.Response()       # never reaches a client: the connection is gone


async def send_body(request: web.Request, body: dict[str, Any], plan: Plan) -> web.StreamResponse:
    """The JSON answer after TTFT + (n - 1) x TPOT; a drop sends half of it and closes the connection."""
    if plan.total_s > 0:
        await asyncio.sleep(plan.total_s)
    data = orjson.dumps(body)
    if plan.fault != "drop":
        request[OUTCOME] = "ok"
        return web.Response(body=data, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(data)
    try:
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
    except ConnectionResetError:
        return response
    request[OUTCOME] = "drop"
    _close_connection(request)
    return response


async def send_stream(request: web.Request, script: StreamScript, plan: Plan) -> web.StreamResponse:
    """SSE chunks, each written when its token is due, then `[DONE]` unless the events are named (the Responses
    API sends none); a drop stops early, without the end."""
    chunks = script.chunks[: script.drop_after] if plan.fault == "drop" else script.chunks
    response = web.StreamResponse(headers=SSE_HEADERS)
    loop = asyncio.get_running_loop()
    first_token_at = loop.time() + plan.ttft_s
    try:
        await response.prepare(request)
        for at_token, chunk in chunks:
            delay_s = first_token_at + at_token * plan.tpot_s - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            await response.write(sse_event(chunk, script.named_events))
        if plan.fault == "drop":
            request[OUTCOME] = "drop"
            _close_connection(request)
            return response
        if not script.named_events:
            await response.write(DONE_EVENT)
    except ConnectionResetError:
        return response         # the client went away; counted as cancelled
    request[OUTCOME] = "ok"
    return response


async def send_events(request: web.Request, events: AsyncGenerator[dict[str, Any], None],
                      drop_after: int | None = None) -> web.StreamResponse:
    """Named SSE events (the Responses API's) as `events` yields them, until it ends; a drop cuts the stream once
    `drop_after` of them are sent."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    sent = 0
    try:
        await response.prepare(request)
        async with aclosing(events):
            async for event in events:
                await response.write(sse_event(event, named=True))
                sent += 1
                if sent == drop_after:
                    request[OUTCOME] = "drop"
                    _close_connection(request)
                    return response
    except ConnectionResetError:
        return response         # the client went away; counted as cancelled
    request[OUTCOME] = "ok"
    return response


def sse_event(chunk: dict[str, Any], named: bool) -> bytes:
    """One server-sent event carrying `chunk` as JSON, preceded by `event: <its type>` when named."""
    data = b"data: " + orjson.dumps(chunk) + b"\n\n"
    return b"event: " + chunk["type"].encode() + b"\n" + data if named else data


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _close_connection(request: web.Request) -> None:
    """Cut the connection after flushing what was written, so the client sees a truncated answer."""
    if request.transport is not None:
        request.transport.close()
