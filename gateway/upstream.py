"""The upstream transport: one pooled aiohttp session, timeouts, error translation.

Every aiohttp error that can come from a model server is translated into the
gateway's error tree here, at the one place it enters.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache

import aiohttp
import orjson

from gateway.errors import UpstreamProtocolError, UpstreamStatus, UpstreamTimeout, UpstreamUnreachable
from gateway.policy.model import Model, Timeouts
from gateway.sse import iter_events

PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

#: client headers never sent upstream: hop-by-hop, credentials, and what the gateway sets itself
DROPPED_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-type",
    "authorization", "api-key", "cookie", "accept-encoding", "traceparent", "tracestate",
    "x-request-id", "expect",
})


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One request to one model server."""

    model: Model
    endpoint: str           # chat | completions | embeddings
    body: bytes
    headers: Mapping[str, str]


@dataclass(slots=True)
class UpstreamAnswer:
    """A complete, successful non-streamed answer."""

    status: int
    body: dict
    raw: bytes


def forwarded_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that may travel upstream: no hop-by-hop, no credentials, no x-gateway-*."""
    hop = {h.strip().lower() for h in client_headers.get("connection", "").split(",") if h.strip()}
    return {name: value for name, value in client_headers.items()
            if (low := name.lower()) not in DROPPED_HEADERS and low not in hop
            and not low.startswith("x-gateway-")}


def auth_headers(model: Model, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The backend's own credential, from the environment variable the policy names."""
    if model.api_key_env and (key := environ.get(model.api_key_env)):
        return {"Authorization": f"Bearer {key}"}
    return {}


@cache
def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for a model: connect, first byte (and between chunks), and total."""
    return aiohttp.ClientTimeout(total=timeouts.total_s, sock_connect=timeouts.connect_s,
                                 sock_read=timeouts.first_byte_s)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds from a `Retry-After` header in its delta-seconds form."""
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class HttpTransport:
    """Talks to OpenAI-compatible servers over one keep-alive connection pool."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def _url(self, call: UpstreamCall) -> str:
        return call.model.endpoint.rstrip("/") + PATHS[call.endpoint]

    async def complete(self, call: UpstreamCall) -> UpstreamAnswer:
        """Send a non-streamed request and return its parsed JSON answer."""
        with UpstreamErrors(call.model):
            async with self.session.post(self._url(call), data=call.body, headers=call.headers,
                                         timeout=client_timeout(call.model.timeouts)) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise status_error(call.model, resp.status, raw, resp.headers)
                try:
                    body = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamProtocolError(f"model '{call.model.name}' sent invalid JSON") from exc
                if not isinstance(body, dict):
                    raise UpstreamProtocolError(f"model '{call.model.name}' sent a non-object JSON answer")
                return UpstreamAnswer(resp.status, body, raw)

    @asynccontextmanager
    async def stream(self, call: UpstreamCall) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a streamed request; yields an iterator of raw SSE events.

        Leaving the context closes the upstream connection, which is how a
        client disconnect cancels the upstream generation.
        """
        with UpstreamErrors(call.model):
            async with self.session.post(self._url(call), data=call.body, headers=call.headers,
                                         timeout=client_timeout(call.model.timeouts)) as resp:
                if resp.status >= 400:
                    raise status_error(call.model, resp.status, await resp.read(), resp.headers)
                yield _translated_events(call.model, iter_events(resp.content))


async def _translated_events(model: Model, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    with UpstreamErrors(model):
        async for event in events:
            yield event


def status_error(model: Model, status: int, raw: bytes, headers: Mapping[str, str]) -> UpstreamStatus:
    """The gateway error for an upstream error status, keeping its OpenAI error body."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        body = None
    detail = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = f": {body['error'].get('message', '')}"
    return UpstreamStatus(f"model '{model.name}' answered {status}{detail}", upstream_status=status,
                          body=body if isinstance(body, dict) else None,
                          retry_after_s=retry_after_s(headers))


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
            raise UpstreamUnreachable(f"model '{name}' is unreachable: {exc.os_error}") from exc
        if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientOSError, aiohttp.ClientResponseError)):
            raise UpstreamProtocolError(f"model '{name}' dropped the connection") from exc
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamUnreachable(f"model '{name}' request failed: {exc}") from exc
        return False
