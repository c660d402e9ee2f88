"""The simulator's aiohttp app: OpenAI endpoints for one model, plus `/sim/*` control endpoints."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import BodyTooLarge, ClientError, GatewayError, NotFound, RateLimited
from gateway.simulator.answers import (Answer, StreamScript, completion_body, embeddings_body, make_answer, models_body,
                                       stream_script)
from gateway.simulator.background import BackgroundResponse
from gateway.simulator.config import SimConfig
from gateway.simulator.delivery import (OUTCOME, hang, json_response, raise_fault, send_body, send_events,
                                        send_stream)
from gateway.simulator.parse import (SimRequest, parse_chat, parse_completions, parse_embeddings, parse_responses,
                                     parse_retrieve_stream)
from gateway.simulator.plan import Plan, plan_answer
from gateway.simulator.responses import response_body, response_stream_script, stored_input_items
from gateway.simulator.state import RECENT_REQUESTS, SimState, StoredResponse

STATE = web.AppKey("sim_state", SimState)
BODY = web.RequestKey("sim_body", object)
#: the largest request body read: well above the gateway's own limit (server.max_body_bytes, 20 MiB by
#: default), so a long prompt meets the context window, as at a real model server
MAX_BODY_BYTES = 64 * 1024 * 1024
PARSERS = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completions,
           "/v1/embeddings": parse_embeddings, "/v1/responses": parse_responses}


def build_sim_app(config: SimConfig) -> web.Application:
    """One simulated model as an aiohttp app."""
    app = web.Application(middlewares=[track_requests, openai_errors], client_max_size=MAX_BODY_BYTES)
    app[STATE] = SimState(config)
    app.router.add_post("/v1/chat/completions", handle_generate)
    app.router.add_post("/v1/completions", handle_generate)
    app.router.add_post("/v1/responses", handle_generate)
    app.router.add_get("/v1/responses/{response_id}", handle_retrieve)
    app.router.add_delete("/v1/responses/{response_id}", handle_delete)
    app.router.add_get("/v1/responses/{response_id}/input_items", handle_input_items)
    app.router.add_post("/v1/responses/{response_id}/cancel", handle_cancel)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/sim/stats", handle_stats)
    app.router.add_get("/sim/requests", handle_requests)
    app.router.add_get("/sim/config", handle_get_config)
    app.router.add_post("/sim/config", handle_set_config)
    app.router.add_post("/sim/reset", handle_reset)
    app.on_shutdown.append(_release_hanging)
    return app


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record every `/v1/` request when it arrives and count its outcome when it ends."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    state = request.app[STATE]
    try:
        body = _json_or_none(await request.read()) if request.method == "POST" else None
    except web.HTTPRequestEntityTooLarge:
        state.count(request.path, "bad_request")
        error = BodyTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        return json_response(error.body(), status=error.status)
    request[BODY] = body
    # a header's bytes that are not UTF-8 (aiohttp keeps them as surrogates, which JSON cannot carry) shown as U+FFFD
    headers = {name.lower(): value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
               for name, value in request.headers.items()}
    state.remember(request.method, request.path, headers, body)
    state.in_flight += 1
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1
        # counted by route (`/v1/responses/{response_id}`), not by path: one count per stored response would grow
        resource = request.match_info.route.resource
        state.count(resource.canonical if resource is not None else request.path,
                    request.get(OUTCOME, "cancelled"))


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer every error, injected or not, in OpenAI's error shape."""
    try:
        return await handler(request)
    except GatewayError as exc:
        request[OUTCOME] = _outcome_of(exc)
        return json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        request[OUTCOME] = "bad_request"
        error = ClientError(f"{request.method} {request.path}: {exc.reason}", code=f"http_{exc.status}")
        return json_response(error.body(), status=exc.status)


