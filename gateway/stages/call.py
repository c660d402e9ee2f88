"""call: the upstream call, with one visible fallback loop that records each attempt."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from gateway.background import cut_while_generated, has_ended, is_background
from gateway.context import CLIENT_DISCONNECTED, SHUTTING_DOWN, Attempt, RequestContext
from gateway.errors import CircuitOpen, GatewayError, ModelBusy, UpstreamError, UpstreamStatus
from gateway.policy.model import DEFAULT_PRIORITY, Model
from gateway.responses import response_headers
from gateway.stages.answers import read_identity, settle_attempt
from gateway.stages.relay import relay_stream
from gateway.upstream import UpstreamCall, auth_headers, caller_trace_headers, forwarded_headers

log = logging.getLogger(__name__)


def upstream_body(ctx: RequestContext, model: Model, *, stream_options: bool = True) -> bytes:
    """The request body for one model: its upstream name, and usage asked for on streams (without
    `stream_options` at all for a model that refuses the field: the gateway then counts the usage itself)."""
    body = dict(ctx.body)
    body["model"] = model.upstream_model
    if ctx.endpoint == "responses":     # usage comes in its last event unasked; stream_options are the client's
        return orjson.dumps(body)
    if ctx.stream and stream_options:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    elif ctx.stream:
        body.pop("stream_options", None)
    return orjson.dumps(body)


def refuses_stream_options(exc: UpstreamError) -> bool:
    """Whether a model refused a stream's `stream_options` (Azure OpenAI before api-version 2024-09-01-preview,
    servers that refuse fields they do not know, FastAPI's 422): a 400 or 422 naming the field."""
    if not isinstance(exc, UpstreamStatus) or exc.upstream_status not in (400, 422):
        return False
    return exc.param == "stream_options" or "stream_options" in exc.message


def asks_only_usage(options: object) -> bool:
    """Whether a client's `stream_options` hold nothing but what the gateway asks for itself (`include_usage`):
    a model's refusal of other fields is the client's to see, and says nothing of the gateway's."""
    return not options or (isinstance(options, dict) and set(options) <= {"include_usage"})


def fallback_state(ctx: RequestContext, succeeded: bool) -> str:
    """none: the first model answered; fallback: a later one did; exhausted: none did."""
    if not succeeded:
        return "exhausted"
    if len(ctx.attempts) == 1:
        return "none"
    first = ctx.attempts[0].model.name
    return "retried" if all(a.model.name == first for a in ctx.attempts) else "fallback"


def failed_state(ctx: RequestContext, error: GatewayError) -> str:
    """exhausted: every model tried failed in a way another might not; else the state of the attempts."""
    if isinstance(error, UpstreamError) and _worth_another_model(error):
        return "exhausted"
    return "fallback" if len(ctx.attempts) > 1 else "none"


def with_outcome_headers(ctx: RequestContext, error: GatewayError) -> GatewayError:
    """The error to answer with, carrying the gateway's headers (and the upstream's Retry-After, also to the
    millisecond as `retry-after-ms`, which OpenAI's SDKs read first)."""
    headers = {**error.headers, **response_headers(ctx)}
    if isinstance(error, UpstreamError):
        headers.update(error.retry_headers())
    error.headers = headers
    return error


