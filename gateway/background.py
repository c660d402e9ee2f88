"""Background responses (the Responses API's `background: true`): answered at once, generated after.

The model server answers the create call at once with the response `queued` and no usage; it generates it
afterwards and keeps it, its end included, for `GET /v1/responses/{id}`. What the request used and cost is known
only then. So its finishes (the tenant's tokens settled and its budget charged, the cost, the ledger line, the
metrics and spans) wait for that end (`Pipeline._end`): the gateway asks the model server for the response, at
first after POLL_FIRST_S and then less and less often up to POLL_MOST_S apart, until its status is an end
(`ENDED`); a client's own retrieval or cancellation through the gateway that sees the end (or the end event of
its stream, read on) settles it at once. A streamed one is booked when its stream ends, unless the stream was
cut before (`cut_while_generated`): it is then watched as an unstreamed one is.

Meanwhile the request holds what its admission holds (its tenant's concurrent slot, its reserved tokens and
budget), as a request in flight does: the model works for it. Its model's call slot, and the router's count of
its calls in flight, are given back when the create call is answered: the server queues background work itself.

A response whose end the gateway does not see is booked with what it knows (its prompt, counted by the gateway)
and marked `unsettled`: one still running when the gateway stops (one last look is taken), one its server no
longer has (deleted, or the server restarted), one its server has not answered about for FAILING_FOR_MOST_S, or
one that does not end within `routing.stored_response_ttl_s` (its pin's life, after which the gateway could not
reach it either).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import orjson

from gateway.context import CLIENT_DISCONNECTED, SHUTTING_DOWN, Attempt, RequestContext
from gateway.errors import UpstreamError
from gateway.stages.answers import Estimate, count_usage, read_answer
from gateway.upstream import auth_headers, stored_response_url

log = logging.getLogger("gateway")

#: the statuses a response ends with (OpenAI's; vLLM's the same)
ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
#: the events a Responses API stream ends with, each carrying the response as it ended
END_EVENTS = frozenset(f"response.{status}" for status in ENDED)
#: what the ledger says of a background response whose end the gateway did not see
UNSETTLED = "unsettled"
#: the first look at a background response, after its create call; each next one 1.5 times later, at most POLL_MOST_S
POLL_FIRST_S = 1.0
POLL_GROWTH = 1.5
POLL_MOST_S = 30.0
POLL_SPREAD = 0.1
#: how long the last look at a response still running at stop may take
LAST_LOOK_S = 2.0
#: how long its server may fail every look (down, or answering nonsense) before a response is booked unsettled: a
#: server restarted meanwhile has forgotten it anyway (vLLM keeps its stored responses in memory)
FAILING_FOR_MOST_S = 600.0


def has_ended(body: dict) -> bool:
    """Whether a response's body says it has ended (a status of another type, from a broken server, says not)."""
    status = body.get("status")
    return isinstance(status, str) and status in ENDED


def is_background(ctx: RequestContext) -> bool:
    """Whether the request asks for a background response (`parse` admits it stored alone)."""
    return ctx.endpoint == "responses" and ctx.body.get("background") is True


def cut_while_generated(ctx: RequestContext, attempt: Attempt) -> bool:
    """Whether a streamed background response was cut before its end, once its server had named it: its client
    left, or the connection to its model broke after the client's first event. Its server generates it all the
    same (the client may read it on with `GET /v1/responses/{id}?stream=true&starting_after=N`): it is settled
    once it has ended."""
    return ctx.stream and attempt.status != 200 and attempt.response_id is not None and is_background(ctx) \
        and (ctx.bytes_sent or attempt.error_type in (CLIENT_DISCONNECTED, SHUTTING_DOWN))


def background_status(ctx: RequestContext) -> str | None:
    """How the request's background response ended (`ENDED`, or UNSETTLED); None for a request that made none
    (not a background request, or one that failed). A server may answer a background request ended already, and a
    stream relayed whole says how it ended in its last event."""
    if ctx.settling is not None:
        return ctx.settling.status
    if not is_background(ctx) or ctx.status != 200:
        return None
    if ctx.stream:              # the status its end event says
        return getattr(ctx.stream_record, "status", None)
    if ctx.response_body is None or not has_ended(ctx.response_body):
        return None
    return ctx.response_body["status"]


