"""parse: read the body within its size limit and validate the OpenAI request, refusing it as OpenAI's API does
(its `code` and `param`: missing_required_parameter, invalid_type, integer_below_min_value, empty_array, ...)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from gateway.context import RequestContext
from gateway.errors import BodyTooLarge, ClientError, ClientTooSlow, ShuttingDown
from gateway.routing.needs import request_needs

#: the field that carries each endpoint's input
INPUT_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input", "responses": "input"}
#: the deepest JSON the gateway can write again (orjson's limit): a body nested deeper is a 400
MAX_JSON_DEPTH = 254
#: the longest `model` taken: far above any model id or deployment name (Azure's are at most 64), and a request's
#: `model` goes into its ledger line, spans and logs
MAX_MODEL_CHARS = 256
#: the longest `x-gateway-task-id` or `x-gateway-workflow` taken (a workflow is a metric label and a ledger field)
MAX_GROUPING_CHARS = 256
#: what such a header may not hold: control characters, and the lone surrogates aiohttp makes of bytes that are not
#: UTF-8 (they cannot be written to the ledger, a metric label or Prometheus' text)
_UNFIT_HEADER_TEXT = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
#: the interim answer to `Expect: 100-continue`, sent when the body is first read
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def expects_continue(request: web.BaseRequest) -> bool:
    """Whether the client waits for `100 Continue` before it sends its body (curl does for large bodies)."""
    return request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"


async def read_body(request: web.Request, max_bytes: int, stall_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes`, and with 408 when the client sends
    nothing for `stall_s`; a read the server's shutdown ended (a body still coming when aiohttp gives up on
    requests, half-way through the grace period) is a 503 `shutting_down`, as the request's end would be.

    A client waiting for `100 Continue` is sent it here, once its head has passed every check before the body
    (`app.continue_when_read`)."""
    declared = request.content_length      # a property that parses the header at each read: read once
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {max_bytes}")
    content = request.content
    if content.is_eof() and declared is not None and "Content-Encoding" not in request.headers:
        return await content.read()         # it came whole with the head, as most do: no wait, within the limit
    if expects_continue(request) and not content.is_eof():
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0      # as aiohttp's own: the answer's size counts from its head
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(stall_s) as deadline:
            async for chunk in content.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise BodyTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if stall_s:
                    deadline.reschedule(loop.time() + stall_s)
    except RequestPayloadError as exc:      # e.g. Content-Encoding: gzip on a body that is not gzip
        raise ClientError(f"could not read the request body: {exc}") from exc
    except TimeoutError:
        raise ClientTooSlow(f"the request body stopped coming for {stall_s:g} s (server.client_timeout_s)") from None
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():     # this request's task was cancelled: the client left
            raise
        raise ShuttingDown("the gateway is shutting down; send the request again") from None
    return b"".join(chunks)


def max_tokens_of(body: dict, endpoint: str = "chat") -> int | None:
    """The answer's length limit the request sets (`max_completion_tokens`, else `max_tokens`, or on the Responses
    API its `max_output_tokens`; 0 on completions scores the prompt alone); None when it sets none. Another
    endpoint's `max_output_tokens` is a field it does not have, which its server ignores: not its limit (as chat's
    `max_tokens` and `max_completion_tokens` are not the Responses API's)."""
    if endpoint == "responses":     # chat's `max_tokens` and `max_completion_tokens` are none of its fields
        return body.get("max_output_tokens")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    return 0 if limit is None and body.get("max_tokens") == 0 else limit


def choices_of(endpoint: str, body: dict) -> int:
    """The answers generated together: `n` for each prompt (a completions batch has several); the Responses API
    makes one, whatever a stray `n` says."""
    if endpoint == "responses":
        return 1
    return (body.get("n") or 1) * prompts_in(endpoint, body)


def prompts_in(endpoint: str, body: dict) -> int:
    """How many prompts a completions request sends at once (a list of strings or of token arrays: each is answered
    with `n` choices of its own); 1 otherwise."""
    prompt = body.get("prompt") if endpoint == "completions" else None
    if isinstance(prompt, list) and prompt and not all(type(item) is int for item in prompt):
        return len(prompt)
    return 1