async def handle_generate(request: web.Request) -> web.StreamResponse:
    """`POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/responses`."""
    state = request.app[STATE]
    config = state.config
    sim_request = PARSERS[request.path](_request_body(request))
    plan = plan_answer(config, state.rng, sim_request)
    raise_fault(plan.fault, config.retry_after_s)
    if plan.fault == "hang":
        return await hang(request, state)
    answer = make_answer(config, sim_request, plan)
    if sim_request.background:
        return await _send_background(request, answer, plan, sim_request.stream)
    if answer.kind == "responses" and request[BODY].get("store") is not False and plan.fault is None:
        state.store(answer.response_id, response_body(answer), stored_input_items(request[BODY], answer))
    if sim_request.stream:
        return await send_stream(request, _stream_script(answer, sim_request, config), plan)
    return await send_body(request, _whole_body(answer, config), plan)


async def _send_background(request: web.Request, answer: Answer, plan: Plan, stream: bool) -> web.StreamResponse:
    """`POST /v1/responses` with `background: true`: stored and answered at once, `queued`, or streamed as it is
    made; its answer is made in simulated time, by its plan's timing (background.py). A drop cuts the answer:
    unstreamed, nothing is stored (as for any answer); streamed, the client has its id from `response.created`
    and it is stored, the server going on to make it."""
    state = request.app[STATE]
    background = BackgroundResponse(answer, plan, created_s=time.monotonic())
    if plan.fault is None or stream:
        state.store(answer.response_id, background, stored_input_items(request[BODY], answer))
    if stream:
        drop_after = background.stream_script().drop_after if plan.fault == "drop" else None
        return await send_events(request, background.stream(), drop_after)
    at_once = dataclasses.replace(plan, ttft_s=0.0, tpot_s=0.0)
    return await send_body(request, background.created_body(), at_once)