class BackgroundResponse:
    """One background response being generated: looked at on its model until it ends, then its request settled."""

    def __init__(self, settlements: Settlements, ctx: RequestContext, attempt: Attempt) -> None:
        self.settlements = settlements
        self.ctx = ctx
        self.attempt = attempt
        self.key = (ctx.tenant_name, attempt.response_id)
        self.status: str | None = None      # the last status seen; ENDED's, or UNSETTLED once given up on
        self.deleted = False                # its client deleted it through the gateway
        self._seen: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    def seen(self, body: dict) -> None:
        """A client's retrieval or cancellation saw the response ended: settle with it now."""
        if not self._seen.done():
            self._seen.set_result(body)

    def settle_later(self, finishing: Coroutine) -> None:
        """In the background: wait for the response's end, then run `finishing` (the request's finishes)."""
        self.settlements.services.background.spawn(self.settle(finishing), name="background-response")

    async def settle(self, finishing: Coroutine) -> None:
        """Wait for the response's end, fill in what the attempt used, then run the request's finishes."""
        try:
            body = await self._ended()
        except asyncio.CancelledError:      # the stop's background work ran out of time: booked as known
            body = None
        except Exception:                   # never left unbooked, its admission held, for a failure of our own
            log.exception("background response %s (request %s): its end could not be awaited; booked unsettled",
                          self.attempt.response_id, self.ctx.request_id)
            body = None
        try:
            self._read(body)
            if self.attempt.usage is None:  # none said: the gateway counts the prompt and what output it saw
                await count_usage(self.attempt, Estimate(self.ctx, self.attempt))
        finally:
            self.settlements.forget(self)
            await finishing

    async def _ended(self) -> dict | None:
        """The response as it ended, or None when its end was not seen (stop, gone from its server, too long)."""
        ctx, settlements = self.ctx, self.settlements
        deadline_s = time.monotonic() + ctx.policy.routing.stored_response_ttl_s
        wait_s = POLL_FIRST_S
        failing_since_s: float | None = None    # since when its server has not answered about it
        while True:
            if settlements.closing.is_set():
                return await self._last_look()
            closing = asyncio.ensure_future(settlements.closing.wait())
            try:
                # each wait drawn within POLL_SPREAD of its due: responses created in one burst are not looked at
                # together, round after round
                due_s = wait_s * random.uniform(1 - POLL_SPREAD, 1 + POLL_SPREAD)
                done, _ = await asyncio.wait((self._seen, closing), timeout=min(due_s, deadline_s - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
            if self._seen.done():
                return self._seen.result()
            if closing in done:
                continue
            if time.monotonic() >= deadline_s:
                log.warning("background response %s (request %s) did not end within %d s: booked unsettled",
                            self.attempt.response_id, ctx.request_id, ctx.policy.routing.stored_response_ttl_s)
                return None
            found = await self._look()
            if found is None or has_ended(found):
                return found
            if found:
                failing_since_s = None
            elif failing_since_s is None:
                failing_since_s = time.monotonic()
            elif time.monotonic() - failing_since_s >= FAILING_FOR_MOST_S:
                log.warning("background response %s (request %s): model '%s' has not answered about it for %d s: "
                            "booked unsettled", self.attempt.response_id, ctx.request_id, self.attempt.model.name,
                            FAILING_FOR_MOST_S)
                return None
            wait_s = min(wait_s * POLL_GROWTH, POLL_MOST_S)

    async def _last_look(self) -> dict | None:
        """The gateway stops: one look, the response's end if it has come."""
        found = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAST_LOOK_S):
                found = await self._look()
        return found if found is not None and has_ended(found) else None

    async def _look(self) -> dict | None:
        """The response as its server has it now; {} while the server cannot say (an error: looked at again
        later); None when the server no longer has it."""
        attempt, services = self.attempt, self.settlements.services
        model = attempt.model
        headers = {"x-request-id": self.ctx.request_id, **auth_headers(model, services.environ)}
        try:
            status, raw = await services.transport.ask(model, "GET", stored_response_url(model, attempt.response_id),
                                                       headers, self.ctx.policy.server.max_answer_bytes)
        except UpstreamError as exc:
            log.debug("background response %s: its server did not answer (%s); looked at again later",
                      attempt.response_id, exc)
            return {}
        if status == 404:
            # its client deleting it through the gateway is no news; its server losing it (a restart) is
            said = " (deleted by its client)" if self.deleted else ""
            (log.info if self.deleted else log.warning)(
                "background response %s (request %s) is no longer on model '%s'%s: booked unsettled",
                attempt.response_id, self.ctx.request_id, model.name, said)
            return None
        if status == 204:                   # no body, no response: a broken answer, looked at again later
            log.debug("background response %s: its server answered 204; looked at again later", attempt.response_id)
            return {}
        return orjson.loads(raw)            # (any other answer `ask` lets through is a JSON object)

    def _read(self, body: dict | None) -> None:
        """What the ended response used, on the attempt; its end time as seen (the GPU time it is priced by, and
        its operation's duration)."""
        attempt = self.attempt
        attempt.ended_s = time.perf_counter()
        if attempt.energy_id is not None:   # its GPU time ends now: its joules are those up to here
            self.settlements.services.energy.request_ended(attempt.energy_id)
        self.status = body.get("status") if body is not None else UNSETTLED
        if body is not None:
            read_answer(attempt, body, "responses")
            self.ctx.response_body = body


class Settlements:
    """The background responses of this process still being generated, by (tenant, response id)."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.closing = asyncio.Event()
        self._waiting: dict[tuple[str, str], BackgroundResponse] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def by_model(self) -> dict[str, int]:
        """How many are watched, by the model generating them."""
        return dict(Counter(response.attempt.model.name for response in self._waiting.values()))

    def start(self, ctx: RequestContext, attempt: Attempt) -> BackgroundResponse:
        """A background response the model has taken (queued): its request settles once it ends."""
        response = BackgroundResponse(self, ctx, attempt)
        self._waiting[response.key] = response
        return response

    def forget(self, response: BackgroundResponse) -> None:
        if self._waiting.get(response.key) is response:
            del self._waiting[response.key]

    def seen(self, tenant_name: str, response_id: str, body: object) -> None:
        """A client's call on a stored response got it as `body`: when that is its end, its request settles now."""
        response = self._waiting.get((tenant_name, response_id))
        if response is not None and isinstance(body, dict) and has_ended(body):
            response.seen(body)

    def deleted(self, tenant_name: str, response_id: str) -> None:
        """A client deleted its response through the gateway: one still watched is gone from its server."""
        response = self._waiting.get((tenant_name, response_id))
        if response is not None:
            response.deleted = True

    def close(self) -> None:
        """The gateway stops: each response still generated is looked at once more and settled with what is
        known then (`unsettled` when it has not ended)."""
        if self._waiting:
            log.warning("%d background response(s) still generated at stop: settled with what is known now, those "
                        "not ended booked unsettled (their prompt alone)", len(self._waiting))
        self.closing.set()

