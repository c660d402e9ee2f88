"""admit: tenant budgets and rate limits (requests, tokens, concurrency), atomic in the store."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.tenancy.limits import unlimited

#: tokens reserved for the answer when the request sets no max_tokens
DEFAULT_OUTPUT_RESERVE = 256


class Admit:
    """Refuses (429) or lets a request through; its finish gives back what was reserved."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return None
        stores = self.services.stores
        budget = tenant.budget
        if budget.usd_per_day is not None or budget.usd_per_month is not None:
            state = await stores.budgets.check(tenant)
            if state.exhausted:
                if state.on_exhausted != "downgrade":
                    raise state.error()
                ctx.extra["downgrade"] = True
        if unlimited(tenant.limits):
            return None
        tokens = ctx.prompt_tokens + (ctx.max_tokens or DEFAULT_OUTPUT_RESERVE)
        admission = await stores.limiter.admit(tenant, route=None, tokens=tokens)
        if not admission.allowed:
            raise admission.error()
        ctx.admitted = True
        ctx.reserved_tokens = tokens
        ctx.extra["admission"] = admission
        return None

    async def finish(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return
        background = self.services.background
        stores = self.services.stores
        if ctx.cost_usd and (tenant.budget.usd_per_day is not None or tenant.budget.usd_per_month is not None):
            background.spawn(stores.budgets.charge(tenant, ctx.cost_usd), name="budget-charge")
        admission = ctx.extra.get("admission")
        if admission is None:
            return
        # the slot is freed before the answer leaves, so a client's next request never meets its last one
        await stores.limiter.release(tenant, ticket=admission.ticket)
        used = ctx.usage.input_tokens + ctx.usage.output_tokens
        background.spawn(stores.limiter.settle(tenant, ticket=admission.ticket,
                                               reserved_tokens=ctx.reserved_tokens, actual_tokens=used),
                         name="limits-settle")
