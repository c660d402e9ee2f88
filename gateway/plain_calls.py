"""The API calls served outside the request pipeline (the model list, outcome reports, stored responses, input token
counts): each has its SERVER span (`telemetry.tracing.PlainCall`), and its errors are answered here, in OpenAI's
shape, with the request id its span and its model-server call carry (the error middleware would make another)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError
from gateway.policy.model import Tenant
from gateway.responses import error_response, request_id
from gateway.services import SERVICES
from gateway.telemetry.tracing import PlainCall

log = logging.getLogger("gateway")

#: the call's spans and request id, for its handler
SPANS = web.RequestKey("plain_call_spans", PlainCall)
REQUEST_ID = web.RequestKey("plain_call_request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def traced(handler: Handler) -> Handler:
    """`handler` with its SERVER span, ended with the status its client was sent (499 when the client left first),
    and its errors answered here."""
    async def handle(request: web.Request) -> web.StreamResponse:
        rid = request_id(request)
        spans = request.app[SERVICES].telemetry.plain_call(request, rid)
        request[SPANS], request[REQUEST_ID] = spans, rid
        response: web.StreamResponse | None = None
        status = 499                        # unless answered: the client left (the task cancelled)
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc, request_id=rid)
        except web.HTTPException as exc:    # aiohttp's own refusals: the error middleware answers them
            status = exc.status
            raise
        except Exception:                   # the last line of defence, as the pipeline's
            log.exception("request %s failed", rid)
            response = error_response(GatewayError("internal error"), request_id=rid)
        finally:
            spans.end(response.status if response is not None else status)
        if not response.prepared and "x-request-id" not in response.headers:
            response.headers["x-request-id"] = rid
        return response
    return handle


def caller(request: web.Request) -> Tenant | None:
    """The calling tenant (None when the gateway runs open; AuthenticationFailed for a bad key), noted on the call's
    SERVER span."""
    tenant = request.app[SERVICES].holder.current.identity.identify(request.headers)
    request[SPANS].identified(tenant.name if tenant is not None else None)
    return tenant
