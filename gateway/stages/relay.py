"""Relaying an upstream SSE stream to the client chunk by chunk, never buffered whole.

The client's response is prepared only when the first upstream event arrives,
so a model that fails before that can still be replaced by the next one.
After the first byte, a failure can only be reported in-band: an SSE error
event, then the end of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from aiohttp import web

from gateway.context import CLIENT_DISCONNECTED, Attempt, RequestContext
from gateway.errors import UpstreamError, UpstreamProtocolError
from gateway.sse import DONE, encode_event, error_event, event_data
from gateway.stages.answers import read_identity
from gateway.responses import response_headers
from gateway.tokens import usage_from_response
from gateway.upstream import UpstreamCall

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class StreamState:
    """What the relay learned from the events it passed on."""

    __slots__ = ("chunks", "texts", "finish_reasons", "done", "collect", "chunk_gaps_s", "_last_chunk_s")

    def __init__(self, collect: bool) -> None:
        self.chunks: list[dict] = []
        self.texts: list[str] = []
        self.finish_reasons: list[str] = []
        self.done = False
        self.collect = collect
        self.chunk_gaps_s: list[float] = []         # between consecutive chunks: time per output chunk
        self._last_chunk_s: float | None = None

    def absorb(self, chunk: dict) -> None:
        """Keep the text, finish reasons and chunk timing (and the chunk, when the cache wants it)."""
        now_s = time.perf_counter()
        if self._last_chunk_s is not None:
            self.chunk_gaps_s.append(now_s - self._last_chunk_s)
        self._last_chunk_s = now_s
        if self.collect:
            self.chunks.append(chunk)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str) and text:
                self.texts.append(text)
            if reason := choice.get("finish_reason"):
                self.finish_reasons.append(reason)


def _parse_chunk(model_name: str, data: bytes) -> dict:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"model '{model_name}' sent an invalid stream event") from exc
    if not isinstance(chunk, dict):
        raise UpstreamProtocolError(f"model '{model_name}' sent a non-object stream event")
    if isinstance(chunk.get("error"), dict):
        raise UpstreamProtocolError(f"model '{model_name}' reported an error mid-stream: "
                                    f"{chunk['error'].get('message', '')}")
    return chunk


async def _open_client_stream(ctx: RequestContext, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    ctx.response = response
    await response.prepare(ctx.http)
    ctx.bytes_sent = True
    return response


async def relay_stream(ctx: RequestContext, attempt: Attempt, transport, call: UpstreamCall,
                       on_first_event: Callable[[RequestContext, Attempt], None],
                       energy=None) -> web.StreamResponse:
    """Relay one upstream stream; returns the client's response once the stream has ended."""
    state = StreamState(collect=ctx.cache_key is not None)
    response: web.StreamResponse | None = None
    try:
        async with transport.stream(call) as events:
            async for event in events:
                data = event_data(event)
                if data is None:
                    continue
                if data == b"[DONE]":
                    state.done = True
                    break
                chunk = _parse_chunk(attempt.model.name, data)
                usage = usage_from_response(chunk)
                if response is None:
                    attempt.ttft_s = time.perf_counter() - attempt.started_s
                    read_identity(attempt, chunk)
                    on_first_event(ctx, attempt)
                    response = await _open_client_stream(ctx, response_headers(ctx))
                state.absorb(chunk)
                if attempt.energy_id is not None:
                    energy.progress(attempt.energy_id, ctx.prompt_tokens + len(state.texts))
                if usage is not None:
                    attempt.usage = usage
                if not ctx.include_usage and "usage" in chunk:
                    if not chunk.get("choices"):
                        continue            # the client did not ask for the usage chunk
                    event = encode_event({k: v for k, v in chunk.items() if k != "usage"})
                await response.write(event)
            if not state.done:
                raise UpstreamProtocolError(f"model '{attempt.model.name}' ended the stream early")
    except ConnectionError:
        ctx.status = 499                    # the client went away; leaving `stream` closes upstream
        attempt.error_type = CLIENT_DISCONNECTED     # a call cut short: not a latency sample like the others
        _recorded(ctx, attempt, state, response)
        return response or web.Response(status=499)
    except UpstreamError as exc:
        if response is None:
            raise
        await _end_with_error(response, exc)
        _recorded(ctx, attempt, state, response)
        raise
    if response is None:                    # an empty stream: [DONE] and nothing else
        on_first_event(ctx, attempt)
        response = await _open_client_stream(ctx, response_headers(ctx))
    await response.write(DONE)
    await response.write_eof()
    attempt.status = 200
    return _recorded(ctx, attempt, state, response)


async def _end_with_error(response: web.StreamResponse, exc: UpstreamError) -> None:
    try:
        await response.write(error_event(exc.message, error_type=exc.error_type, code=exc.code))
        await response.write_eof()
    except ConnectionError:
        pass


def _recorded(ctx: RequestContext, attempt: Attempt, state: StreamState,
              response: web.StreamResponse | None) -> web.StreamResponse:
    attempt.finish_reasons = tuple(state.finish_reasons)
    ctx.stream_record = state
    return response