def grouping_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header that groups calls (`x-gateway-task-id`, `x-gateway-workflow`), or a 400 when it is no UTF-8 text
    of at most MAX_GROUPING_CHARS printable characters: `invalid_header` naming it, as the other `x-gateway-*`
    headers are refused."""
    value = headers.get(name)
    if value is not None and (len(value) > MAX_GROUPING_CHARS or _UNFIT_HEADER_TEXT.search(value)):
        raise ClientError(f"the {name} header must be UTF-8 text of at most {MAX_GROUPING_CHARS} characters, "
                          f"without control characters", param=name, code="invalid_header")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it (for JSON that does not parse,
    OpenAI's answer: no code, no param)."""
    if not raw:
        raise ClientError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):     # past the 1024 levels orjson reads: as deep as below
            raise ClientError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        # a lone surrogate's escape ("no low surrogate in string"), not UTF-8 that is wrong ("surrogates not allowed");
        # read by the stdlib, on the event loop, about 8 times orjson's time: for bodies of text, not megabytes
        body = _with_lone_surrogates_replaced(raw) if "surrogate in string" in str(exc) and \
            len(raw) <= MAX_SURROGATE_FALLBACK_BYTES else None
        if body is None:
            raise ClientError(f"We could not parse the JSON body of your request ({exc}). The gateway expects a "
                              "JSON payload, but what was sent was not valid JSON.", code=None) from exc
    if not isinstance(body, dict):
        raise ClientError(f"the JSON body must be an object, not {json_kind(body)}")
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and not _depth_within(body, MAX_JSON_DEPTH):
        raise ClientError(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


#: the largest body read again to replace lone surrogates (a larger one with them is a 400, as any JSON orjson
#: refuses): the stdlib's reading takes about 65 ms of the event loop a MiB
MAX_SURROGATE_FALLBACK_BYTES = 1024 * 1024
#: a UTF-16 surrogate left alone in a decoded string (a pair is one character by then)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _with_lone_surrogates_replaced(raw: bytes) -> Any:
    """JSON whose strings escape half a UTF-16 surrogate pair (`"\\ud83d"`: JavaScript's JSON.stringify writes one
    for a string cut in the middle of an emoji), read with each lone half replaced by U+FFFD, as a browser does
    when it encodes such a string to UTF-8 (orjson refuses them: such a string has no UTF-8 form to send on); None
    when the JSON is wrong otherwise (NaN, a number past a double's range or past 64 bits, too deep, a body that is
    not UTF-8: as orjson would refuse it)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    def finite(text: str) -> float:
        number = float(text)
        if math.isinf(number):      # 1e400: orjson's "number is infinity", never passed on as null
            raise ValueError(f"{text} is past a double's range")
        return number

    try:        # decoded as UTF-8 alone (bytes would let json guess UTF-16 or UTF-32)
        body = _replace_lone_surrogates(json.loads(raw.decode("utf-8"), parse_constant=refuse, parse_float=finite))
        orjson.dumps(body)          # what the gateway writes on must be writable: no integer past 64 bits
    except (ValueError, TypeError, RecursionError):
        return None
    return body


def _replace_lone_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(key): _replace_lone_surrogates(item) for key, item in value.items()}
    return value


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


#: how OpenAI's errors name the JSON types, after null and booleans (a bool is an int to Python)
_JSON_KINDS = ((int, "an integer"), (float, "a decimal"), (str, "a string"), (list, "an array"),
               (dict, "an object"))


def json_kind(value: Any) -> str:
    """A JSON value's type as OpenAI's errors name it ("but got a string instead")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for python_type, kind in _JSON_KINDS:
        if isinstance(value, python_type):
            return kind
    return type(value).__name__


def missing_parameter(param: str) -> ClientError:
    """OpenAI's answer to a required field left out."""
    return ClientError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def invalid_type(param: str, expected: str, value: Any) -> ClientError:
    """OpenAI's answer to a field of the wrong JSON type."""
    return ClientError(f"Invalid type for '{param}': expected {expected}, but got {json_kind(value)} instead.",
                       param=param, code="invalid_type")


def out_of_range(param: str, kind: str, value: float, low: float, high: float | None) -> ClientError | None:
    """OpenAI's answer to a number outside [low, high] (`kind`: "integer" or "decimal"); None when inside."""
    if value < low:
        side, bound, code = "below minimum", f">= {low}", f"{kind}_below_min_value"
    elif high is not None and value > high:
        side, bound, code = "above maximum", f"<= {high}", f"{kind}_above_max_value"
    else:
        return None
    return ClientError(f"Invalid '{param}': {kind} {side} value. Expected a value {bound}, but got {value} instead.",
                       param=param, code=code)


def _check_type(body: dict, field: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise invalid_type(field, what, value)
    return value


def _check_integer(body: dict, field: str, low: int) -> None:
    value = _check_type(body, field, (int,), "an integer")
    if value is not None and (error := out_of_range(field, "integer", value, low, None)):
        raise error


def _check_number(body: dict, field: str, low: float, high: float) -> None:
    value = _check_type(body, field, (int, float), "a number")
    if value is not None and (error := out_of_range(field, "decimal", value, low, high)):
        raise error


def validate_messages(messages: Any) -> None:
    """Chat messages: a non-empty array of objects, each with a string role."""
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise ClientError("Invalid 'messages': empty array. Expected an array with minimum length 1, but got an "
                          "empty array instead.", param="messages", code="empty_array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_type(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if role is None:
            raise missing_parameter(f"messages[{index}].role")
        if not isinstance(role, str):
            raise invalid_type(f"messages[{index}].role", "a string", role)


def validate_input(endpoint: str, body: dict) -> None:
    """The endpoint's input field is present and of a shape OpenAI accepts."""
    field = INPUT_FIELD[endpoint]
    if endpoint == "responses":     # optional: a stored prompt, or a previous response, may be all there is
        if body.get(field) is not None and not isinstance(body[field], (str, list)):
            raise invalid_type(field, "one of a string or an array", body[field])
        return
    if field not in body:
        raise missing_parameter(field)
    if endpoint == "chat":
        validate_messages(body[field])
    elif not isinstance(body[field], (str, list)):
        raise invalid_type(field, "one of a string or an array", body[field])


def validate_model(body: dict) -> None:
    """`model` is a non-empty string of at most MAX_MODEL_CHARS; left out (or empty), OpenAI's answer names no code
    and no param."""
    model = body.get("model")
    if model is None or model == "":
        raise ClientError("you must provide a model parameter", code=None)
    if not isinstance(model, str):
        raise invalid_type("model", "a string", model)
    if len(model) > MAX_MODEL_CHARS:
        raise ClientError(f"Invalid 'model': string too long. Expected a string with maximum length "
                          f"{MAX_MODEL_CHARS}, but got a string with length {len(model)} instead.", param="model",
                          code="string_above_max_length")


def validate_body(endpoint: str, body: dict) -> None:
    """Everything the gateway relies on is present and of the right type, refused with OpenAI's codes."""
    validate_model(body)
    validate_input(endpoint, body)
    _check_type(body, "stream", (bool,), "a boolean")
    _check_type(body, "stream_options", (dict,), "an object")
    # a legacy completion of max_tokens 0 echoes and scores the prompt alone (evaluation harnesses do)
    _check_integer(body, "n", 1)
    if endpoint == "responses":             # its own fields: on chat, completions and embeddings, passed on as
        _validate_responses_fields(body)    # any field they do not have (their servers ignore it), as before;
    else:                                   # and chat's limits on it
        _check_integer(body, "max_tokens", 0 if endpoint == "completions" else 1)
        _check_integer(body, "max_completion_tokens", 1)
    _check_number(body, "temperature", 0, 2)
    _check_number(body, "top_p", 0, 1)
    _check_type(body, "seed", (int,), "an integer")
    _check_type(body, "stop", (str, list), "one of a string or an array")


def _validate_responses_fields(body: dict) -> None:
    """The Responses API's own fields: `max_output_tokens`, `previous_response_id`; `background` stored alone
    (`gateway.background`); no `conversation`."""
    _check_integer(body, "max_output_tokens", 1)
    _check_type(body, "previous_response_id", (str,), "a string")
    if body.get("conversation") is not None:
        raise ClientError("conversations are not served through the gateway (they are created and read with "
                          "/v1/conversations, which it does not serve); continue a response with "
                          "previous_response_id, or send the history in input", param="conversation",
                          code="unsupported_parameter")
    _check_type(body, "background", (bool,), "a boolean")
    if body.get("background") is True:
        if body.get("store") is False:
            raise ClientError("Background responses require store=true: a background response is read back from "
                              "its store.", param="store", code="invalid_value")


class Parse:
    """Reads and validates the body; fills the request fields every later stage uses."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        server = ctx.policy.server
        raw = await read_body(ctx.http, server.max_body_bytes, server.client_timeout_s)
        body = parse_json_object(raw)
        if deployment := ctx.http.match_info.get("deployment"):
            body["model"] = deployment      # on Azure's paths the deployment names the model, as Azure reads it
        validate_body(ctx.endpoint, body)
        ctx.body = body
        ctx.body_bytes = len(raw)
        ctx.requested_model = body["model"]
        ctx.stream = bool(body.get("stream")) and ctx.endpoint != "embeddings"
        options = body.get("stream_options") or {}
        # the Responses API reports usage in its last event unasked: its stream_options are the client's own
        ctx.include_usage = ctx.stream and ctx.endpoint != "responses" and bool(options.get("include_usage"))
        ctx.max_tokens = max_tokens_of(body, ctx.endpoint)
        ctx.choices = choices_of(ctx.endpoint, body)
        ctx.uses = request_needs(ctx.endpoint, body)
        headers = ctx.http.headers
        ctx.task_id = grouping_header(headers, "x-gateway-task-id")
        ctx.workflow = grouping_header(headers, "x-gateway-workflow")
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
