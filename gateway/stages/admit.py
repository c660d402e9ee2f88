"""admit: tenant budgets and rate limits (requests, tokens, concurrency), atomic in the store."""

from __future__ import annotations

import asyncio
import time

from gateway.context import RequestContext
from gateway.tenancy.limits import unlimited

#: tokens reserved for the answer when the request sets no max_tokens
DEFAULT_OUTPUT_RESERVE = 256


class Admit:
    """Refuses (429) or lets a request through; its finish gives back what was reserved."""

    def __init__(self, services) -> None:
        self.services = services
        self._exhausted_until_s: dict[str, float] = {}

    async def handle(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return None
        stores = self.services.stores
        budget = tenant.budget
        budgeted = budget.usd_per_day is not None or budget.usd_per_month is not None
        limited = not unlimited(tenant.limits)
        tokens = ctx.prompt_tokens + (ctx.max_tokens or DEFAULT_OUTPUT_RESERVE)
        if budgeted and limited and not self._known_exhausted(tenant.name):
            # both store round trips at once: a tenant with a budget and limits waits for one, not two
            state, admission = await asyncio.gather(stores.budgets.check(tenant),
                                                    stores.limiter.admit(tenant, route=None, tokens=tokens))
        else:
            state = await stores.budgets.check(tenant) if budgeted else None
            refused = state is not None and state.exhausted and state.on_exhausted != "downgrade"
            admission = (await stores.limiter.admit(tenant, route=None, tokens=tokens)
                         if limited and not refused else None)
        if state is not None and state.exhausted:
            self._exhausted_until_s[tenant.name] = time.monotonic() + state.retry_after_s
            if state.on_exhausted != "downgrade":
                if admission is not None and admission.allowed:
                    self.services.background.spawn(self._give_back(tenant, admission, tokens),
                                                   name="limits-give-back")
                raise state.error()
            ctx.budget_downgrade = True
        if admission is None:
            return None
        if not admission.allowed:
            raise admission.error()
        ctx.reserved_tokens = tokens
        ctx.admission = admission
        return None

    def _known_exhausted(self, tenant_name: str) -> bool:
        """Whether this process saw the tenant's budget exhausted for the current period.

        Then the budget is checked first and a refused request takes no rate-limit admission;
        otherwise both checks run at once and a refusal gives its admission back.
        """
        until_s = self._exhausted_until_s.get(tenant_name)
        return until_s is not None and time.monotonic() < until_s

    async def _give_back(self, tenant, admission, reserved_tokens: int) -> None:
        """Undo an admission the budget then refused: free its slot and its token reservation."""
        limiter = self.services.stores.limiter
        await limiter.release(tenant, ticket=admission.ticket)
        await limiter.settle(tenant, ticket=admission.ticket, reserved_tokens=reserved_tokens, actual_tokens=0)

    async def finish(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return
        background = self.services.background
        stores = self.services.stores
        if ctx.cost_usd and (tenant.budget.usd_per_day is not None or tenant.budget.usd_per_month is not None):
            background.spawn(stores.budgets.charge(tenant, ctx.cost_usd), name="budget-charge")
        admission = ctx.admission
        if admission is None:
            return
        # the slot is freed before the answer leaves, so a client's next request never meets its last one
        await stores.limiter.release(tenant, ticket=admission.ticket)
        used = ctx.usage.input_tokens + ctx.usage.output_tokens
        background.spawn(stores.limiter.settle(tenant, ticket=admission.ticket,
                                               reserved_tokens=ctx.reserved_tokens, actual_tokens=used),
                         name="limits-settle")
