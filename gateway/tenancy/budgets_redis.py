"""Budgets in Redis: shared by replicas, kept across restarts until the period ends.

A tenant's charges of CHARGE_FLUSH_S, and the holds they give back, go to
Redis as one numbered flush part, in one script call (`budget_lua.FLUSH`)
that applies a part only if this replica's applied-flush marker is below its
number. So a part can be sent again without being applied twice: one Redis
did not answer (lost, or applied with its reply lost) is carried into the
tenant's next call, its next flush or a retry every STORE_RETRY_S, for up to
LATE_FLUSH_S, rather than leaving its holds taken for the 15-minute in-flight
TTL and its charges out of the spend. A call carries every part before its
own not known applied, so the marker never passes a part that may still land.
This replica's reads and reservations count the parts the marker does not
hold yet, each once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway.policy.model import Tenant
from gateway.store_guard import ADMISSION_BACKOFF_S, STORE_DOWN, OnStoreFailure, RedisClock, StoreGuard
from gateway.tenancy import budget_lua
from gateway.tenancy.budgets import (CHARGE_FLUSH_S, READ_REUSE_S, RETENTION_S, BudgetState, Hold, Periods,
                                     evaluate, limit_nanos, retention_s, to_nanos, to_usd)
from gateway.tenancy.limits import INFLIGHT_TTL_S, STORE_RETRY_S

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

#: how long a flush part Redis did not answer is sent again (every STORE_RETRY_S) before its charges count as lost
#: (its holds then lapse with their TTL): as long as a rate-limit give-back is (admit's LATE_END_S)
LATE_FLUSH_S = 60.0
#: how long one flush call waits for Redis (at least the store timeout): it holds up no response, and a Redis
#: slower than the store timeout must not see every flush it applied sent again and then counted lost
FLUSH_TIMEOUT_S = 1.0


class _Charges:
    """A tenant's charges of one flush (a part): nano-dollars and retention by key, and the holds they give back."""

    __slots__ = ("landed", "flush", "nanos", "retention_s", "charges", "seq", "released", "waiting", "failed_at_s")

    def __init__(self, landed: asyncio.Future, seq: int) -> None:
        self.landed = landed                # set once they are in the store, or their loss counted
        self.flush: asyncio.Task | None = None      # its first try
        self.nanos: dict[str, int] = {}
        self.retention_s: dict[str, int] = {}
        self.charges = 0                    # each request's charge adds two keys' nanos, and one here
        self.seq = seq                      # this replica's flush number: the store applies parts in this order
        self.released: list[str] = []       # the members of the holds given back
        self.waiting = 0                    # callers waiting for it to land (a drain that runs out cancels them)
        self.failed_at_s: float | None = None   # when a call carrying it first went unanswered (monotonic)

    def add(self, key: str, nanos: int, retention_s: int) -> None:
        self.nanos[key] = self.nanos.get(key, 0) + nanos
        self.retention_s[key] = max(self.retention_s.get(key, 0), retention_s)

    def released_args(self) -> list[int | str]:
        """The holds it gives back as the reservation and usage scripts read them: how many, then their members."""
        return [len(self.released), *self.released]

    def args(self, key_index: dict[str, int]) -> list[int | str]:
        """The part as the flush script reads it; `key_index`: each total's place in KEYS (from 1)."""
        args: list[int | str] = [self.seq, len(self.nanos), len(self.released)]
        for key, nanos in self.nanos.items():
            args += (key_index[key], nanos, self.retention_s[key])
        return args + self.released


