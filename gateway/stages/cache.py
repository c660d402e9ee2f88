"""cache: exact-match answers from the store, tenant-scoped, single-flight, stream replay.

Two stages. `Lookup`, before admission, works out the key and starts the
store read; `Cache`, after admission, awaits it, so the read and the
admission's round trip overlap and a hit waits for one, not two. A refused
request is never answered from the cache: only `Cache` answers.

A hit answers here; a miss lets the call go on and its finish stores the
answer (in the background for a remote store, at once in-process), so a cache
write never waits for a store round trip. Identical requests arriving while the first is in flight wait for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable
from decimal import Decimal

import orjson
from aiohttp import web

from gateway.cache.assemble import UNFOLDABLE
from gateway.cache.entry import (CacheEntry, audio_expired, decode_entry, encode_entry, entry_from_response,
                                 entry_from_stream)
from gateway.cache.key import cache_key, cache_use, is_cacheable
from gateway.cache.replay import replay_sse
from gateway.cache.singleflight import FlightAbandoned, LocalFlight, SingleFlight
from gateway.context import Decision, RequestContext
from gateway.cost import token_cost_usd
from gateway.policy.model import Model
from gateway.responses import response_headers
from gateway.routing.predict import meets_hard_terms
from gateway.stages.relay import SSE_HEADERS, ClientWriter
from gateway.stages.route import SLA_REFUSAL
from gateway.tokens import usage_body, usage_from_response

log = logging.getLogger(__name__)

#: how long identical requests wait for the first one before calling upstream themselves
SINGLE_FLIGHT_TIMEOUT_S = 30.0
#: the longest a leader keeps its flight (and the cross-replica lock): the longest upstream call allowed
LEADER_LIMIT_S = 600.0
#: the longest a leader keeps the cross-replica lock waiting for its answer's cache write
STORED_WAIT_S = 2.0
#: ctx.extra: the entry an answer on measured GPUs was stored as, until the price of its joules joins its cost
STORED_ENTRY = "cache_stored_entry"


class Flight:
    """This request leads a single flight: followers get what its finish hands over; the cross-replica lock
    is given back once `stored` says the answer's cache write is over (or there was none), by the write itself
    when the lock's `token` is known here (`stored` is then True)."""

    def __init__(self, task: asyncio.Task, done: asyncio.Future, stored: asyncio.Future,
                 token: str | None = None) -> None:
        self.task, self.done, self.stored, self.token = task, done, stored, token


class Lookup:
    """Works out whether and how the request uses the cache, and starts the store read."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        route = ctx.decision.route
        lookup, store = cache_use(ctx.http.headers, ctx.body)
        if not is_cacheable(ctx.body, route.cache, endpoint=ctx.endpoint) or not (lookup or store):
            return None
        ctx.cache_key = cache_key(prefix=self.services.stores.key_prefix, tenant=ctx.tenant_name,
                                  route=route.name, resolved=route.name, endpoint=ctx.endpoint, body=ctx.body)
        ctx.cache_store = store
        ctx.cache_lookup = lookup
        stores = self.services.stores
        if not lookup or not stores.cache.remote:   # an in-process store answers at once: nothing to overlap
            return None
        if _across_replicas(ctx, stores.singleflight) and SLA_REFUSAL not in ctx.extra:
            # a miss also tries the cross-replica lock, in the same round trip: a miss that leads waits for no more
            ctx.cache_read = asyncio.ensure_future(stores.singleflight.read_or_acquire(ctx.cache_key))
        else:
            ctx.cache_read = asyncio.ensure_future(_no_lock(stores.cache.get(ctx.cache_key)))
        return None

    async def finish(self, ctx: RequestContext) -> None:
        read, ctx.cache_read = ctx.cache_read, None
        if read is None:
            return
        singleflight = self.services.stores.singleflight
        if _across_replicas(ctx, singleflight):     # refused, or the client left, before `Cache` took it
            self.services.background.spawn(_give_back(read, singleflight, ctx.cache_key), name="cache-lock")
        else:
            read.add_done_callback(_unheard)


def _across_replicas(ctx: RequestContext, singleflight: SingleFlight) -> bool:
    """Whether identical requests wait for this one across replicas, through the Redis lock its read tries: a
    shared lock, and an answer that will be stored for them to find (not `no-store`)."""
    return ctx.cache_store and not singleflight.local_only


def _entry(raw: bytes | None) -> CacheEntry | None:
    """The entry stored as `raw`; None for none (or one that does not decode)."""
    return decode_entry(raw) if raw is not None else None


def _unheard(read: asyncio.Future) -> None:
    """Take a dropped read's outcome, so asyncio does not report it as never retrieved."""
    if not read.cancelled():
        read.exception()