class Call:
    """Tries each planned model in turn until one answers; streams are relayed chunk by chunk."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> web.StreamResponse:
        last_error: UpstreamError | None = None
        plan = ctx.decision.plan[: ctx.policy.routing.max_attempts]
        breakers = self.services.fleet.breakers
        slots = ctx.policy.routing.queue_timeout_ms > 0
        # with call slots the circuit is only looked at before the wait, and asked once the slot is taken: a
        # half-open probe is not held by a waiting call, and a circuit that opened meanwhile is seen
        may_call = breakers.available if slots else breakers.allow
        for position, model in enumerate(plan):
            last_hope = not ctx.attempts and position == len(plan) - 1
            allowed = may_call(model.name)
            if not allowed and not last_hope:
                continue                    # circuit open: skip, unless it is the last hope
            attempt = Attempt(model=model, started_s=time.perf_counter())
            if allowed and not slots:       # `allow` took the half-open probe, when the circuit was half-open
                attempt.probe_since_s = breakers.probe_since(model.name)
            ctx.attempts.append(attempt)
            self.services.fleet.started(model)          # waiting counts as in flight: the router sees the line
            try:
                if slots:
                    await self._take_slot(ctx, attempt, last_hope)
                energy = self.services.energy
                if energy is not None:
                    attempt.energy_id = energy.request_started(model.name, tracks_tokens=ctx.stream)
                return await self._attempt(ctx, attempt)
            except asyncio.CancelledError:  # the client left while the model worked: the call was cut short
                cut = SHUTTING_DOWN if ctx.cut_by_shutdown else CLIENT_DISCONNECTED
                attempt.error_type = attempt.error_type or cut
                if attempt.probe_since_s is not None:   # no verdict on the model: the next call may probe it
                    breakers.release_probe(model.name, attempt.probe_since_s)
                raise
            except UpstreamError as exc:
                exc = _unknown_previous_response(ctx, exc) or exc
                self._failed(ctx, attempt, exc)
                last_error = exc
                if ctx.bytes_sent or not _worth_another_model(exc):
                    break
            finally:
                await self._ended(ctx, attempt)
        if ctx.bytes_sent:                  # failed mid-stream: the client saw the state at the first byte
            ctx.error = last_error
            return ctx.response
        error = last_error or GatewayError("no model was tried")
        ctx.fallback_state = failed_state(ctx, error)
        if ctx.fallback_state != "none" and last_error is not None:     # why the last model tried failed
            ctx.fallback_reason = last_error.reason
        raise with_outcome_headers(ctx, error)

    async def _take_slot(self, ctx: RequestContext, attempt: Attempt, last_hope: bool) -> None:
        """Wait for a call slot on the attempt's model, by the tenant's priority, then ask its circuit; the
        attempt's time starts when the slot is taken (the wait is the gateway's, not the model's)."""
        model = attempt.model
        fleet = self.services.fleet
        priority = ctx.tenant.priority if ctx.tenant is not None else DEFAULT_PRIORITY
        attempt.dispatched = False
        started_s = time.perf_counter()
        pool = attempt.slot_pool = fleet.slots.pool(model.name, model.max_concurrency)
        try:
            attempt.queued_s = await fleet.slots.take(model.name, model.max_concurrency, priority,
                                                      ctx.policy.routing.queue_timeout_ms / 1000.0, pool=pool)
        except BaseException as exc:        # no slot: the deadline passed, or the client left
            attempt.queued_s = time.perf_counter() - started_s
            attempt.queue_result = "timeout" if isinstance(exc, ModelBusy) else "cancelled"
            raise
        attempt.holds_slot, attempt.queue_result = True, "granted"
        now_s = time.perf_counter()
        if fleet.breakers.allow(model.name):   # it took the half-open probe, when the circuit was half-open
            attempt.probe_since_s = fleet.breakers.probe_since(model.name)
        elif not last_hope:
            raise CircuitOpen(f"model '{model.name}' is unavailable: its circuit opened while the call waited "
                              f"for a slot")
        attempt.dispatched, attempt.started_s = True, now_s

    async def _attempt(self, ctx: RequestContext, attempt: Attempt) -> web.StreamResponse:
        services = self.services
        model = attempt.model
        headers = {"Content-Type": "application/json", "x-request-id": ctx.request_id,
                   **forwarded_headers(ctx.http.headers), **auth_headers(model, services.environ)}
        trace_headers = services.telemetry.start_attempt(ctx, attempt)
        if not trace_headers:               # telemetry off: pass the caller's trace context on as it came
            trace_headers = caller_trace_headers(ctx.http.headers)
        headers.update(trace_headers)
        with_options = model.server not in services.fleet.refuse_stream_options
        max_answer_bytes = ctx.runtime.policy.server.max_answer_bytes
        call = UpstreamCall(model, ctx.endpoint, upstream_body(ctx, model, stream_options=with_options), headers,
                            max_answer_bytes)
        if ctx.stream:
            try:
                return await relay_stream(ctx, attempt, services.transport, call, self._succeeded,
                                          energy=services.energy)
            except UpstreamStatus as exc:
                if ctx.bytes_sent or not with_options or not refuses_stream_options(exc) or \
                        not asks_only_usage(ctx.body.get("stream_options")):
                    raise           # (a field of the client's own in stream_options: the refusal is its own)
            # the model refused the usage the gateway asked for: this stream and its next ones go without it, as
            # the client sent them, and the gateway counts their usage
            services.fleet.refuse_stream_options.add(model.server)
            log.warning("model '%s' refuses stream_options: its streams are sent without them, their usage "
                        "counted by the gateway", model.name)
            call = UpstreamCall(model, ctx.endpoint, upstream_body(ctx, model, stream_options=False), headers,
                                max_answer_bytes)
            return await relay_stream(ctx, attempt, services.transport, call, self._succeeded,
                                      energy=services.energy)
        answer = await services.transport.complete(call)
        ctx.response_body = answer.body
        if ctx.endpoint == "responses":     # noted before the answer leaves: the client may continue it at once
            read_identity(attempt, answer.body)
            if is_background(ctx) and attempt.response_id and not has_ended(answer.body):
                # settled once it has ended, from now: a client leaving during the pin's write below leaves it
                # generated on its model all the same
                ctx.settling = services.settlements.start(ctx, attempt)
            if self.services.stores.pins.backing_off:   # unless its store is down: then not waited for
                self.services.background.spawn(self._pin(ctx, attempt), name="response-pin")
            else:
                await self._pin(ctx, attempt)
        self._succeeded(ctx, attempt)
        attempt.status = answer.status
        return web.Response(body=answer.raw, status=answer.status, content_type="application/json",
                            headers=response_headers(ctx))

    async def _pin(self, ctx: RequestContext, attempt: Attempt) -> None:
        """Note which model stored a Responses API answer (`store` is true unless the request says false), for
        the requests that will continue it (`gateway.routing.pins`)."""
        if attempt.response_id and ctx.body.get("store") is not False:
            await self.services.stores.pins.remember(ctx.tenant_name, attempt.response_id, attempt.model.name,
                                                     ctx.policy.routing.stored_response_ttl_s)

    def _succeeded(self, ctx: RequestContext, attempt: Attempt) -> None:
        """Called once the attempt has answered (for a stream: at its first event, its identity read)."""
        if ctx.stream and ctx.endpoint == "responses":
            self.services.background.spawn(self._pin(ctx, attempt), name="response-pin")
        ctx.fallback_state = fallback_state(ctx, succeeded=True)
        if ctx.fallback_state != "none":
            ctx.fallback_reason = ctx.attempts[-2].error_type
        fleet = self.services.fleet
        if fleet.calls_as(attempt.model):   # else a call to where a reload has since moved the model from
            fleet.record_success(attempt.model.name)

    def _failed(self, ctx: RequestContext, attempt: Attempt, exc: UpstreamError) -> None:
        """Record a failed attempt; only failures of the model's health count against its breaker."""
        attempt.error_type = exc.reason
        attempt.status = exc.status
        fleet = self.services.fleet
        if not exc.model_at_fault:          # never sent (no slot came, or its circuit opened): nothing learned
            return
        if not fleet.calls_as(attempt.model):   # a call to the server a reload has since moved the model from:
            return                              # its verdict is not the new server's
        if _model_unhealthy(exc):
            fleet.record_failure(attempt.model.name, exc)
        else:                               # it answered: the request, not the model, was at fault
            fleet.record_success(attempt.model.name)

    async def _ended(self, ctx: RequestContext, attempt: Attempt) -> None:
        attempt.ended_s = time.perf_counter()
        if ctx.settling is None and cut_while_generated(ctx, attempt):
            ctx.settling = self.services.settlements.start(ctx, attempt)    # settled once it has ended
        fleet = self.services.fleet
        fleet.finished(attempt.model)          # first: the in-flight count must always balance
        if attempt.holds_slot:
            fleet.slots.give_back(attempt.model.name, pool=attempt.slot_pool)
        if not attempt.dispatched:          # never sent (no slot came, or its circuit opened): no call, no span
            return
        if attempt.energy_id is not None and ctx.settling is None:     # (a background response's: at its end)
            self.services.energy.request_ended(attempt.energy_id)
        await settle_attempt(ctx, attempt)
        record = ctx.stream_record
        gaps_s = record.chunk_gaps_s if record is not None and attempt is ctx.attempts[-1] else ()
        self.services.telemetry.end_attempt(ctx, attempt, gaps_s)

    async def finish(self, ctx: RequestContext) -> None:
        return None


