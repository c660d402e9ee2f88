"""Tenant budgets: USD spent per UTC day and month, reserved before a request and charged after.

Money is stored as integer nano-dollars (1e-9 USD) and added with INCRBY,
so thousands of tiny charges never drift the way floats do; a charge is
rounded half-even to the nano-dollar. A request predicted to cost something
reserves that cost (a `Hold`) as it is admitted, and is refused when what is
spent, what the requests in flight hold and its own cost would pass a limit;
its hold is given back with its real charge when it ends. So requests in
flight cannot overspend a budget by more than their costs' misprediction.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING, Protocol

from gateway.cost import plain_usd
from gateway.errors import BudgetExceeded, GatewayError
from gateway.policy.model import Budget, Tenant
from gateway.store_guard import ADMISSION_BACKOFF_S, STORE_DOWN, OnStoreFailure, StoreGuard
from gateway.tenancy import budget_lua
from gateway.tenancy.limits import INFLIGHT_TTL_S, store_unavailable_error

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

NANOS_PER_USD = 10**9
SECONDS_PER_DAY = 86400
#: how long a finished day's or month's total stays readable after the period ends
RETENTION_S = 2 * 86400
#: how long a replica reuses a read of a budget with room left, instead of a store round trip per request;
#: this replica's own charges end the reuse at once, other replicas' show within this long
READ_REUSE_S = 0.25
#: how long a tenant's charges gather before they are sent in one transaction (reads here count them meanwhile)
CHARGE_FLUSH_S = 0.02
#: how long a client refused only because of what the tenant's requests in flight hold is told to wait
HELD_RETRY_S = 1.0


def to_nanos(cost_usd: Decimal) -> int:
    """USD as whole nano-dollars, rounded half-even."""
    return int((cost_usd * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def to_usd(nanos: int) -> Decimal:
    """Nano-dollars as USD."""
    return Decimal(nanos) / NANOS_PER_USD


@dataclass(frozen=True)
class Periods:
    """The UTC day and month a moment falls in, and when each ends."""

    day: str                    # 2025-01-31
    month: str                  # 2025-01
    day_end_s: float
    month_end_s: float

    @classmethod
    def at(cls, now_s: float) -> Periods:
        """The periods containing `now_s` (unix seconds)."""
        return _periods_of_day(int(now_s // SECONDS_PER_DAY))


@functools.lru_cache(maxsize=4)
def _periods_of_day(day_number: int) -> Periods:
    """The periods of one UTC day, counted from the epoch: unix days are exactly 86,400 s,
    so every request of a day shares one answer instead of redoing the date arithmetic."""
    day_start = datetime.fromtimestamp(day_number * SECONDS_PER_DAY, UTC)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Periods(day_start.strftime("%Y-%m-%d"), day_start.strftime("%Y-%m"),
                   (day_start + timedelta(days=1)).timestamp(), next_month.timestamp())


@dataclass(frozen=True)
class BudgetState:
    """A tenant's spend against its budget, as of one moment."""

    tenant: str
    budget: Budget
    spent_day_usd: Decimal = Decimal(0)
    spent_month_usd: Decimal = Decimal(0)
    exhausted: bool = False
    reason: str | None = None       # day | month | store_unavailable
    retry_after_s: float = 0.0      # until the exhausted period ends
    available: bool = True          # False: the store did not answer; spend unknown
    held_usd: Decimal = Decimal(0)  # reserved by the tenant's requests in flight (when read with a reservation)
    by_holds: bool = False          # exhausted only with what the requests in flight hold: not spent yet

    @property
    def on_exhausted(self) -> str:
        """What an exhausted budget does: reject, or downgrade to the cheapest model."""
        return "reject" if self.reason == "store_unavailable" else self.budget.on_exhausted

    def error(self) -> GatewayError:
        """The error to refuse a request with when the budget is exhausted."""
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        if self.reason == "store_unavailable":
            return store_unavailable_error(headers)
        limit = self.budget.usd_per_day if self.reason == "day" else self.budget.usd_per_month
        if self.by_holds:
            return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: USD {_plain_or_none(limit)} per "
                                  f"{self.reason} spent or reserved by requests in flight.", headers=headers)
        return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: USD {_plain_or_none(limit)} per "
                              f"{self.reason} spent.", headers=headers)

    def to_dict(self) -> dict[str, object]:
        """The state as JSON-ready data, for GET /admin/tenants."""
        return {"tenant": self.tenant, "spent_day_usd": plain_usd(self.spent_day_usd),
                "spent_month_usd": plain_usd(self.spent_month_usd),
                "usd_per_day": _plain_or_none(self.budget.usd_per_day),
                "usd_per_month": _plain_or_none(self.budget.usd_per_month),
                "exhausted": self.exhausted, "reason": self.reason,
                "on_exhausted": self.on_exhausted, "available": self.available}