async def _no_lock(read: Awaitable[bytes | None]) -> tuple[bytes | None, None]:
    """A plain read, shaped as `read_or_acquire`'s answer: no lock taken."""
    return await read, None


async def _give_back(read: asyncio.Future, singleflight: SingleFlight, key: str) -> None:
    """Let a read nobody took end, and give back the lock it took: held, it would keep other replicas waiting."""
    await asyncio.wait((read,))
    if read.cancelled() or read.exception() is not None:
        return
    _, token = read.result()
    if token is not None:
        await singleflight.give_back(key, token)


class Cache:
    """Answers from the cache when it can; otherwise leads or follows a single flight."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> web.StreamResponse | None:
        if ctx.cache_key is None or not ctx.cache_lookup:
            if (refusal := ctx.extra.get(SLA_REFUSAL)) is not None:
                raise refusal               # no lookup after all: nothing but a model could answer it
            return None                     # no cache, or no-cache: the fresh answer is stored, nothing is read
        ctx.cache_status = "miss"
        with self.services.telemetry.cache_span(ctx):
            raw, token = await self._read(ctx)
            stored = self._servable(ctx, _entry(raw))
            if stored is None and (refusal := ctx.extra.get(SLA_REFUSAL)) is not None:
                raise refusal               # no model may serve it: a stored answer was its only way
            # another model's answer counts as none: identical requests share a call
            entry = stored or self._servable(ctx, await self._single_flight(ctx, raw is None, token))
            if entry is not None:
                ctx.cache_status = "hit"
                ctx.cache_model = entry.model
            elif not getattr(self.services.stores.cache, "healthy", True):
                ctx.cache_status = "bypass"     # the store did not answer: no lookup was made, nothing missed
        return await self._answer(ctx, entry) if entry is not None else None

    async def _read(self, ctx: RequestContext) -> tuple[bytes | None, str | None]:
        """The stored bytes and the cross-replica lock token `Lookup`'s read got; read now for an in-process
        store. The read is left to `Lookup.finish` until it lands: a client leaving meanwhile does not keep the
        lock it took."""
        read = ctx.cache_read
        if read is None:
            return await self.services.stores.cache.get(ctx.cache_key), None
        answer = await asyncio.shield(read)
        ctx.cache_read = None
        return answer

    @staticmethod
    def _servable(ctx: RequestContext, entry: CacheEntry | None) -> CacheEntry | None:
        """`entry`, or None when its model may not answer this request (it calls, and its answer replaces it), or
        it answers another endpoint (the key names the endpoint: only a hand-written entry could), or its audio has
        expired (a next turn naming it would be refused)."""
        if entry is None or entry.endpoint != ctx.endpoint or audio_expired(entry.body, time.time()):
            return None
        return entry if may_answer(ctx.decision, entry.model, entry.upstream_model) else None

    async def _single_flight(self, ctx: RequestContext, tried: bool = False,
                             token: str | None = None) -> CacheEntry | None:
        """Follow an identical request in flight (its entry), or lead one (None: call upstream). `tried`: the
        read found no entry and tried the cross-replica lock (`token`: this request holds it)."""
        singleflight = self.services.stores.singleflight
        if not _across_replicas(ctx, singleflight):
            # no-store: nothing will be stored for other replicas to find, so they are not made to wait
            flight = singleflight.try_lead(ctx.cache_key)
            if flight is not None:
                ctx.extra["flight"] = flight
                return None
            try:
                return await singleflight.follow(ctx.cache_key, SINGLE_FLIGHT_TIMEOUT_S)
            except FlightAbandoned:
                return None
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        stored: asyncio.Future = asyncio.get_running_loop().create_future()
        leading = asyncio.Event()
        flying = False                      # once the run has started, the lock `token` holds is the run's to give back

        async def fly() -> tuple[CacheEntry | None, bool]:
            nonlocal flying
            flying = True
            return await singleflight.run(ctx.cache_key, lead, SINGLE_FLIGHT_TIMEOUT_S,
                                          poll_fn=lambda: self._poll(ctx), hold=lambda: _until_stored(stored),
                                          tried=tried, token=token)

        async def lead() -> CacheEntry | None:
            leading.set()
            # bounded: a leader whose finish never came must not hold the cross-replica lock for ever
            return await asyncio.wait_for(done, LEADER_LIMIT_S)

        task = asyncio.ensure_future(fly())
        leader_started = asyncio.ensure_future(leading.wait())
        try:
            await asyncio.wait({task, leader_started}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:      # the client left: stop waiting (a leader's followers go direct)
            leader_started.cancel()
            task.cancel()                   # its lock is given back as it unwinds, held until then
            self.services.background.spawn(_quietly(task), name="single-flight")
            if token is not None and not flying:    # and the lock this request took, as the run never started
                self.services.background.spawn(singleflight.give_back(ctx.cache_key, token), name="cache-lock")
            raise
        if leading.is_set():
            ctx.extra["flight"] = Flight(task, done, stored, token)
            return None
        leader_started.cancel()
        try:
            entry, _ = task.result()
        except FlightAbandoned:
            return None
        return entry

    async def _poll(self, ctx: RequestContext) -> CacheEntry | None:
        """The entry another replica's leader stored, once there is one this request may be answered with."""
        return self._servable(ctx, _entry(await self.services.stores.cache.get(ctx.cache_key)))

    async def _answer(self, ctx: RequestContext, entry: CacheEntry) -> web.StreamResponse:
        """Answer from a cached entry: JSON, or a replayed SSE stream. It costs nothing."""
        usage = usage_from_response(entry.body)
        if usage is not None:
            ctx.usage = usage
        if entry.cost_usd is not None:
            ctx.cache_saved_usd = entry.cost_usd
        elif ctx.decision.plan and usage is not None:
            ctx.cache_saved_usd = token_cost_usd(ctx.decision.plan[0], usage)
        ctx.cost_usd = Decimal(0)
        headers = {**response_headers(ctx), "x-gateway-cost-usd": "0"}
        if not ctx.stream:
            return web.Response(body=orjson.dumps(entry.body), content_type="application/json",
                                headers=headers)
        events = replay_sse(entry, include_usage=ctx.include_usage)     # before the head: a failure is a plain 500
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        ctx.response = response
        await response.prepare(ctx.http)
        ctx.bytes_sent = True
        writer = ClientWriter(ctx)
        try:
            for event in events:
                await writer.write(event)
            await writer.write_eof()
        except ConnectionError:             # the client left, or took nothing for client_timeout_s, before the end
            ctx.status = 499
            ctx.cache_saved_usd = Decimal(0)    # an answer not delivered saved nothing
        except asyncio.CancelledError:      # the client left while a write waited for it (or the drain ran out)
            ctx.cache_saved_usd = Decimal(0)
            raise
        return response

    async def finish(self, ctx: RequestContext) -> None:
        flight: Flight | None = ctx.extra.pop("flight", None)
        stored, token = (flight.stored, flight.token) if isinstance(flight, Flight) else (None, None)
        try:
            entry = None
            try:
                fresh = ctx.cache_key is not None and ctx.cache_status in ("miss", "bypass")
                entry = self._fresh_entry(ctx) if fresh else None     # a request the cache is not for: no work
            finally:                        # whatever happened, the followers are let go
                if isinstance(flight, LocalFlight):
                    flight.land(entry)
                elif flight is not None:
                    if not flight.done.done():
                        flight.done.set_result(entry)
                    self.services.background.spawn(_quietly(flight.task), name="single-flight")
            stored = self._store(ctx, entry, stored, token)
        finally:
            if stored is not None and not stored.done():
                stored.set_result(None)     # nothing is written: the flight's lock may go now

    def _store(self, ctx: RequestContext, entry: CacheEntry | None, stored: asyncio.Future | None,
               token: str | None = None) -> asyncio.Future | None:
        """Write a fresh answer (in the background to a remote store, at once in-process), `stored` set once it
        is in (True when the write also released the flight's lock, whose `token` it was given); returns
        `stored` when nothing is written or the write is done (None when a write under way took it over)."""
        if entry is None or not ctx.cache_store:
            return stored
        data = encode_entry(entry)
        store = self.services.stores.cache
        if data is None or not getattr(store, "healthy", True):
            return stored                   # too large, or the store is down: nothing will be stored
        ctx.cache_status = "stored"
        if ctx.attempts and ctx.attempts[-1].energy_id is not None:    # its energy's price is still to come
            ctx.extra[STORED_ENTRY] = entry
        if ctx.response is not None and not ctx.response.prepared:
            ctx.response.headers["x-gateway-cache"] = "stored"
        ttl_s = ctx.decision.route.cache.ttl_s
        if not store.remote:                # in-process: written now, as cheaply as a task could start
            store.put(ctx.cache_key, data, ttl_s)
            return stored
        write = store.set(ctx.cache_key, data, ttl_s) if token is None or ttl_s <= 0 else \
            self.services.stores.singleflight.write_and_give_back(ctx.cache_key, data, ttl_s, token)
        self.services.background.spawn(_written(write, stored), name="cache-write")
        return None

    @staticmethod
    def _fresh_entry(ctx: RequestContext) -> CacheEntry | None:
        """The entry a successful answer makes, or None for errors and cut streams."""
        if ctx.error is not None or ctx.status != 200 or not ctx.attempts or ctx.attempts[-1].status != 200:
            return None
        record = ctx.stream_record
        if ctx.response_body is None and record is not None and record.assembled is None:
            log.info("request %s: answer not cached, %s", ctx.request_id, record.unassembled)    # given up as it passed
            return None
        try:
            if ctx.response_body is not None:
                entry = entry_from_response(ctx.endpoint, ctx.response_body)
            else:
                entry = entry_from_stream(record.assembled) if record is not None else None
        except UNFOLDABLE as exc:           # an answer of a shape we cannot keep
            log.info("request %s: answer not cached, its shape is not one the cache can replay (%s: %s)",
                     ctx.request_id, type(exc).__name__, exc)
            return None
        if entry is None:
            return None
        answered = ctx.attempts[-1]
        body = entry.body
        if not body.get("usage") and (ctx.usage.input_tokens or ctx.usage.output_tokens):
            # the model reported none: the gateway's count (the one billed, and the one a live stream that asked
            # for usage got) goes with the answer, so a hit streamed to such a client ends with it too
            body = {**body, "usage": usage_body(ctx.usage)}
        return CacheEntry(entry.endpoint, body, entry.created_unix_s, cost_usd=answered.cost_usd,
                          model=answered.model.name, upstream_model=answered.model.upstream_model)