async def handle_retrieve(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/{response_id}`: a stored response, as it was answered, or a background response as it
    stands now; with `stream=true`, a background response's events after `starting_after`, as they are made."""
    response, _ = _stored(request)
    starting_after = parse_retrieve_stream(request.query)
    if starting_after is None:
        request[OUTCOME] = "ok"
        return json_response(_as_it_stands(response))
    if not isinstance(response, BackgroundResponse):
        raise ClientError("Streaming is only supported for responses created with background=true.", param="stream")
    return await send_events(request, response.stream(starting_after))


async def handle_delete(request: web.Request) -> web.Response:
    """`DELETE /v1/responses/{response_id}`: forget a stored response."""
    response_id = request.match_info["response_id"]
    _stored(request)
    del request.app[STATE].stored[response_id]
    request[OUTCOME] = "ok"
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def handle_input_items(request: web.Request) -> web.Response:
    """`GET /v1/responses/{response_id}/input_items`: the stored response's input items, newest first unless
    `order=asc`, `limit` of them (20 by default), after the item `after` names."""
    _, items = _stored(request)
    query = request.query
    order = query.get("order", "desc")
    try:
        limit = int(query.get("limit", 20))
    except ValueError as exc:
        raise ClientError("'limit' must be an integer.", param="limit") from exc
    if order not in ("asc", "desc") or not 1 <= limit <= 100:
        raise ClientError("'order' must be asc or desc, and 'limit' from 1 to 100.", param="order")
    ordered = items if order == "asc" else items[::-1]
    if (after := query.get("after")) is not None:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1:] if after in ids else []
    page = ordered[:limit]
    request[OUTCOME] = "ok"
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit})


async def handle_cancel(request: web.Request) -> web.Response:
    """`POST /v1/responses/{response_id}/cancel`: a background response not yet done is cancelled, and one done
    or cancelled already is answered as it is, as OpenAI does; any other response was answered at once and
    cannot be cancelled (OpenAI's 400)."""
    response, _ = _stored(request)
    if not isinstance(response, BackgroundResponse):
        raise ClientError("Only responses created with background=true can be cancelled.")
    request[OUTCOME] = "ok"
    return json_response(response.cancel(time.monotonic()))


def _as_it_stands(response: StoredResponse) -> dict[str, Any]:
    """A stored `response` object: as it was answered, or a background response's as it stands now."""
    if isinstance(response, BackgroundResponse):
        return response.body(time.monotonic())
    return response


def _stored(request: web.Request) -> tuple[StoredResponse, list[dict[str, Any]]]:
    """The stored response the path names; 404 in OpenAI's words when there is none."""
    response_id = request.match_info["response_id"]
    stored = request.app[STATE].stored.get(response_id)
    if stored is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param=None, code=None)
    return stored


async def handle_embeddings(request: web.Request) -> web.StreamResponse:
    """`POST /v1/embeddings`: deterministic unit vectors after the TTFT delay."""
    state = request.app[STATE]
    config = state.config
    sim_request = parse_embeddings(_request_body(request))
    plan = plan_answer(config, state.rng, sim_request)
    raise_fault(plan.fault, config.retry_after_s)
    if plan.fault == "hang":
        return await hang(request, state)
    return await send_body(request, without_usage(embeddings_body(config, sim_request), config), plan)


async def handle_models(request: web.Request) -> web.Response:
    """`GET /v1/models`."""
    request[OUTCOME] = "ok"
    return json_response(models_body(request.app[STATE].config, int(time.time())))


async def handle_stats(request: web.Request) -> web.Response:
    """`GET /sim/stats`: counts by endpoint and outcome, and requests in flight."""
    return json_response(request.app[STATE].stats())


async def handle_requests(request: web.Request) -> web.Response:
    """`GET /sim/requests?last=N`: the last N received requests (path, headers, body)."""
    try:
        count = int(request.query.get("last", RECENT_REQUESTS))
    except ValueError as exc:
        raise ClientError("'last' must be an integer.", param="last") from exc
    return json_response({"requests": request.app[STATE].last_requests(count)})


async def handle_get_config(request: web.Request) -> web.Response:
    """`GET /sim/config`: the config in force."""
    return json_response(request.app[STATE].config.as_dict())


async def handle_set_config(request: web.Request) -> web.Response:
    """`POST /sim/config`: change any config field at runtime; answers the new config."""
    changes = _json_or_none(await request.read())
    if changes is None:
        raise ClientError("The body must be a JSON object of config fields.")
    try:
        config = request.app[STATE].configure(changes)
    except (TypeError, ValueError) as exc:
        raise ClientError(f"Invalid config: {exc}") from exc
    return json_response(config.as_dict())


async def handle_reset(request: web.Request) -> web.Response:
    """`POST /sim/reset`: start-up config, fresh RNG, no counts, no recorded requests."""
    return json_response(request.app[STATE].reset().as_dict())


async def _release_hanging(app: web.Application) -> None:
    """On shutdown, let hanging requests go so the server can stop promptly."""
    app[STATE].closing.set()


def without_usage(body: dict[str, Any], config: SimConfig) -> dict[str, Any]:
    """The body as it is, or without its `usage` when the model is set to report none."""
    return body if config.usage else {key: value for key, value in body.items() if key != "usage"}


def _whole_body(answer: Answer, config: SimConfig) -> dict[str, Any]:
    """The non-streamed answer in its endpoint's shape."""
    body = response_body(answer) if answer.kind == "responses" else completion_body(answer)
    return without_usage(body, config)


def _stream_script(answer: Answer, request: SimRequest, config: SimConfig) -> StreamScript:
    """The streamed answer in its endpoint's shape; the Responses API always reports usage at its end."""
    if answer.kind == "responses":
        return response_stream_script(answer, config.usage)
    return stream_script(answer, request.include_usage and config.usage)


def _request_body(request: web.Request) -> dict[str, Any]:
    body = request[BODY]
    if body is None:
        raise ClientError("The request body must be a valid JSON object.")
    return body


def _json_or_none(raw: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def _outcome_of(error: GatewayError) -> str:
    if isinstance(error, RateLimited):
        return "rate_limited"
    if error.code == "context_length_exceeded":
        return "context_length"
    return "bad_request" if isinstance(error, ClientError) else "error"
