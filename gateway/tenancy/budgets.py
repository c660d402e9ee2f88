"""Tenant budgets: USD spent per UTC day and month, reserved before a request and charged after.

Money is stored as integer nano-dollars (1e-9 USD) and added with INCRBY,
so thousands of tiny charges never drift the way floats do; a charge is
rounded half-even to the nano-dollar. A request predicted to cost something
reserves that cost (a `Hold`) as it is admitted, and is refused when what is
spent, what the requests in flight hold and its own cost would pass a limit;
its hold is given back with its real charge when it ends. So requests in
flight cannot overspend a budget by more than their costs' misprediction.

This module holds what both stores share; `budgets_memory` keeps budgets in
this process, `budgets_redis` in Redis, shared by replicas.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from gateway.cost import plain_usd
from gateway.errors import BudgetExceeded, GatewayError
from gateway.policy.model import Budget, Tenant
from gateway.tenancy.limits import store_unavailable_error

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


#: the longest Retry-After the OpenAI SDKs wait for: past it they retry after their own short back-off
SDK_LONGEST_RETRY_AFTER_S = 60

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
    held_usd: Decimal = Decimal(0)  # reserved by the tenant's requests in flight (read with a reservation, or usage)
    by_holds: bool = False          # exhausted only with what the requests in flight hold: not spent yet
    cost_usd: Decimal | None = None  # set when this request's own predicted cost is more than is left
    never_fits: bool = False        # its own predicted cost is more than a whole period's limit: no wait helps

    @property
    def on_exhausted(self) -> str:
        """What an exhausted budget does: reject, or downgrade to the cheapest model."""
        return "reject" if self.reason == "store_unavailable" else self.budget.on_exhausted

    def error(self) -> GatewayError:
        """The error to refuse a request with when the budget is exhausted."""
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        if self.reason == "store_unavailable":
            return store_unavailable_error(headers, "Budget")
        limit = self.budget.usd_per_day if self.reason == "day" else self.budget.usd_per_month
        if self.by_holds:
            return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: USD {_plain_or_none(limit)} per "
                                  f"{self.reason} spent or reserved by requests in flight.", headers=headers)
        if self.retry_after_s > SDK_LONGEST_RETRY_AFTER_S or self.never_fits:   # retrying cannot help: spent
            headers["x-should-retry"] = "false"     # until the period ends (the SDKs would retry at once, as they
                                                    # ignore so long a wait), or dearer than a whole period allows
        if self.cost_usd is not None:
            spent = self.spent_day_usd if self.reason == "day" else self.spent_month_usd
            if self.never_fits:
                return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: the request's predicted cost, USD "
                                      f"{plain_usd(self.cost_usd)}, is more than the tenant's whole budget allows: "
                                      "it can never be admitted. Reduce the prompt, max_tokens or n.", headers=headers)
            return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: the request's predicted cost, USD "
                                  f"{plain_usd(self.cost_usd)}, is more than the USD {plain_usd(limit - spent)} left "
                                  f"of USD {_plain_or_none(limit)} per {self.reason}.", headers=headers)
        return BudgetExceeded(f"Budget exhausted for tenant {self.tenant!r}: USD {_plain_or_none(limit)} per "
                              f"{self.reason} spent.", headers=headers)

    def to_dict(self) -> dict[str, object]:
        """The state as JSON-ready data, for GET /admin/tenants."""
        known = self.available              # the store did not answer: the spend is unknown, not 0
        return {"tenant": self.tenant, "spent_day_usd": plain_usd(self.spent_day_usd) if known else None,
                "spent_month_usd": plain_usd(self.spent_month_usd) if known else None,
                "usd_per_day": _plain_or_none(self.budget.usd_per_day),
                "usd_per_month": _plain_or_none(self.budget.usd_per_month),
                "held_usd": plain_usd(self.held_usd) if known else None,
                "exhausted": self.exhausted if known else None, "reason": self.reason,
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
    reason, retry_s, by_holds, too_costly, never_fits = None, 0.0, False, False, False
    for name, limit, spent_nanos, end_s in (("day", budget.usd_per_day, day_nanos, periods.day_end_s),
                                            ("month", budget.usd_per_month, month_nanos, periods.month_end_s)):
        if limit is None:
            continue
        cap_nanos = to_nanos(limit)
        spent = spent_nanos >= cap_nanos
        costly = not spent and spent_nanos + cost_nanos > cap_nanos     # no wait for holds to end can make it fit
        never_fits = never_fits or cost_nanos > cap_nanos               # nor the period's end: a fresh one won't
        if spent or spent_nanos + held_nanos + cost_nanos > cap_nanos:
            wait_s = end_s - now_s if spent or costly else HELD_RETRY_S
            if reason is None or wait_s >= retry_s:
                reason, retry_s, by_holds, too_costly = name, wait_s, not spent and not costly, costly
    return BudgetState(tenant.name, budget, to_usd(day_nanos), to_usd(month_nanos), reason is not None,
                       reason, retry_s, held_usd=to_usd(held_nanos), by_holds=by_holds,
                       cost_usd=to_usd(cost_nanos) if too_costly else None,
                       never_fits=reason is not None and never_fits)


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
        """The tenant's spend and what its requests in flight hold right now, for the admin API (`exhausted` by
        the spend alone)."""
        ...


def charge_later(services, tenant: Tenant | None, cost_usd: Decimal, hold: Hold | None = None) -> None:
    """Charge a cost to the tenant's day and month totals, and give back the request's hold: in a background
    task, or at once when the budgets are held in-process. A tenant without a budget has its spend kept too: a
    budget a reload gives it counts what it spent that day and month already, and the admin API shows it."""
    if tenant is None or not (cost_usd or hold):
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