def may_answer(decision: Decision, model: str | None, upstream_model: str | None = None) -> bool:
    """Whether a stored answer from `model` (which called `upstream_model`) may answer a request routed as
    `decision`.

    Yes for a model its plan would call (a fallback included), and for a candidate dropped only for speed,
    price or an open circuit, which a stored answer no longer has; no for one below the tier the request asks
    for or without its context, for a model the route no longer has, for a model the policy now points at
    another upstream model (a new model version behind the same name: its answers are its own), and for an
    entry that names none. An entry stored before entries named their upstream model is judged by name alone.
    """
    if model is None:
        return False

    def same(candidate: Model) -> bool:
        return candidate.name == model and (upstream_model is None or candidate.upstream_model == upstream_model)

    return any(same(m) for m in decision.plan) or \
        any(same(c.model) and meets_hard_terms(c) for c in decision.candidates)


async def _until_stored(stored: asyncio.Future) -> bool:
    """Wait for the answer's cache write, at most STORED_WAIT_S: then the lock goes anyway. True when the write
    released the lock itself."""
    try:
        return await asyncio.wait_for(stored, STORED_WAIT_S) is True
    except TimeoutError:
        log.debug("a cache write took over %s s; the single-flight lock is given back without it", STORED_WAIT_S)
        return False