class RedisBudgets:
    """Budgets in Redis, shared by replicas and kept across restarts until the period ends."""

    remote = True

    def __init__(self, client: Redis, prefix: str = "gw", timeout_s: float = 0.05,
                 on_store_failure: OnStoreFailure = "allow",
                 clock: Callable[[], float] = time.time, *, backoff_s: float = ADMISSION_BACKOFF_S,
                 hold_ttl_s: float = INFLIGHT_TTL_S, retry_s: float = STORE_RETRY_S,
                 late_flush_s: float = LATE_FLUSH_S) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.on_store_failure = on_store_failure
        self.guard = StoreGuard("budget store", timeout_s, backoff_s=backoff_s, logger=log,
                                meanwhile=f"on_store_failure={on_store_failure}")
        self._recent: dict[str, tuple[float, BudgetState]] = {}     # tenant -> (read at, a state with room)
        self._charges: dict[str, int] = {}      # tenant -> charges begun or ended here (a read spanning one is stale)
        self._gathering: dict[str, _Charges] = {}   # tenant -> charges waiting for the next flush
        self._unlanded: dict[str, list[_Charges]] = {}  # tenant -> parts not known applied (gathering, sent), by seq
        self._sending: dict[str, asyncio.Lock] = {}     # tenant -> held while a flush call of the tenant is out
        self._retrying: dict[str, asyncio.Task] = {}    # tenant -> the retry of its unanswered parts
        self._replica = secrets.token_hex(8)    # names this replica's applied-flush marker
        self._flushes = 0                       # flush parts begun, numbered from 1
        self.charges_lost = 0                   # charges of parts given up (not sent, or unanswered for too long)
        self.hold_ttl_ms = int(hold_ttl_s * 1000)   # a hold its replica never gave back (it died) lapses then
        self.retry_s = retry_s
        self.late_flush_s = late_flush_s
        self.redis_clock = RedisClock()         # read from each reservation's reply: where the next's deadline lies
        self.reserve_script = client.register_script(budget_lua.RESERVE)
        self.flush_script = client.register_script(budget_lua.FLUSH)
        self.usage_script = client.register_script(budget_lua.USAGE)

    async def warm_up(self) -> None:
        """Load the scripts now, so a first reservation or flush does not spend a round trip on them."""
        for script in (self.reserve_script, self.flush_script, self.usage_script):
            await self.client.script_load(script.script)

    @property
    def store_failures(self) -> int:
        """Store calls that failed or timed out (checks, flushes and their retries), and charges lost."""
        return self.guard.failures + self.charges_lost

    def keys(self, tenant: str, periods: Periods) -> tuple[str, str]:
        """The day and month total keys of a tenant, on the tenant's cluster slot."""
        base = f"{self.prefix}:{{{tenant}}}:budget"
        return f"{base}:day:{periods.day}", f"{base}:month:{periods.month}"

    def holds_keys(self, tenant: str) -> tuple[str, str]:
        """The tenant's holds (a sorted set by expiry) and their sum, on the tenant's cluster slot."""
        base = f"{self.prefix}:{{{tenant}}}:budget"
        return f"{base}:holds", f"{base}:held"

    def applied_key(self, tenant: str) -> str:
        """The number of this replica's last flush part the store has applied (by the flush script itself)."""
        return f"{self.prefix}:{{{tenant}}}:budget:applied:{self._replica}"

    async def check(self, tenant: Tenant, now_s: float | None = None) -> BudgetState:
        """The tenant's spend so far; no store call when the tenant has no budget."""
        if not tenant.budget.limited:
            return BudgetState(tenant.name, tenant.budget)
        now_s = self.clock() if now_s is None else now_s
        recent = self._recent.get(tenant.name)
        if recent is not None and 0 <= now_s - recent[0] < READ_REUSE_S and recent[1].budget == tenant.budget:
            return recent[1]
        charges = self._charges.get(tenant.name, 0)
        state = await self.read(tenant, now_s)
        if state.available and not state.exhausted and self._charges.get(tenant.name, 0) == charges:
            self._recent[tenant.name] = (now_s, state)
        return state

    async def read(self, tenant: Tenant, now_s: float | None = None) -> BudgetState:
        """The tenant's spend read from the store; when it is down, per `on_store_failure`."""
        now_s = self.clock() if now_s is None else now_s
        keys = self.keys(tenant.name, Periods.at(now_s))
        reply = await self.guard.run(lambda: self.client.mget(*keys, self.applied_key(tenant.name)))
        if reply is STORE_DOWN:
            return self._store_down(tenant)
        applied = int(reply[2] or 0)
        self._land_applied(tenant.name, applied)
        day_pending, month_pending = self._pending(tenant.name, keys, applied)
        return evaluate(tenant, int(reply[0] or 0) + day_pending, int(reply[1] or 0) + month_pending, now_s)

    def _land_applied(self, tenant_name: str, applied: int) -> None:
        """Parts waiting for a retry that the store's marker says it applied (their reply was lost) have landed:
        they are no longer retried, nor counted lost at the end of the retry window."""
        for part in [part for part in self._unlanded.get(tenant_name, ()) if part.seq <= applied
                     and part.failed_at_s is not None]:
            self._land(tenant_name, part)

    def _pending(self, tenant_name: str, keys: tuple[str, str], applied: int) -> tuple[int, int]:
        """This replica's day and month nanos the store does not hold yet (`applied`: its marker as read):
        gathering, sent and not applied, or waiting for a retry."""
        unlanded = [part for part in self._unlanded.get(tenant_name, ()) if part.seq > applied]
        day_key, month_key = keys
        return (sum(part.nanos.get(day_key, 0) for part in unlanded),
                sum(part.nanos.get(month_key, 0) for part in unlanded))

    async def reserve(self, tenant: Tenant, cost_usd: Decimal, ticket: str,
                      now_s: float | None = None) -> tuple[BudgetState, Hold | None]:
        """Check the budget with what the tenant's requests in flight hold (on every replica), and hold
        `cost_usd` when it fits: one script call, in place of the check's read. A request predicted to cost
        nothing is only checked (its read may be reused).

        When the store does not answer a script it was sent, the hold is returned all the same: a stalled
        Redis may still run it, and giving back a hold it never took is harmless.
        """
        nanos = to_nanos(cost_usd)
        if nanos == 0 or not tenant.budget.limited:
            return await self.check(tenant, now_s), None
        now_s = self.clock() if now_s is None else now_s
        day_key, month_key = self.keys(tenant.name, Periods.at(now_s))
        hold = Hold(ticket, nanos)
        parts = self._unlanded.get(tenant.name, ())     # this replica's flush parts the store may not hold yet
        pending: list[int | str] = []
        for part in parts:
            pending += (part.seq, part.nanos.get(day_key, 0), part.nanos.get(month_key, 0), *part.released_args())
        budget = tenant.budget
        args = [limit_nanos(budget.usd_per_day), limit_nanos(budget.usd_per_month), nanos, hold.member,
                self.hold_ttl_ms, len(parts), *pending, self.redis_clock.deadline_ms(self.guard.timeout_s)]
        sent = not self.guard.backing_off   # else the guard answers without sending anything
        reply = await self.guard.run(lambda: self.reserve_script(
            keys=[day_key, month_key, self.applied_key(tenant.name), *self.holds_keys(tenant.name)], args=args))
        if reply is STORE_DOWN:
            return self._store_down(tenant), hold if sent else None
        reserved, day_nanos, month_nanos, held_nanos, redis_now_ms, late = (int(v) for v in reply)
        self.redis_clock.learn(redis_now_ms)
        if late:                            # answered in time yet late: a clock stepped since the last reply
            return self._store_down(tenant), None
        state = evaluate(tenant, day_nanos, month_nanos, now_s, held_nanos, nanos)
        return state, hold if reserved else None

    def _store_down(self, tenant: Tenant) -> BudgetState:
        if self.on_store_failure == "allow":
            return BudgetState(tenant.name, tenant.budget, available=False)
        return BudgetState(tenant.name, tenant.budget, exhausted=True, reason="store_unavailable",
                           available=False)

    async def charge(self, tenant: Tenant, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Add a cost to the day and month totals; returns once it is in the store (or its loss counted).

        The tenant's charges of the next CHARGE_FLUSH_S go together in one script call, so a request costs a
        share of a round trip, not one; this replica's reads count them while they wait.
        """
        await self._gather(tenant, None, cost_usd, now_s)

    async def settle(self, tenant: Tenant, hold: Hold, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Give back a request's hold and charge its real cost, in the same script call as the tenant's other
        charges of the moment; returns once both are in the store (or their loss counted)."""
        await self._gather(tenant, hold, cost_usd, now_s)

    async def _gather(self, tenant: Tenant, hold: Hold | None, cost_usd: Decimal, now_s: float | None) -> None:
        """Add a charge, and a hold to give back, to the tenant's next flush, and wait for it to land."""
        now_s = self.clock() if now_s is None else now_s
        periods, nanos = Periods.at(now_s), to_nanos(cost_usd)
        if nanos == 0 and hold is None:
            return
        self._charge_mark(tenant.name)          # the next check reads the new total
        gathering = self._gathering.get(tenant.name)
        if gathering is None:
            self._flushes += 1
            gathering = _Charges(asyncio.get_running_loop().create_future(), self._flushes)
            self._gathering[tenant.name] = gathering
            self._unlanded.setdefault(tenant.name, []).append(gathering)
            gathering.flush = asyncio.ensure_future(self._flush(tenant.name, gathering))
            gathering.flush.add_done_callback(functools.partial(self._first_try_ended, tenant.name, gathering))
        if nanos:
            day_key, month_key = self.keys(tenant.name, periods)
            gathering.add(day_key, nanos, retention_s(periods.day_end_s, now_s))
            gathering.add(month_key, nanos, retention_s(periods.month_end_s, now_s))
        if hold is not None:
            gathering.released.append(hold.member)
        gathering.charges += 1
        gathering.waiting += 1
        try:
            await asyncio.shield(gathering.landed)
        finally:
            gathering.waiting -= 1
            if not gathering.landed.done():     # cancelled (a drain ran out): retries nobody waits for stop
                self._stop_unwatched_retry(tenant.name)

    async def _flush(self, tenant_name: str, gathering: _Charges) -> None:
        """After CHARGE_FLUSH_S, send the tenant's gathered charges, once the tenant's call before (if any) was
        answered or timed out, with the parts before them not known applied."""
        await asyncio.sleep(CHARGE_FLUSH_S)
        if self._gathering.get(tenant_name) is gathering:
            del self._gathering[tenant_name]    # closed: later charges gather for the next flush
        async with self._lock(tenant_name):
            if not gathering.landed.done() and gathering.failed_at_s is None:   # else a call before carried it
                await self._send(tenant_name)

    def _first_try_ended(self, tenant_name: str, gathering: _Charges, _flush: asyncio.Task) -> None:
        """Its first try has ended (or was cancelled, perhaps before it ever ran): charges never sent, nor carried
        by a call left to retry, are lost, and counted."""
        if gathering.failed_at_s is None:
            self._land(tenant_name, gathering, lost=True)

    async def _send(self, tenant_name: str) -> None:
        """One flush call carrying every closed part of the tenant not known applied, oldest first (the caller
        holds the tenant's lock: no other call of it is out). Answered, they have all landed; unanswered, they
        are retried."""
        gathering = self._gathering.get(tenant_name)
        parts = [part for part in self._unlanded.get(tenant_name, ()) if part is not gathering]
        if not parts:
            return
        try:
            keys, args = self._flush_call(tenant_name, parts)
            reply = await self.guard.run(lambda: self.flush_script(keys=keys, args=args), after_response=True,
                                         timeout_s=max(self.guard.timeout_s, FLUSH_TIMEOUT_S))
        except Exception:                   # not the store's failure: ours; the charges are lost, and said so
            log.exception("budget charges of tenant %s were not sent", tenant_name)
            self._give_up(tenant_name, parts)
            return
        if reply is not STORE_DOWN:
            for part in parts:
                self._land(tenant_name, part)
            return
        now_s = time.monotonic()
        for part in parts:
            if part.failed_at_s is None:
                part.failed_at_s = now_s
        self._retry_later(tenant_name)

    def _flush_call(self, tenant_name: str, parts: list[_Charges]) -> tuple[list[str], list[int | str]]:
        """The flush script's keys and arguments for `parts` (see budget_lua.FLUSH)."""
        keys = [self.applied_key(tenant_name), *self.holds_keys(tenant_name)]
        key_index: dict[str, int] = {}
        args: list[int | str] = [RETENTION_S, len(parts)]
        for part in parts:
            for key in part.nanos:
                if key not in key_index:
                    keys.append(key)
                    key_index[key] = len(keys)      # Lua counts KEYS from 1
            args += part.args(key_index)
        return keys, args

    def _retry_later(self, tenant_name: str) -> None:
        """Have the tenant's unanswered parts sent again; given up at once when nobody waits for them any more."""
        failed = self._failed(tenant_name)
        if not any(part.waiting for part in failed):
            self._give_up(tenant_name, failed)
        elif tenant_name not in self._retrying:
            self._retrying[tenant_name] = asyncio.ensure_future(self._retry(tenant_name))

    async def _retry(self, tenant_name: str) -> None:
        """Send the tenant's unanswered parts again every `retry_s` until Redis answers, each for up to
        `late_flush_s` after its first failure; cancelled (a drain that ran out), the rest is given up."""
        try:
            while self._failed(tenant_name):
                await asyncio.sleep(self.retry_s)
                async with self._lock(tenant_name):
                    now_s = time.monotonic()
                    self._give_up(tenant_name, [part for part in self._failed(tenant_name)
                                                if now_s - part.failed_at_s > self.late_flush_s])
                    if self._failed(tenant_name):
                        await self._send(tenant_name)
        except asyncio.CancelledError:
            self._give_up(tenant_name, self._failed(tenant_name))
            raise
        finally:
            if self._retrying.get(tenant_name) is asyncio.current_task():
                del self._retrying[tenant_name]

    def _stop_unwatched_retry(self, tenant_name: str) -> None:
        """A caller stopped waiting: once no caller waits for the tenant's unanswered parts, stop retrying them,
        so a shutdown's drain is not held past its grace period by retries."""
        retrying = self._retrying.get(tenant_name)
        if retrying is not None and not any(part.waiting for part in self._failed(tenant_name)):
            retrying.cancel()

    def _failed(self, tenant_name: str) -> list[_Charges]:
        """The tenant's parts a call carried that Redis did not answer, not landed since."""
        return [part for part in self._unlanded.get(tenant_name, ()) if part.failed_at_s is not None]

    def _lock(self, tenant_name: str) -> asyncio.Lock:
        lock = self._sending.get(tenant_name)
        if lock is None:
            lock = self._sending[tenant_name] = asyncio.Lock()
        return lock

    def _give_up(self, tenant_name: str, parts: list[_Charges]) -> None:
        for part in parts:
            self._land(tenant_name, part, lost=True)

    def _land(self, tenant_name: str, part: _Charges, *, lost: bool = False) -> None:
        """The part is in the store, or (`lost`) given up and counted: reads stop adding it, its charges return.
        Landing it again changes nothing."""
        if part.landed.done():
            return
        if lost:
            self.charges_lost += part.charges
        if self._gathering.get(tenant_name) is part:
            del self._gathering[tenant_name]
        unlanded = self._unlanded[tenant_name]
        unlanded.remove(part)
        if not unlanded:
            del self._unlanded[tenant_name]
        self._charge_mark(tenant_name)          # a read that began before the charges landed is not reused
        part.landed.set_result(None)

    def _charge_mark(self, tenant_name: str) -> None:
        self._recent.pop(tenant_name, None)
        self._charges[tenant_name] = self._charges.get(tenant_name, 0) + 1

    async def usage(self, tenant: Tenant) -> BudgetState:
        """The tenant's spend and what its requests in flight hold (on every replica), for the admin API;
        `exhausted` by the spend alone."""
        now_s = self.clock()
        keys = self.keys(tenant.name, Periods.at(now_s))
        parts = self._unlanded.get(tenant.name, ())     # the holds they give back the script leaves out
        released: list[int | str] = []
        for part in parts:
            released += (part.seq, *part.released_args())
        reply = await self.guard.run(lambda: self.usage_script(
            keys=[*keys, self.applied_key(tenant.name), *self.holds_keys(tenant.name)], args=[len(parts), *released]))
        if reply is STORE_DOWN:
            return self._store_down(tenant)
        day_nanos, month_nanos, applied, held_nanos = (int(v) for v in reply)
        self._land_applied(tenant.name, applied)
        day_pending, month_pending = self._pending(tenant.name, keys, applied)
        return replace(evaluate(tenant, day_nanos + day_pending, month_nanos + month_pending, now_s),
                       held_usd=to_usd(held_nanos))
