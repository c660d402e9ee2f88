"""The upstream transport: one pooled aiohttp session, timeouts, error translation.

Every aiohttp error that can come from a model server is translated into the
gateway's error tree here, at the one place it enters.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import cache

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from gateway.errors import (UPSTREAM_AUTH_STATUSES, UpstreamProtocolError, UpstreamStatus, UpstreamTimeout,
                            UpstreamUnreachable)
from gateway.policy.model import Model, Timeouts
from gateway.sse import EventTooLong, iter_events

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
         "responses": "/responses"}

#: client headers never sent upstream: hop-by-hop, credentials, and what the gateway sets itself
DROPPED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-type",
    "authorization", "api-key", "cookie", "accept-encoding", "traceparent", "tracestate",
    "x-request-id", "expect",
    # credentials too: the gateway's admin token, and the key header of Anthropic-style clients (meant for this
    # gateway or another, never for the model server, which the model's own key authorises)
    "x-admin-token", "x-api-key",
    # scoped to the client's credential, which the model's own replaces: a provider refuses a key for another org
    "openai-organization", "openai-project",
    # the body is re-serialised plain JSON (aiohttp decoded the client's), so its encoding headers do not hold
    "content-encoding", "content-md5", "digest",
})
#: the longest Retry-After believed from a model server: a circuit is never opened for longer
MAX_RETRY_AFTER_S = 3600.0
#: the largest body of a model's answer read into memory (a non-streamed answer, an error body), by default
#: (`server.max_answer_bytes`): past it the answer is broken, and no more of it is read
MAX_ANSWER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request to one model server."""

    model: Model
    endpoint: str           # chat | completions | embeddings | responses
    body: bytes
    headers: Mapping[str, str]
    max_answer_bytes: int = MAX_ANSWER_BYTES


@dataclass(slots=True)
class UpstreamAnswer:
    """A complete, successful non-streamed answer."""

    status: int
    body: dict
    raw: bytes


def forwarded_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that may travel upstream: no hop-by-hop, no credentials, no x-gateway-*."""
    connection = client_headers.get("connection")       # most clients send none: no set of hop names to build
    hop = {h.strip().lower() for h in connection.split(",") if h.strip()} if connection else ()
    return {name: value for name, value in client_headers.items()
            if (low := name.lower()) not in DROPPED_HEADERS and low not in hop
            and not low.startswith("x-gateway-")}


#: the W3C trace context headers, never forwarded with the client's others (`DROPPED_HEADERS`)
TRACE_CONTEXT = ("traceparent", "tracestate")


def caller_trace_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The caller's own trace context, passed on as it came: for a call of which telemetry (when off) makes no
    span of its own to be the model server's parent."""
    return {name: value for name in TRACE_CONTEXT if (value := client_headers.get(name))}


