"""admit: tenant budgets and rate limits (requests, tokens, concurrency), atomic in the store.

What an admission holds is given back after the answer has left, in the
background: the response never waits for a store round trip to free a slot.
A refusal for concurrency is retried once this process's releases of the
tenant still under way have landed, so a client's next request never meets
its last one's slot.
"""

from __future__ import annotations

import asyncio
import functools
import time

from gateway.context import RequestContext
from gateway.tenancy.budgets import charge_later
from gateway.tenancy.limits import STORE_RETRY_S, Admission, new_ticket, unlimited

#: tokens reserved for the answer when the request sets no max_tokens
DEFAULT_OUTPUT_RESERVE = 256
#: how long an admission the store did not answer is ended again and again while the store is away
LATE_END_S = 60.0


class Admit:
    """Refuses (429) or lets a request through; its finish gives back what was reserved."""

    def __init__(self, services) -> None:
        self.services = services
        self._exhausted_until_s: dict[str, float] = {}
        self._releasing: dict[str, set[asyncio.Task]] = {}     # tenant -> its releases under way

    async def handle(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return None
        budgets = self.services.stores.budgets
        budgeted = tenant.budget.limited
        limited = not unlimited(tenant.limits)
        # the answer's tokens reserved for each of its n choices
        tokens = ctx.prompt_tokens + (ctx.max_tokens or DEFAULT_OUTPUT_RESERVE) * ctx.choices
        ticket = new_ticket()
        try:
            if budgeted and limited and not self._known_exhausted(tenant.name):
                state, admission = await self._check_both(tenant, tokens, ticket)
            else:
                state = await budgets.check(tenant) if budgeted else None
                refused = state is not None and state.exhausted and state.on_exhausted != "downgrade"
                admission = await self._admit(tenant, tokens, ticket) if limited and not refused else None
        except BaseException:
            # cancelled (the client left) or failed while the store may already hold this ticket's slot:
            # give it back, or it would stay taken until the in-flight safety TTL (harmless when not held)
            if limited:
                self._give_back(tenant, ticket, tokens, actual_tokens=0)
            raise
        if state is not None and state.exhausted:
            self._exhausted_until_s[tenant.name] = time.monotonic() + state.retry_after_s
            if state.on_exhausted != "downgrade":
                if admission is not None and admission.allowed:
                    self._give_back(tenant, ticket, tokens, actual_tokens=0)
                raise state.error()
            ctx.budget_downgrade = True
            ctx.decision = self.services.fleet.router(ctx.policy).cheapest(ctx.decision)
        if admission is None:
            return None
        if not admission.allowed:
            if admission.unsettled:
                self._end_late(tenant, ticket, tokens, actual_tokens=0)
            raise admission.error()
        ctx.reserved_tokens = tokens
        ctx.admission = admission
        return None

    async def _check_both(self, tenant, tokens: int, ticket: str):
        """Budget and limits at once: a tenant with both waits for one store round trip, not two."""
        budget_check = asyncio.ensure_future(self.services.stores.budgets.check(tenant))
        try:
            admission = await self._admit(tenant, tokens, ticket)
        except BaseException:
            budget_check.cancel()
            raise
        return await budget_check, admission

    async def _admit(self, tenant, tokens: int, ticket: str) -> Admission:
        """The limiter's answer; a concurrency refusal is asked again once our releases under way have landed.

        A refusal consumes nothing, so the second ask uses the same ticket.
        """
        limiter = self.services.stores.limiter
        releasing = self._releasing.get(tenant.name)
        under_way = set(releasing) if releasing else None     # as they were when we asked: one may land meanwhile
        admission = await limiter.admit(tenant, route=None, tokens=tokens, ticket=ticket)
        if admission.allowed or admission.reason != "concurrent" or not under_way:
            return admission
        await asyncio.wait(under_way)
        return await limiter.admit(tenant, route=None, tokens=tokens, ticket=ticket)

    def _known_exhausted(self, tenant_name: str) -> bool:
        """Whether this process saw the tenant's budget exhausted for the current period.

        Then the budget is checked first and a refused request takes no rate-limit admission;
        otherwise both checks run at once and a refusal gives its admission back.
        """
        until_s = self._exhausted_until_s.get(tenant_name)
        return until_s is not None and time.monotonic() < until_s

    def _give_back(self, tenant, ticket: str, reserved_tokens: int, actual_tokens: int) -> None:
        """End an admission in the background: free its slot, then settle its tokens to what was used."""
        task = self.services.background.spawn(
            self._end_admission(tenant, ticket, reserved_tokens, actual_tokens), name="limits-release")
        if tenant.limits.concurrent is not None:
            releasing = self._releasing.setdefault(tenant.name, set())
            releasing.add(task)
            task.add_done_callback(functools.partial(self._released, tenant.name))

    def _released(self, tenant_name: str, task: asyncio.Task) -> None:
        releasing = self._releasing.get(tenant_name)
        if releasing is not None:
            releasing.discard(task)
            if not releasing:
                del self._releasing[tenant_name]

    async def _end_admission(self, tenant, ticket: str, reserved_tokens: int, actual_tokens: int) -> None:
        await self.services.stores.limiter.end(tenant, ticket=ticket, reserved_tokens=reserved_tokens,
                                               actual_tokens=actual_tokens)

    def _end_late(self, tenant, ticket: str, reserved_tokens: int, actual_tokens: int) -> None:
        """End, in the background, an admission the store was asked for and did not answer in time."""
        self.services.background.spawn(self._end_when_answered(tenant, ticket, reserved_tokens, actual_tokens),
                                       name="limits-late-end")

    async def _end_when_answered(self, tenant, ticket: str, reserved_tokens: int, actual_tokens: int) -> None:
        """A stalled Redis runs the admission it did not answer once it resumes, taking a concurrency slot for
        the in-flight TTL (15 minutes). So: end it until Redis answers an end, then once more, which Redis
        surely runs after the late admission. Given up after LATE_END_S (the TTL frees the slot then)."""
        limiter = self.services.stores.limiter
        deadline_s = time.monotonic() + LATE_END_S
        while not await limiter.end(tenant, ticket=ticket, reserved_tokens=reserved_tokens,
                                    actual_tokens=actual_tokens):
            if time.monotonic() > deadline_s:
                return
            await asyncio.sleep(STORE_RETRY_S)
        if actual_tokens <= reserved_tokens:        # settling again is then harmless; an excess is charged once
            await limiter.end(tenant, ticket=ticket, reserved_tokens=reserved_tokens, actual_tokens=actual_tokens)
        else:
            await limiter.release(tenant, ticket=ticket)

    async def finish(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return
        charge_later(self.services, tenant, ctx.cost_usd)
        if ctx.admission is not None:
            used = ctx.usage.input_tokens + ctx.usage.output_tokens
            if ctx.admission.unsettled:         # admitted degraded: the store may apply it late
                self._end_late(tenant, ctx.admission.ticket, ctx.reserved_tokens, actual_tokens=used)
            else:
                self._give_back(tenant, ctx.admission.ticket, ctx.reserved_tokens, actual_tokens=used)