def retention_s(period_end_s: float, now_s: float) -> int:
    """How long a period's total is kept: until the period ends, then RETENTION_S more."""
    return max(1, int(period_end_s - now_s + RETENTION_S))


def _plain_or_none(value: Decimal | None) -> str | None:
    """USD in plain notation (`0.00000001`, never `1E-8`), or None."""
    return None if value is None else plain_usd(value)


def evaluate(tenant: Tenant, day_nanos: int, month_nanos: int, now_s: float, held_nanos: int = 0,
             cost_nanos: int = 0) -> BudgetState:
    """Compare spend with the tenant's budget: exhausted when a period's spend reached its limit, or when that
    spend, what the requests in flight hold and this request's cost pass it. Of two periods exhausted, the one
    that frees the tenant later is named (the month on a tie)."""
    budget, periods = tenant.budget, Periods.at(now_s)
    reason, retry_s, by_holds = None, 0.0, False
    for name, limit, spent_nanos, end_s in (("day", budget.usd_per_day, day_nanos, periods.day_end_s),
                                            ("month", budget.usd_per_month, month_nanos, periods.month_end_s)):
        if limit is None:
            continue
        cap_nanos = to_nanos(limit)
        spent = spent_nanos >= cap_nanos
        if spent or spent_nanos + held_nanos + cost_nanos > cap_nanos:
            wait_s = end_s - now_s if spent else HELD_RETRY_S
            if reason is None or wait_s >= retry_s:
                reason, retry_s, by_holds = name, wait_s, not spent
    return BudgetState(tenant.name, budget, to_usd(day_nanos), to_usd(month_nanos), reason is not None,
                       reason, retry_s, held_usd=to_usd(held_nanos), by_holds=by_holds)


def limit_nanos(limit: Decimal | None) -> int:
    """A limit as the reservation script reads it: nano-USD, -1 for none."""
    return -1 if limit is None else to_nanos(limit)


@dataclass(frozen=True, slots=True)
class Hold:
    """What one admitted request reserved of its tenant's budget: given back, with its real charge, when it
    ends. Giving back a hold twice, or one the store never took, changes nothing."""

    ticket: str
    nanos: int

    @property
    def member(self) -> str:
        """The hold as the store lists it: its ticket and its nano-USD."""
        return f"{self.ticket}:{self.nanos}"


