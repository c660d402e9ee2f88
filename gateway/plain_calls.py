"""The API calls served outside the request pipeline (the model list, outcome reports, stored responses, input token
counts): each has its SERVER span (`telemetry.tracing.PlainCall`), and its errors are answered here, in OpenAI's
shape, with the request id its span and its model-server call carry (the error middleware would make another)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError, ShuttingDown
from gateway.policy.model import Tenant
from gateway.responses import error_response, request_id
from gateway.services import SERVICES
from gateway.sse import error_event
from gateway.telemetry.tracing import PlainCall

log = logging.getLogger("gateway")

#: the call's spans and request id, for its handler
SPANS = web.RequestKey("plain_call_spans", PlainCall)
REQUEST_ID = web.RequestKey("plain_call_request_id", str)
#: the stream a handler has opened to its client, if any: one the drain ends is told so in-band
STREAM = web.RequestKey("plain_call_stream", web.StreamResponse)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InFlight:
    """A call in the drain's set of requests under way (`Services.in_flight`), as a pipeline's context is."""

    __slots__ = ("cut_by_shutdown",)

    def __init__(self) -> None:
        self.cut_by_shutdown = False    # still running when the drain's time ran out: the gateway ended it


def traced(handler: Handler) -> Handler:
    """`handler` with its SERVER span, ended with the status its client was sent (499 when the client left first),
    and its errors answered here; one still running when the drain's time runs out is a 503 `shutting_down`, as a
    generating call is, not a connection cut."""
    async def handle(request: web.Request) -> web.StreamResponse:
        rid = request_id(request)
        services = request.app[SERVICES]
        spans = services.telemetry.plain_call(request, rid)
        request[SPANS], request[REQUEST_ID] = spans, rid
        response: web.StreamResponse | None = None
        status = 499                        # unless answered: the client left (the task cancelled)
        mark = InFlight()
        services.in_flight[id(mark)] = (mark, asyncio.current_task())
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            if not mark.cut_by_shutdown or asyncio.current_task().uncancel():
                raise
            response = await _shut_down(request, rid)
        except GatewayError as exc:
            response = error_response(exc, request_id=rid)
        except web.HTTPException as exc:    # aiohttp's own refusals: the error middleware answers them
            status = exc.status
            raise
        except Exception:                   # the last line of defence, as the pipeline's
            log.exception("request %s failed", rid)
            response = error_response(GatewayError("internal error"), request_id=rid)
        finally:
            del services.in_flight[id(mark)]
            spans.end(response.status if response is not None else status)
        if not response.prepared and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = rid
        return response
    return handle


async def _shut_down(request: web.Request, rid: str) -> web.StreamResponse:
    """The answer of a call the drain ended: a 503 `shutting_down`, in-band on a stream already open."""
    ended = ShuttingDown("the gateway is shutting down; try again")
    stream = request.get(STREAM)
    if stream is None:
        return error_response(ended, request_id=rid)
    with contextlib.suppress(ConnectionError):
        await stream.write(error_event(ended.message, error_type=ended.error_type, code=ended.code, responses=True))
        await stream.write_eof()
    return stream


def caller(request: web.Request) -> Tenant | None:
    """The calling tenant (None when the gateway runs open; AuthenticationFailed for a bad key), noted on the call's
    SERVER span."""
    tenant = request.app[SERVICES].holder.current.identity.identify(request.headers)
    request[SPANS].identified(tenant.name if tenant is not None else None)
    return tenant
