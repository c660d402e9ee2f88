"""The Responses API's stored responses, on the server that stored them: retrieve, delete, input items, cancel.

A model server keeps each response it answered with `store` (true unless the request says false) under the
response's id, and answers `GET /v1/responses/{id}` (and `/input_items`), `DELETE /v1/responses/{id}` and
`POST /v1/responses/{id}/cancel` for it. Only that server has it: the gateway sends each such call to the model
its pin names (`gateway.routing.pins`, noted when the gateway relayed the response), with the model's own key.

Every tenant's calls reach a server with the gateway's one key, and the server would show or delete anyone's
stored response for whoever names its id: a caller reaches only the responses the gateway relayed to its tenant
(open, without tenants: relayed at all). Any other id is not found (404, OpenAI's words), the server never asked.
A deleted response, or one its server no longer has (its 404 naming the response), is forgotten; a 404 that does
not name it is a server serving no such call, the gateway's set-up (502 `upstream_not_found`), and forgets
nothing. These calls generate nothing: no route, SLA, limit, budget, cache, metric or ledger line applies, and a
model's circuit is not charged for them; each has its spans (`PlainCall`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import orjson
from aiohttp import web
from yarl import URL

from gateway.background import END_EVENTS
from gateway.errors import (NotFound, StoreUnavailable, UpstreamError, UpstreamProtocolError, UpstreamStatus,
                             UpstreamTimeout)
from gateway.outcomes import ANONYMOUS
from gateway.plain_calls import REQUEST_ID, SPANS, STREAM, caller, traced
from gateway.policy.model import Model
from gateway.services import SERVICES, Services
from gateway.sse import error_event, event_data
from gateway.stages.relay import SSE_HEADERS, ClientStalled, event_type, response_of
from gateway.store_guard import STORE_DOWN
from gateway.upstream import (auth_headers, caller_trace_headers, forwarded_headers, status_error,
                              stored_response_url)

log = logging.getLogger("gateway")

#: what a response id the gateway relayed looks like (OpenAI's `resp_` and 48 hex digits; vLLM's `resp_` and 32):
#: any other is unknown without asking the store
_RESPONSE_ID = re.compile(r"[A-Za-z0-9._:-]{1,256}")
#: the calls, by what follows the response's id in their path
ACTIONS = {"retrieve": ("GET", ""), "delete": ("DELETE", ""), "input_items": ("GET", "/input_items"),
           "cancel": ("POST", "/cancel")}


def stored_response_handler(action: str):
    """The handler of one call on a stored response (`ACTIONS`)."""
    method, suffix = ACTIONS[action]

    async def handle(request: web.Request) -> web.Response:
        services: Services = request.app[SERVICES]
        spans, rid = request[SPANS], request[REQUEST_ID]
        runtime = services.holder.current
        tenant = caller(request)
        tenant_name = tenant.name if tenant else ANONYMOUS        # as the request that stored it named it
        response_id = request.match_info["response_id"]
        model = await _model_of(services, runtime.policy, tenant_name, response_id)
        url = stored_response_url(model, response_id, suffix, request.query.items())
        # the gateway's trace context, else (telemetry off) the caller's, passed on
        trace = spans.upstream(model, method) or caller_trace_headers(request.headers)
        headers = {"x-request-id": rid, **forwarded_headers(request.headers), **auth_headers(model, services.environ),
                   **trace}
        if action == "retrieve" and request.query.get("stream", "false").lower() not in ("false", "0"):
            return await _relay_stream(request, model, url, headers, tenant_name, response_id)
        try:
            status, raw = await services.transport.ask(model, method, url, headers,
                                                       runtime.policy.server.max_answer_bytes)
            if status == 404 and response_id.encode() not in raw:
                # a 404 that does not name the response: the server serves no such call (vLLM has no
                # `/input_items`; a server without the Responses API's store has none of them), which says nothing
                # of the response: kept, and the gateway's set-up answered as any model's 404 (502 not_found)
                raise status_error(model, status, raw, {})
            if status == 204 and action != "delete":
                raise UpstreamProtocolError(f"model '{model.name}' answered HTTP 204: no {action} answer")
        except UpstreamError as exc:
            raise _failed(spans, model, exc) from None
        spans.answered(status)
        if status == 200 and action in ("retrieve", "cancel"):     # a background response seen ended: settled now
            with contextlib.suppress(orjson.JSONDecodeError):
                services.settlements.seen(tenant_name, response_id, orjson.loads(raw))
        if status == 204:       # deleted, said without a body: the client gets OpenAI's (200, the id, `deleted`)
            status, raw = 200, orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})
        if status == 404 or action == "delete":     # gone from its server (expired, restarted), or deleted now
            await services.stores.pins.forget(tenant_name, response_id)
        if status == 404:
            raise _not_found(response_id)
        if action == "delete":              # a tenant's data removed: kept in the log, as an audit trail would
            services.settlements.deleted(tenant_name, response_id)
            log.info("response %s of tenant %s deleted on model '%s' (request %s)", response_id, tenant_name,
                     model.name, rid)
        return web.Response(body=raw, status=status, content_type="application/json",
                            headers={"x-request-id": rid, "x-gateway-model": model.name})

    return traced(handle)


async def _relay_stream(request: web.Request, model: Model, url: URL, headers: dict[str, str], tenant_name: str,
                        response_id: str) -> web.StreamResponse:
    """`GET /v1/responses/{id}?stream=true` (`starting_after` too): a background response's events relayed as its
    server sends them, each within the model's `total_s` of the one before (a longer silence, a server failing
    once the stream is open, or one ending it after events but before its end event or `error`, or half-way
    through an event, ends it with an in-band error event: never as if whole); an end event settles its request
    at once. A client that takes nothing for `server.client_timeout_s` is cut (its connection closed), as one
    that left."""
    services: Services = request.app[SERVICES]
    spans, rid = request[SPANS], request[REQUEST_ID]
    client_timeout_s = services.holder.current.policy.server.client_timeout_s
    response: web.StreamResponse | None = None
    try:
        async with services.transport.ask_stream(model, url, headers) as events:
            spans.answered(200)
            response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": rid, "x-gateway-model": model.name})
            await response.prepare(request)
            request[STREAM] = response
            relayed = ended = False         # any event with data; its end event
            while True:
                try:
                    async with asyncio.timeout(model.timeouts.total_s):
                        event = await anext(events, None)
                except TimeoutError:
                    raise UpstreamTimeout(f"model '{model.name}' sent nothing for {model.timeouts.total_s:g} s") \
                        from None
                if event is None:
                    break
                if not event.endswith(b"\n\n"):     # the last, cut before its blank line: never passed on half
                    raise UpstreamProtocolError(f"model '{model.name}' ended the stream early")
                await _write(request, response, event, client_timeout_s)
                relayed = relayed or event_data(event) is not None
                kind, body = _typed(event)
                ended = ended or kind in END_EVENTS or kind == "error"
                if kind in END_EVENTS:
                    services.settlements.seen(tenant_name, response_id, body)
            if relayed and not ended:       # events, then no end: cut short (none: nothing after `starting_after`)
                raise UpstreamProtocolError(f"model '{model.name}' ended the stream early")
            await _write(request, response, b"", client_timeout_s, eof=True)
    except UpstreamError as exc:
        if response is None:
            if isinstance(exc, UpstreamStatus) and exc.upstream_status == 404 and response_id in str(exc):
                await services.stores.pins.forget(tenant_name, response_id)     # gone from its server
                raise _not_found(response_id) from None
            raise _failed(spans, model, exc) from None
        _failed(spans, model, exc)
        with contextlib.suppress(ConnectionError):
            await _write(request, response, error_event(exc.message, error_type=exc.error_type, code=exc.code,
                                                        responses=True), client_timeout_s, eof=True)
    except ConnectionError:     # the client left, or took nothing for client_timeout_s (cut)
        pass
    return response


async def _write(request: web.Request, response: web.StreamResponse, data: bytes, timeout_s: float,
                 eof: bool = False) -> None:
    """Write to the client (and end the stream: `eof`); one that takes none of it for `timeout_s` is cut, its
    connection closed (ClientStalled): a stream ended as whole would tell it that nothing more was to come."""
    try:
        async with asyncio.timeout(timeout_s):
            if data:
                await response.write(data)
            if eof:
                await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ClientStalled("the client took none of the stream") from None


def _typed(event: bytes) -> tuple[str | None, dict]:
    """A Responses API event's `type` and the response it carries (None, and empty, for what it has not)."""
    data = event_data(event)
    if not data or b'"type"' not in data:
        return None, {}
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, {}
    if not isinstance(chunk, dict):
        return None, {}
    return event_type(chunk), response_of(chunk)


def _failed(spans, model: Model, exc: UpstreamError) -> UpstreamError:
    """A model server's failure, on the call's spans, named the model asked with its Retry-After, as a generating
    call's error is."""
    spans.failed(exc.reason, getattr(exc, "upstream_status", None))
    exc.headers = {**exc.headers, "x-gateway-model": model.name, **exc.retry_headers()}
    return exc


async def _model_of(services: Services, policy, tenant_name: str, response_id: str):
    """The model that stored the tenant's response: 404 when the gateway relayed no such response to the tenant
    (within `routing.stored_response_ttl_s`), or its model is no longer in the policy; 503 while the pins' store
    cannot answer (without it no server is known to ask, whatever `store.on_store_failure` says)."""
    if not _RESPONSE_ID.fullmatch(response_id):
        raise _not_found(response_id[:256])
    model_name = await services.stores.pins.model_for(tenant_name, response_id)
    if model_name is STORE_DOWN:
        raise StoreUnavailable("the store of stored responses cannot be reached; send the request again shortly")
    model = policy.models.get(model_name) if model_name is not None else None
    if model is None:
        raise _not_found(response_id)
    return model


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=None, code=None)
