"""Budgets held in this process: the Redis budgets' semantics for one gateway process (no Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

from gateway.policy.model import Tenant
from gateway.tenancy.budgets import BudgetState, Hold, Periods, evaluate, to_nanos, to_usd


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
        holds = self.holds.setdefault(tenant.name, {})
        if ticket not in holds:             # a reservation asked again holds its cost once, as in Redis
            holds[ticket] = nanos
            self.held_nanos[tenant.name] = held + nanos
        return state, Hold(ticket, holds[ticket])

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
        """The tenant's spend and what its requests in flight hold right now, for the admin API."""
        return replace(await self.check(tenant), held_usd=to_usd(self.held_nanos.get(tenant.name, 0)))