def _unknown_previous_response(ctx: RequestContext, exc: UpstreamError) -> UpstreamStatus | None:
    """A server's 404 naming the stored response a Responses API request continues (vLLM: "Response with id
    '...' not found."): the request's fault, as OpenAI's 400 previous_response_not_found says, not a model serving
    no such path: no other model has the response, and the model's circuit is not charged. None otherwise."""
    previous = ctx.body.get("previous_response_id") if ctx.endpoint == "responses" else None
    if not isinstance(exc, UpstreamStatus) or exc.upstream_status != 404 or not isinstance(previous, str) \
            or previous not in str(exc):
        return None
    message = f"Previous response with id '{previous}' not found."
    return UpstreamStatus(f"model '{ctx.attempts[-1].model.name}' answered 404: {message}", upstream_status=400,
                          body={"error": {"message": message, "type": "invalid_request_error",
                                          "param": "previous_response_id", "code": "previous_response_not_found"}})


def _worth_another_model(exc: UpstreamError) -> bool:
    """Connect errors, timeouts, 5xx, 429, refused credentials and context-length errors move to the next
    model."""
    return exc.retryable if isinstance(exc, UpstreamStatus) else True


def _model_unhealthy(exc: UpstreamError) -> bool:
    """Connect errors, timeouts, broken answers, 5xx, 429, a refused credential (401, 403) and a model or path
    the server does not serve (404, 405) say the model is unusable now; other 4xx do not."""
    if not isinstance(exc, UpstreamStatus):
        return True
    return exc.upstream_status == 429 or exc.upstream_status >= 500 or exc.reason in ("auth_failed", "not_found")
