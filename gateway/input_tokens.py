"""`POST /v1/responses/input_tokens` (`client.responses.input_tokens.count`): a Responses API request's input tokens,
counted by the gateway itself, offline, without calling a model.

The count is the gateway's own (tiktoken, the default encoding): the one it routes, limits and reserves by, which a
model of another tokenizer may count a few percent apart. A request continuing a stored response
(`previous_response_id`) or a conversation is refused: their history is on a model server, which the count cannot
see. Nothing is generated: no route, SLA, limit, budget, cache, metric or ledger line applies (its SERVER span
does, `plain_calls`); a large body's tenant already at its limits is refused before it is counted, as a
generating request's is.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import UnsupportedInput
from gateway.plain_calls import caller, traced
from gateway.responses import json_response
from gateway.services import SERVICES, Services
from gateway.stages.count import counted
from gateway.stages.parse import invalid_type, parse_json_object, read_body, validate_input


@traced
async def count_input_tokens(request: web.Request) -> web.Response:
    """The request's input tokens as OpenAI's API answers them: `{"object": "response.input_tokens",
    "input_tokens": N}`."""
    services: Services = request.app[SERVICES]
    runtime = services.holder.current
    tenant = caller(request)
    server = runtime.policy.server
    raw = await read_body(request, server.max_body_bytes, server.client_timeout_s)
    body = parse_json_object(raw)
    validate_input("responses", body)
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise UnsupportedInput(f"{field} is not counted through the gateway: the history it names is on a model "
                                   f"server, which the gateway's count cannot see; send the history in input",
                                   param=field, code="unsupported_parameter")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise invalid_type("instructions", "a string", body["instructions"])
    tokens, _ = await counted(services, tenant, "responses", body, len(raw))
    return json_response({"object": "response.input_tokens", "input_tokens": tokens})
