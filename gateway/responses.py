"""Building responses: JSON through orjson, errors in OpenAI's shape."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.context import RequestContext

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def json_response(payload: object, *, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response serialised once with orjson."""
    return web.Response(body=orjson.dumps(payload), status=status, headers=headers,
                        content_type="application/json")


def error_response(error: GatewayError, *, request_id: str | None = None) -> web.Response:
    """An error in OpenAI's shape: {"error": {"message", "type", "code", "param"}}."""
    headers = dict(error.headers)
    if not error.retry_helps:
        headers["x-should-retry"] = "false"
    if request_id:
        headers["x-request-id"] = request_id
    response = json_response(error.body(), status=error.status, headers=headers)
    if error.closes_connection:
        response.force_close()
    return response


def response_headers(ctx: RequestContext) -> dict[str, str]:
    """The gateway's own headers on every answer from a model or the cache."""
    headers = {"x-request-id": ctx.request_id, "x-gateway-fallback": ctx.fallback_state,
               "x-gateway-cache": ctx.cache_status}
    if (model := ctx.model_selected) is not None:
        headers["x-gateway-model"] = model
    if (route := ctx.route_name) is not None:
        headers["x-gateway-route"] = route
    if ctx.attempts:
        headers["x-gateway-models-tried"] = ",".join(a.model.name for a in ctx.attempts)
    if ctx.fallback_state != "none" and ctx.fallback_reason:
        headers["x-gateway-fallback-reason"] = ctx.fallback_reason
    if (admission := ctx.admission) is not None:
        headers.update(admission.headers())
    return headers


def request_id(request: web.Request) -> str:
    """The caller's `x-request-id` when it is sane, else a fresh one.

    A fresh id only has to be unique, not unguessable: `random` (seeded from the OS,
    reseeded in forked workers) costs no syscall, where uuid4 reads os.urandom.
    """
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return new_request_id()


def new_request_id() -> str:
    """A fresh request id: 32 hex digits."""
    return f"{random.getrandbits(128):032x}"