def auth_headers(model: Model, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The backend's own credential, from the environment variable the policy names."""
    if model.api_key_env and (key := environ.get(model.api_key_env)):
        return {"Authorization": f"Bearer {key}"}
    return {}


@cache
def client_timeout(timeouts: Timeouts, stream: bool = True) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for a model: connect; on a non-streamed answer `total_s`. That answer sends its head only
    once the whole answer is generated, so its head is waited for up to `total_s` (`first_byte_s` would cut every
    answer longer); its body, once the head came, gets `first_byte_s` (`HttpTransport.complete`). A stream's
    head is waited for `first_byte_s` by `HttpTransport.stream`, and its events by the relay's own deadlines
    (for data events and for `total_s`, which count the model's time and not a slow client's). No `sock_read`:
    aiohttp 3.14 arms that timer again on a connection already back in the pool, when the rest of a large
    streamed body is read, and the next call to take the connection fails at once with a read timeout
    (aio-libs/aiohttp#12953)."""
    return aiohttp.ClientTimeout(total=None if stream else timeouts.total_s, sock_connect=timeouts.connect_s)


@cache
def upstream_url(base_url: str, endpoint: str) -> URL:
    """A model's URL for an endpoint, parsed once: aiohttp takes a URL as it is, where it parses a string on
    every call (about 7 µs of a bare call's CPU; `python -m bench.client_call`). The endpoint's path goes before
    a query the base URL has (Azure's `?api-version=...`); a fragment means nothing to a server and is left out."""
    base, _, query = base_url.partition("#")[0].partition("?")
    return URL(base.rstrip("/") + PATHS[endpoint] + (f"?{query}" if query else ""))


def stored_response_url(model: Model, response_id: str, suffix: str = "",
                        client_query: Iterable[tuple[str, str]] = ()) -> URL:
    """The URL of a call on a response its model's server stored (`suffix`: `/input_items`, `/cancel`): the
    model's own query (Azure's `api-version`) first, then the client's (`limit`, `order`, `include[]`...)."""
    base = upstream_url(model.endpoint, "responses")
    query = [*base.query.items(), *((key, value) for key, value in client_query if key not in base.query)]
    return base.with_path(f"{base.path}/{response_id}{suffix}").with_query(query)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from a `retry-after-ms` header (OpenAI's, which its SDKs read first), else from `Retry-After`, as
    delta-seconds or an HTTP date, at most MAX_RETRY_AFTER_S; None when absent or unreadable (`inf`, `nan`,
    garbage)."""
    seconds = _milliseconds_s(headers.get("retry-after-ms"))
    if seconds is None:
        seconds = _retry_after_value_s(headers.get("Retry-After"))
    return None if seconds is None else min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _milliseconds_s(value: str | None) -> float | None:
    """A `retry-after-ms` value in seconds; None when absent or not a finite number."""
    try:
        seconds = float(value) / 1000 if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


def _retry_after_value_s(value: str | None) -> float | None:
    """A `Retry-After` value (delta-seconds or an HTTP date) in seconds; None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) else None


#: whether the connection the current task's latest upstream send took was kept alive in the pool (PoolConnector)
_REUSED: ContextVar[bool] = ContextVar("upstream_connection_reused", default=False)
#: a reused connection that drops within this of the send was closed by the model server as it was taken (an idle
#: close crossing the request: its FIN or RST comes back within a round trip); one that drops later was holding
#: the request, which the model read and may have worked on: it is not sent again
REUSED_DROP_S = 0.1


class PoolConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, telling `HttpTransport` whether a send went out on a connection kept alive in the
    pool, which the model server may close at that very moment (a server closes idle connections on its own clock:
    uvicorn's is 5 s): only such a send, dropped before any answer, is sent again. (An aiohttp trace hook says
    the same, at about 30 µs a call: every trace signal of the call is then built.)"""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._handed: weakref.WeakSet = weakref.WeakSet()      # the connections' protocols handed out before

    async def connect(self, req, traces, timeout) -> aiohttp.connector.Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        _REUSED.set(protocol in self._handed)
        self._handed.add(protocol)
        return connection


class HttpTransport:
    """Talks to OpenAI-compatible servers over one keep-alive connection pool."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    @staticmethod
    def _url(call: UpstreamCall) -> URL:
        return upstream_url(call.model.endpoint, call.endpoint)

    async def _send(self, call: UpstreamCall, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """POST the call and return its response once its head came. A kept-alive connection the model server
        closed as it was taken from the pool fails before any answer: the model never saw the request, so it is
        sent once more, on another connection (RFC 9112 9.3.1; aiohttp does so itself only for idempotent methods,
        and nginx for its cached connections). A connection opened for the call that drops is not sent again, nor
        a reused one that drops later than REUSED_DROP_S (a prompt that brings the server down is not sent twice).
        A redirect is not followed: the prompt goes to the model's endpoint and nowhere else, and a 3xx is a broken
        answer."""
        _REUSED.set(False)          # a session without PoolConnector (tests, the bench) never sends again
        sent_s = time.monotonic()
        try:
            return await self.session.post(self._url(call), data=call.body, headers=call.headers, timeout=timeout,
                                           allow_redirects=False)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not _REUSED.get() or isinstance(exc, aiohttp.ClientConnectorError) or \
                    time.monotonic() - sent_s > REUSED_DROP_S:
                raise
        return await self.session.post(self._url(call), data=call.body, headers=call.headers, timeout=timeout,
                                       allow_redirects=False)

    async def complete(self, call: UpstreamCall) -> UpstreamAnswer:
        """Send a non-streamed request and return its parsed JSON answer."""
        with UpstreamErrors(call.model):
            async with await self._send(call, client_timeout(call.model.timeouts, stream=False)) as resp:
                # the body most often came with the head; the rest must come within first_byte_s of it
                raw = await _read_within(resp, call.model.timeouts.first_byte_s, call)
                if resp.status >= 400:
                    raise status_error(call.model, resp.status, raw, resp.headers)
                not_an_answer(call.model, resp.status)
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamProtocolError(f"model '{call.model.name}' sent invalid JSON") from exc
                if not isinstance(body, dict):
                    raise UpstreamProtocolError(f"model '{call.model.name}' sent a non-object JSON answer")
                if (error := body.get("error")) and "choices" not in body and "data" not in body:
                    # an error reported with status 200 (some servers do): a failure, as it is in a stream
                    raise UpstreamProtocolError(f"model '{call.model.name}' answered 200 with an error: "
                                                f"{error_message(error)}")
                return UpstreamAnswer(200, body, raw)      # any 2xx is the answer: the client gets OpenAI's 200

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a streamed request; yields an iterator of raw SSE events.

        Leaving the context closes the upstream connection, which is how a
        client disconnect cancels the upstream generation.
        """
        async with self._events(call, self._send(call, client_timeout(call.model.timeouts))) as events:
            yield events

    @asynccontextmanager
    async def ask_stream(self, model: Model, url: URL, headers: Mapping[str, str]
                         ) -> AsyncIterator[AsyncIterator[bytes]]:
        """A call that generates nothing and is answered with a stream (a background response read on, `GET
        /v1/responses/{id}?stream=true`), sent once: yields an iterator of its raw SSE events; an error status
        raises as any call's does, a 404 too; an answer that is no event stream (a server ignoring `stream`) is a
        broken one."""
        call = UpstreamCall(model, "responses", b"", headers)
        opening = self.session.get(url, headers=headers, allow_redirects=False, timeout=client_timeout(model.timeouts))
        async with self._events(call, opening, events_only=True) as events:
            yield events

    @asynccontextmanager
    async def _events(self, call: UpstreamCall, opening: Awaitable[aiohttp.ClientResponse], events_only: bool = False
                      ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The events of a stream `opening` starts: its head within the model's `first_byte_s`, an error status
        raised with its body (within `first_byte_s` a part, and `total_s` in all); `events_only`: an answer of
        another content type than `text/event-stream` is a broken one."""
        first_byte_s = call.model.timeouts.first_byte_s
        async with AsyncExitStack() as stack:
            with UpstreamErrors(call.model):
                async with asyncio.timeout(first_byte_s):
                    resp = await stack.enter_async_context(await opening)
                if resp.status >= 400:      # its body within first_byte_s a part, and total_s in all
                    async with asyncio.timeout(call.model.timeouts.total_s):
                        raw = await _read_within(resp, first_byte_s, call)
                    raise status_error(call.model, resp.status, raw, resp.headers)
                not_an_answer(call.model, resp.status)
                if events_only and resp.content_type != "text/event-stream":
                    raise UpstreamProtocolError(f"model '{call.model.name}' answered {resp.content_type or 'a body'}"
                                                f", not a stream of events")
            # outside the translation: what the caller's block raises (a write to a client that left, say)
            # is the caller's own error, not the model's
            yield _translated_events(call.model, iter_events(resp.content.iter_any()))


    async def ask(self, model: Model, method: str, url: URL, headers: Mapping[str, str],
                  max_answer_bytes: int = MAX_ANSWER_BYTES) -> tuple[int, bytes]:
        """A call that generates nothing (a stored response's retrieval, say), sent once: (its status, its body)
        for a 2xx whose body is a JSON object, a 204 (no body), or a 404; other error statuses raise as any call's
        do, and a body that is no JSON object is a broken answer."""
        call = UpstreamCall(model, "responses", b"", headers, max_answer_bytes)
        with UpstreamErrors(model):
            async with self.session.request(method, url, headers=headers, allow_redirects=False,
                                            timeout=client_timeout(model.timeouts, stream=False)) as resp:
                raw = await _read_within(resp, model.timeouts.first_byte_s, call)
                if resp.status in (204, 404):
                    return resp.status, raw
                if resp.status >= 400:
                    raise status_error(model, resp.status, raw, resp.headers)
                not_an_answer(model, resp.status)
        try:
            if isinstance(orjson.loads(raw), dict):
                return resp.status, raw
        except orjson.JSONDecodeError:
            pass
        raise UpstreamProtocolError(f"model '{model.name}' sent an answer that is not a JSON object")


async def _read_within(resp: aiohttp.ClientResponse, wait_s: float, call: UpstreamCall) -> bytes:
    """A non-streamed answer's body, each part within `wait_s` of the one before (a body that stops half-way is
    a timeout, as a stream that goes silent is; one that keeps coming is not), at most `call.max_answer_bytes`:
    a larger one (declared, or read so far) is a broken answer, and no more of it is read."""
    limit = call.max_answer_bytes
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(call.model, limit)
    if resp.content.is_eof():               # the body most often came with the head: it may still be too large
        raw = await resp.read()             # (chunked, with no Content-Length to refuse early; or compressed)
        if len(raw) > limit:
            raise too_large(call.model, limit)
        return raw
    loop = asyncio.get_running_loop()
    parts = []
    size = 0
    async with asyncio.timeout(wait_s) as deadline:
        async for part in resp.content.iter_any():
            size += len(part)
            if size > limit:
                raise too_large(call.model, limit)
            parts.append(part)
            deadline.reschedule(loop.time() + wait_s)
    return b"".join(parts)


def too_large(model: Model, limit: int) -> UpstreamProtocolError:
    """The error for an answer larger than the gateway reads (`server.max_answer_bytes`)."""
    return UpstreamProtocolError(f"model '{model.name}' sent an answer larger than {limit} bytes "
                                 f"(server.max_answer_bytes)")


async def _translated_events(model: Model, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    with UpstreamErrors(model):
        async for event in events:
            yield event


def not_an_answer(model: Model, status: int) -> None:
    """A status under 400 that is no success (a 1xx or 3xx aiohttp did not resolve, 0) carries no answer a client
    could read: the model's answer is broken (its body is never relayed, its status never given the client)."""
    if not 200 <= status < 300:
        raise UpstreamProtocolError(f"model '{model.name}' answered HTTP {status}, not an answer")


def status_error(model: Model, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamStatus:
    """The gateway error for an upstream error status, keeping its OpenAI error body."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    detail = ""
    if status in UPSTREAM_AUTH_STATUSES:     # the gateway's own credential: the client is told no more than this
        return UpstreamStatus(f"model '{model.name}' refused the gateway's credentials (HTTP {status}); check its "
                              f"api_key_env", upstream_status=status)
    body = _as_openai_error(body)
    if isinstance(body, dict) and (error := body.get("error")):
        detail = f": {error_message(error)}"
    return UpstreamStatus(f"model '{model.name}' answered {status}{detail}", upstream_status=status,
                          body=body if isinstance(body, dict) else None,
                          retry_after_s=retry_after_s(headers),
                          final=headers.get("x-should-retry", "").strip().lower() == "false")


def _as_openai_error(body: object) -> object:
    """An error body in OpenAI's shape, `{"error": {...}}`, from the shapes model servers wrap it in: vLLM's own
    (before 0.10: the error object is the body), Gemini's (a list of one such body) and FastAPI's (`{"detail":
    ...}`, a text or a list of validation errors); any other body as it is."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict) and "error" in body[0]:
        return body[0]
    if not isinstance(body, dict) or "error" in body:
        return body
    if body.get("object") == "error":
        return {"error": body}
    detail = body.get("detail")
    if isinstance(detail, str) and detail:
        return {"error": {"message": detail}}
    if isinstance(detail, (list, dict)) and detail:
        return {"error": {"message": orjson.dumps(detail).decode()}}
    return body


#: the most of a model server's error message passed on to the client
MAX_ERROR_MESSAGE_CHARS = 1000
#: how a Python stack trace opens (what a model server's unhandled exception may send as its message)
TRACEBACK_OPENING = "Traceback (most recent call last)"


def error_message(error: object) -> str:
    """The message of an error a model server reported: an OpenAI error object's, or the error itself when it is
    a string (TGI's shape); of a stack trace only its last line (the exception: the trace's files and code are the
    server's own), and at most MAX_ERROR_MESSAGE_CHARS of it."""
    if isinstance(error, dict):
        error = error.get("message", "")
    if not isinstance(error, str):
        return ""
    if TRACEBACK_OPENING in error:
        error = next((line.strip() for line in reversed(error.splitlines())
                      if line.strip() and TRACEBACK_OPENING not in line), "")
    return error if len(error) <= MAX_ERROR_MESSAGE_CHARS else error[:MAX_ERROR_MESSAGE_CHARS] + "…"


class UpstreamErrors:
    """Turns aiohttp and timeout errors into the gateway's upstream errors."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, (UpstreamStatus, UpstreamProtocolError, GeneratorExit)):
            return False
        name = self.model.name
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            raise UpstreamTimeout(f"model '{name}' timed out") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamUnreachable(f"model '{name}' is unreachable: {connect_failure(exc.os_error)}") from exc
        if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientOSError, aiohttp.ClientResponseError)):
            raise UpstreamProtocolError(f"model '{name}' dropped the connection") from exc
        if isinstance(exc, EventTooLong):
            raise UpstreamProtocolError(f"model '{name}' sent a malformed stream: {exc}") from exc
        if isinstance(exc, HttpProcessingError):    # aiohttp's parser refused what the model sent
            raise UpstreamProtocolError(f"model '{name}' sent a malformed answer") from exc
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamUnreachable(f"model '{name}' request failed ({type(exc).__name__})") from exc
        return False


def connect_failure(error: OSError) -> str:
    """Why a connection to a model failed, in words a tenant may read: the system's reason, never the model
    server's address (the OS error's own text names it)."""
    if isinstance(error, socket.gaierror):
        return "its host name does not resolve"
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno).lower()
    return type(error).__name__