class Budgets(Protocol):
    """Per-tenant USD spend per UTC day and month."""

    #: the spend lives in a store across the network; budgets that are not remote (in this process) also offer
    #: `charge_now`, `charge` done at once, and are checked before admission rather than beside it
    remote: bool

    @property
    def store_failures(self) -> int:
        """Store calls that failed or timed out since start."""
        ...

    async def check(self, tenant: Tenant, now_s: float | None = None) -> BudgetState:
        """The tenant's spend so far and whether its budget is exhausted."""
        ...

    async def reserve(self, tenant: Tenant, cost_usd: Decimal, ticket: str,
                      now_s: float | None = None) -> tuple[BudgetState, Hold | None]:
        """Check the budget and, when spend, holds and `cost_usd` fit it, hold `cost_usd` for the request
        `ticket` names, at once; the hold is None when the store surely holds nothing (refused, free, not asked)."""
        ...

    async def charge(self, tenant: Tenant, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Add a request's cost to the tenant's day and month totals."""
        ...

    async def settle(self, tenant: Tenant, hold: Hold, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Give back a request's hold and charge its real cost, together."""
        ...

    async def usage(self, tenant: Tenant) -> BudgetState:
        """The tenant's spend right now, for the admin API."""
        ...


def charge_later(services, tenant: Tenant | None, cost_usd: Decimal, hold: Hold | None = None) -> None:
    """Charge a cost to the tenant's budget, when it has one and there is a cost, and give back the request's
    hold: in a background task, or at once when the budgets are held in-process."""
    if tenant is None or not (cost_usd or hold) or not tenant.budget.limited:
        return
    budgets = services.stores.budgets
    if not budgets.remote and hold is not None:
        budgets.settle_now(tenant, hold, cost_usd)
    elif not budgets.remote:
        budgets.charge_now(tenant, cost_usd)
    elif hold is not None:
        services.background.spawn(budgets.settle(tenant, hold, cost_usd), name="budget-settle")
    else:
        services.background.spawn(budgets.charge(tenant, cost_usd), name="budget-charge")


class MemoryBudgets:
    """Budgets held in this process: lost on restart, for the no-Redis quickstart."""

    remote = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.store_failures = 0
        self.spent_nanos: dict[str, dict[str, int]] = {}   # tenant -> period -> nano-USD
        self.holds: dict[str, dict[str, int]] = {}         # tenant -> ticket -> nano-USD held
        self.held_nanos: dict[str, int] = {}               # tenant -> the sum of its holds

    async def check(self, tenant: Tenant, now_s: float | None = None) -> BudgetState:
        """The tenant's spend so far and whether its budget is exhausted."""
        now_s = self.clock() if now_s is None else now_s
        periods, spent = Periods.at(now_s), self.spent_nanos.get(tenant.name, {})
        return evaluate(tenant, spent.get(periods.day, 0), spent.get(periods.month, 0), now_s)

    async def reserve(self, tenant: Tenant, cost_usd: Decimal, ticket: str,
                      now_s: float | None = None) -> tuple[BudgetState, Hold | None]:
        """Check the budget with what the tenant's requests in flight hold, and hold `cost_usd` when it fits."""
        nanos = to_nanos(cost_usd)
        if nanos == 0 or not tenant.budget.limited:
            return await self.check(tenant, now_s), None
        now_s = self.clock() if now_s is None else now_s
        periods, spent = Periods.at(now_s), self.spent_nanos.get(tenant.name, {})
        held = self.held_nanos.get(tenant.name, 0)
        state = evaluate(tenant, spent.get(periods.day, 0), spent.get(periods.month, 0), now_s, held, nanos)
        if state.exhausted:
            return state, None
        self.holds.setdefault(tenant.name, {})[ticket] = nanos
        self.held_nanos[tenant.name] = held + nanos
        return state, Hold(ticket, nanos)

    async def charge(self, tenant: Tenant, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Add a request's cost to the tenant's day and month totals; past periods are dropped."""
        self.charge_now(tenant, cost_usd, now_s)

    def charge_now(self, tenant: Tenant, cost_usd: Decimal, now_s: float | None = None) -> None:
        """`charge`, done at once: a request's cost is charged in-process without a task."""
        periods = Periods.at(self.clock() if now_s is None else now_s)
        spent = self.spent_nanos.get(tenant.name, {})
        nanos = to_nanos(cost_usd)
        self.spent_nanos[tenant.name] = {periods.day: spent.get(periods.day, 0) + nanos,
                                         periods.month: spent.get(periods.month, 0) + nanos}

    async def settle(self, tenant: Tenant, hold: Hold, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Give back a request's hold and charge its real cost."""
        self.settle_now(tenant, hold, cost_usd, now_s)

    def settle_now(self, tenant: Tenant, hold: Hold, cost_usd: Decimal, now_s: float | None = None) -> None:
        """`settle`, done at once; a hold given back already is not given back again."""
        holds = self.holds.get(tenant.name)
        if holds is not None and holds.pop(hold.ticket, None) is not None:
            if holds:
                self.held_nanos[tenant.name] -= hold.nanos
            else:                           # none left: drop the tenant's entries
                del self.holds[tenant.name], self.held_nanos[tenant.name]
        if cost_usd:
            self.charge_now(tenant, cost_usd, now_s)

    async def usage(self, tenant: Tenant) -> BudgetState:
        """The tenant's spend right now, for the admin API."""
        return await self.check(tenant)


class _Charges:
    """A tenant's charges waiting for their flush: nano-dollars and retention by key, and the holds they give
    back."""

    __slots__ = ("landed", "flush", "nanos", "retention_s", "charges", "seq", "accounted", "released",
                 "released_nanos")

    def __init__(self, landed: asyncio.Future, seq: int) -> None:
        self.landed = landed                # set once they are in the store, or their failure counted
        self.flush: asyncio.Task | None = None
        self.nanos: dict[str, int] = {}
        self.retention_s: dict[str, int] = {}
        self.charges = 0                    # each request's charge adds two keys' nanos, and one here
        self.seq = seq                      # this replica's flush number: flushes are sent in this order
        self.accounted = False              # sent, or its loss counted
        self.released: list[str] = []       # the members of the holds given back
        self.released_nanos = 0

    def add(self, key: str, nanos: int, retention_s: int) -> None:
        self.nanos[key] = self.nanos.get(key, 0) + nanos
        self.retention_s[key] = max(self.retention_s.get(key, 0), retention_s)


class RedisBudgets:
    """Budgets in Redis, shared by replicas and kept across restarts until the period ends."""

    remote = True

    def __init__(self, client: Redis, prefix: str = "gw", timeout_s: float = 0.05,
                 on_store_failure: OnStoreFailure = "allow",
                 clock: Callable[[], float] = time.time, *, backoff_s: float = ADMISSION_BACKOFF_S,
                 hold_ttl_s: float = INFLIGHT_TTL_S) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.on_store_failure = on_store_failure
        self.guard = StoreGuard("budget store", timeout_s, backoff_s=backoff_s, logger=log,
                                meanwhile=f"on_store_failure={on_store_failure}")
        self._recent: dict[str, tuple[float, BudgetState]] = {}     # tenant -> (read at, a state with room)
        self._charges: dict[str, int] = {}      # tenant -> charges begun or ended here (a read spanning one is stale)
        self._gathering: dict[str, _Charges] = {}   # tenant -> charges waiting for the next flush
        self._unlanded: dict[str, list[_Charges]] = {}  # tenant -> charges not yet in the store (gathering, sent)
        self._replica = secrets.token_hex(8)    # names this replica's applied-flush marker
        self._flushes = 0                       # flushes begun, numbered from 1 (and sent in that order)
        self._lost = 0                          # charges a failed flush carried beyond the one call counted
        self.hold_ttl_ms = int(hold_ttl_s * 1000)   # a hold its replica never gave back (it died) lapses then
        self.reserve_script = client.register_script(budget_lua.RESERVE)

    @property
    def store_failures(self) -> int:
        """Checks answered without Redis, and charges lost with a flush that failed."""
        return self.guard.failures + self._lost

    def keys(self, tenant: str, periods: Periods) -> tuple[str, str]:
        """The day and month total keys of a tenant, on the tenant's cluster slot."""
        base = f"{self.prefix}:{{{tenant}}}:budget"
        return f"{base}:day:{periods.day}", f"{base}:month:{periods.month}"

    def holds_keys(self, tenant: str) -> tuple[str, str]:
        """The tenant's holds (a sorted set by expiry) and their sum, on the tenant's cluster slot."""
        base = f"{self.prefix}:{{{tenant}}}:budget"
        return f"{base}:holds", f"{base}:held"

    def applied_key(self, tenant: str) -> str:
        """The number of this replica's last flush the store has applied (in the flush's own transaction)."""
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
        # this replica's charges the totals read do not hold yet: gathering, or sent and not applied when read
        applied = int(reply[2] or 0)
        unlanded = [charges for charges in self._unlanded.get(tenant.name, ()) if charges.seq > applied]
        day_nanos, month_nanos = (int(v or 0) + sum(charges.nanos.get(key, 0) for charges in unlanded)
                                  for key, v in zip(keys, reply))
        return evaluate(tenant, day_nanos, month_nanos, now_s)

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
        pending: list[int] = []             # this replica's flushes the store may not hold yet, for the script
        for charges in self._unlanded.get(tenant.name, ()):
            pending += (charges.seq, charges.nanos.get(day_key, 0), charges.nanos.get(month_key, 0),
                        charges.released_nanos)
        budget = tenant.budget
        args = [limit_nanos(budget.usd_per_day), limit_nanos(budget.usd_per_month), nanos, hold.member,
                self.hold_ttl_ms, len(pending) // 4, *pending]
        sent = not self.guard.backing_off   # else the guard answers without sending anything
        reply = await self.guard.run(lambda: self.reserve_script(
            keys=[day_key, month_key, self.applied_key(tenant.name), *self.holds_keys(tenant.name)], args=args))
        if reply is STORE_DOWN:
            return self._store_down(tenant), hold if sent else None
        reserved, day_nanos, month_nanos, held_nanos = (int(v) for v in reply)
        state = evaluate(tenant, day_nanos, month_nanos, now_s, held_nanos, nanos)
        return state, hold if reserved else None

    def _store_down(self, tenant: Tenant) -> BudgetState:
        if self.on_store_failure == "allow":
            return BudgetState(tenant.name, tenant.budget, available=False)
        return BudgetState(tenant.name, tenant.budget, exhausted=True, reason="store_unavailable",
                           available=False)

    async def charge(self, tenant: Tenant, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Add a cost to the day and month totals; returns once it is in the store (or its failure counted).

        The tenant's charges of the next CHARGE_FLUSH_S go together in one transaction, so a request costs a
        share of a round trip, not one; this replica's reads count them while they wait.
        """
        await self._gather(tenant, None, cost_usd, now_s)

    async def settle(self, tenant: Tenant, hold: Hold, cost_usd: Decimal, now_s: float | None = None) -> None:
        """Give back a request's hold and charge its real cost, in the same transaction as the tenant's other
        charges of the moment; returns once both are in the store (or their failure counted)."""
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
            gathering.flush.add_done_callback(lambda _flush, name=tenant.name, g=gathering: self._landed(name, g))
        if nanos:
            day_key, month_key = self.keys(tenant.name, periods)
            gathering.add(day_key, nanos, retention_s(periods.day_end_s, now_s))
            gathering.add(month_key, nanos, retention_s(periods.month_end_s, now_s))
        if hold is not None:
            gathering.released.append(hold.member)
            gathering.released_nanos += hold.nanos
        gathering.charges += 1
        await asyncio.shield(gathering.landed)

    async def _flush(self, tenant_name: str, gathering: _Charges) -> None:
        """After CHARGE_FLUSH_S, add the tenant's gathered charges in one transaction, after the flushes sent
        before it (their numbers mark, in the store, what a read already holds)."""
        async def transaction() -> list:
            async with self.client.pipeline(transaction=True) as pipe:     # a cluster pipeline connects here
                for key, nanos in gathering.nanos.items():
                    pipe.incrby(key, nanos).expire(key, gathering.retention_s[key])
                if gathering.released:      # EVAL with its text: a script cache Redis lost cannot fail it
                    pipe.eval(budget_lua.RELEASE, 2, *self.holds_keys(tenant_name), *gathering.released)
                pipe.set(self.applied_key(tenant_name), gathering.seq, ex=RETENTION_S)
                return await pipe.execute()

        try:
            await asyncio.sleep(CHARGE_FLUSH_S)
            if self._gathering.get(tenant_name) is gathering:
                del self._gathering[tenant_name]    # closed: later charges gather for the next flush
            # the flushes before this one, as they stand now: the list shrinks as they land, and walking it
            # while it does would skip some and wait on a later flush, which waits on this one
            unlanded = self._unlanded[tenant_name]
            for earlier in unlanded[:unlanded.index(gathering)]:
                await asyncio.shield(earlier.landed)
            if await self.guard.run(transaction, after_response=True) is STORE_DOWN:
                self._lost += gathering.charges - 1     # the guard counted the call once
            gathering.accounted = True
        except Exception:                   # not the store's failure: ours; the charges are lost, and said so
            log.exception("budget charges of tenant %s were not sent", tenant_name)

    def _landed(self, tenant_name: str, gathering: _Charges) -> None:
        """Its flush has ended (or was cancelled, perhaps before it ever ran): the gathering is in the store, or
        lost and counted; reads stop adding it, and its charges return."""
        if not gathering.accounted:         # never sent: our failure, or the flush cancelled
            self._lost += gathering.charges
        if self._gathering.get(tenant_name) is gathering:
            del self._gathering[tenant_name]
        unlanded = self._unlanded[tenant_name]
        unlanded.remove(gathering)
        if not unlanded:
            del self._unlanded[tenant_name]
        self._charge_mark(tenant_name)          # a read that began before the charges landed is not reused
        gathering.landed.set_result(None)

    def _charge_mark(self, tenant_name: str) -> None:
        self._recent.pop(tenant_name, None)
        self._charges[tenant_name] = self._charges.get(tenant_name, 0) + 1

    async def usage(self, tenant: Tenant) -> BudgetState:
        """The tenant's spend right now, for the admin API."""
        return await self.read(tenant)
