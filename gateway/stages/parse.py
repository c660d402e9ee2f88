"""parse: read the body within its size limit and validate the OpenAI request."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.context import RequestContext
from gateway.errors import BodyTooLarge, ClientError

#: the field that carries each endpoint's input
INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
#: the deepest JSON the gateway can write again (orjson's limit): a body nested deeper is a 400
MAX_JSON_DEPTH = 254


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes`."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except RequestPayloadError as exc:      # e.g. Content-Encoding: gzip on a body that is not gzip
        raise ClientError(f"could not read the request body: {exc}") from exc
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw:
        raise ClientError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"could not parse the JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise ClientError(f"the JSON body must be an object, not {type(body).__name__}")
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and not _depth_within(body, MAX_JSON_DEPTH):
        raise ClientError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


def _depth_within(value: Any, limit: int) -> bool:
    """Whether no object or array in `value` lies more than `limit` levels deep (the body itself is 1)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values() if isinstance(child, (dict, list)))
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return True


def _check_type(body: dict, field: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ClientError(f"'{field}' must be {what}, not {type(value).__name__}", param=field)
    return value


def _check_range(body: dict, field: str, low: float, high: float | None = None) -> None:
    value = _check_type(body, field, (int, float), "a number")
    if value is not None and (value < low or (high is not None and value > high)):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ClientError(f"'{field}' must be {bound}, got {value}", param=field)


def validate_messages(messages: Any) -> None:
    """Chat messages: a non-empty list of objects, each with a string role."""
    if not isinstance(messages, list) or not messages:
        raise ClientError("'messages' must be a non-empty array", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ClientError(f"'messages[{index}]' must be an object with a string 'role'",
                              param=f"messages[{index}]")


def validate_input(endpoint: str, body: dict) -> None:
    """The endpoint's input field is present and of a shape OpenAI accepts."""
    field = INPUT_FIELD[endpoint]
    if field not in body:
        raise ClientError(f"missing required parameter: '{field}'", param=field)
    if endpoint == "chat":
        validate_messages(body[field])
    elif not isinstance(body[field], (str, list)):
        raise ClientError(f"'{field}' must be a string or an array", param=field)


def validate_body(endpoint: str, body: dict) -> None:
    """Everything the gateway relies on is present and of the right type."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ClientError("missing required parameter: 'model' (a string)", param="model")
    validate_input(endpoint, body)
    _check_type(body, "stream", (bool,), "a boolean")
    _check_type(body, "stream_options", (dict,), "an object")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        _check_type(body, field, (int,), "an integer")
        _check_range(body, field, 1)
    _check_range(body, "temperature", 0, 2)
    _check_range(body, "top_p", 0, 1)
    _check_type(body, "seed", (int,), "an integer")
    _check_type(body, "stop", (str, list), "a string or an array")


class Parse:
    """Reads and validates the body; fills the request fields every later stage uses."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        raw = await read_body(ctx.http, ctx.policy.server.max_body_bytes)
        body = parse_json_object(raw)
        validate_body(ctx.endpoint, body)
        ctx.body = body
        ctx.body_bytes = len(raw)
        ctx.requested_model = body["model"]
        ctx.stream = bool(body.get("stream")) and ctx.endpoint != "embeddings"
        options = body.get("stream_options") or {}
        ctx.include_usage = ctx.stream and bool(options.get("include_usage"))
        ctx.max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        ctx.choices = body.get("n") or 1
        headers = ctx.http.headers
        ctx.task_id = headers.get("x-gateway-task-id")
        ctx.workflow = headers.get("x-gateway-workflow")
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