def reprice_stored(services, ctx: RequestContext, extra_usd: Decimal) -> None:
    """Store the request's answer again with the price of its measured energy added to its cost (its joules are
    known only after the answer was stored), so a hit on it saves what it cost, as the ledger charged it."""
    entry = ctx.extra.pop(STORED_ENTRY, None)
    if entry is None or not extra_usd:
        return
    data = encode_entry(dataclasses.replace(entry, cost_usd=(entry.cost_usd or Decimal(0)) + extra_usd))
    store = services.stores.cache
    if data is None or not getattr(store, "healthy", True):
        return
    ttl_s = ctx.decision.route.cache.ttl_s
    if not store.remote:
        store.put(ctx.cache_key, data, ttl_s)
    else:
        services.background.spawn(store.set(ctx.cache_key, data, ttl_s), name="cache-write")


async def _written(write: Awaitable[bool | None], stored: asyncio.Future | None) -> None:
    """A cache write, then `stored` set (True when the write released the lock too): a leader gives its lock back
    once the answer is in the cache."""
    released = None
    try:
        released = await write
    finally:
        if stored is not None and not stored.done():
            stored.set_result(released is True)


async def _quietly(task: asyncio.Task) -> None:
    """Let a leader's flight end; a follower's fate is its own business."""
    try:
        await task
    except (FlightAbandoned, asyncio.CancelledError):
        pass
