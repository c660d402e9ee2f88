"""admit: tenant budgets and rate limits (requests, tokens, concurrency), atomic in the store.

What an admission holds is given back in its finish, after the call: with a
remote store in the background (the response never waits for a store round
trip to free a slot), in-process at once.
A give-back the store does not answer (a network blip) is tried again until
it does, for up to LATE_END_S, instead of leaving the slot taken for the
in-flight TTL. A refusal for concurrency is retried once this process's
releases of the tenant under way have been tried, so a client's next request
never meets its last one's slot. A request refused after its admission (an
exhausted budget), or abandoned during it, withdraws the admission: it takes
no slot, no tokens and no request.

A budgeted tenant's request reserves its predicted cost (`reservation_usd`)
beside the check, in the same store call, and is refused (or downgraded)
when spend, the holds of the requests in flight and its own cost would pass
the budget. Its finish gives the hold back with the real charge, whatever
ended it: the answer, an error, the client leaving, a refusal. A request the
cache may answer is not refused for its budget here but by `account`, after
the cache had its say: a hit costs nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal

from gateway.context import RequestContext, Usage
from gateway.cost import token_cost_usd
from gateway.stages.route import SLA_REFUSAL
from gateway.tenancy.budgets import BudgetState, Hold, charge_later, to_nanos
from gateway.tenancy.limits import STORE_RETRY_S, Admission, new_ticket, unlimited

#: tokens reserved for the answer when the request sets no max_tokens
DEFAULT_OUTPUT_RESERVE = 256
#: how long an end the store did not answer (of an admission, or of one it did not answer) is tried again
LATE_END_S = 60.0

#: one store call that ends an admission: True once the store answered it
Ending = Callable[[], Awaitable[bool]]

#: ctx.extra: the request's budget hold (a `Hold`), given back by finish, from the moment the store is asked
BUDGET_HOLD = "budget_hold"
#: ctx.extra: the budget's refusal of a request the cache may still answer; `account` raises it on a miss
BUDGET_REFUSAL = "budget_refusal"


class Admit:
    """Refuses (429) or lets a request through; its finish gives back what was reserved."""

    def __init__(self, services) -> None:
        self.services = services
        self._exhausted_until_s: dict[str, float] = {}
        self._releasing: dict[str, set[asyncio.Future]] = {}   # tenant -> its releases' first tries under way

    async def handle(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return None
        budgets = self.services.stores.budgets
        budgeted = tenant.budget.limited
        limited = not unlimited(tenant.limits)
        tokens = ctx.prompt_tokens + output_reserve(ctx)
        ticket = new_ticket()
        cost_usd = reservation_usd(ctx) if budgeted else None
        if cost_usd:        # the store may hold it once asked (even unanswered): finish gives it back
            ctx.extra[BUDGET_HOLD] = Hold(ticket, to_nanos(cost_usd))
        try:
            if budgeted and limited and not self._known_exhausted(tenant.name) and \
                    budgets.remote:     # two store round trips to overlap
                state, admission = await self._check_both(ctx, tokens, ticket, cost_usd)
            else:
                state = await self._reserve(ctx, cost_usd, ticket) if budgeted else None
                refused = state is not None and state.exhausted and state.on_exhausted != "downgrade" and \
                    not _cache_may_answer(ctx, state)
                admission = await self._admit(tenant, tokens, ticket) if limited and not refused else None
        except BaseException:
            # cancelled (the client left) or failed while the store may already hold this ticket's slot:
            # give it back, or it would stay taken until the in-flight safety TTL (harmless when not held)
            if limited:
                self._withdraw(tenant, ticket, tokens)
            raise
        if state is not None and state.exhausted:
            self._exhausted_until_s[tenant.name] = time.monotonic() + state.retry_after_s
            if state.on_exhausted == "downgrade":
                # a continuation of a stored response has its one model: it is not re-planned, nor said to be
                ctx.budget_downgrade = not ctx.decision.pinned
                ctx.decision = self.services.fleet.router(ctx.policy).cheapest(ctx.decision)
            elif _cache_may_answer(ctx, state):
                ctx.extra[BUDGET_REFUSAL] = state.error()   # a hit costs nothing: the cache is asked first
            else:
                self._undo(tenant, admission, ticket, tokens)
                raise state.error()
        if admission is None:
            return None
        if not admission.allowed:
            self._undo(tenant, admission, ticket, tokens)
            raise admission.error()
        ctx.reserved_tokens = tokens
        ctx.admission = admission
        return None

    async def _reserve(self, ctx: RequestContext, cost_usd: Decimal | None, ticket: str) -> BudgetState:
        """The budget's answer, holding `cost_usd` when it fits; the hold finish gives back is dropped when the
        store surely holds nothing."""
        state, hold = await self.services.stores.budgets.reserve(ctx.tenant, cost_usd or Decimal(0), ticket)
        if hold is None and cost_usd:
            ctx.extra.pop(BUDGET_HOLD, None)
        return state

    async def _check_both(self, ctx: RequestContext, tokens: int, ticket: str, cost_usd: Decimal | None):
        """Budget and limits at once: a tenant with both waits for one store round trip, not two."""
        budget_check = asyncio.ensure_future(self._reserve(ctx, cost_usd, ticket))
        try:
            admission = await self._admit(ctx.tenant, tokens, ticket)
        except BaseException:
            budget_check.cancel()
            raise
        return await budget_check, admission

    async def _admit(self, tenant, tokens: int, ticket: str) -> Admission:
        """The limiter's answer; a concurrency refusal is asked again once our releases under way were tried.

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
        """End a served request's admission: free its slot, settle its tokens to those used; in the background,
        unless the limiter is in-process (then nothing waits or can fail)."""
        limiter = self.services.stores.limiter
        if not limiter.remote:
            limiter.end_now(tenant, ticket=ticket, reserved_tokens=reserved_tokens, actual_tokens=actual_tokens)
            return
        end, again = self._ending(tenant, ticket, reserved_tokens, actual_tokens)
        self._end_in_background(tenant, end, again)

    def _withdraw(self, tenant, ticket: str, reserved_tokens: int) -> None:
        """Undo in the background the admission of a request refused after all, or abandoned during admission."""
        withdraw = self._withdrawal(tenant, ticket, reserved_tokens)
        self._end_in_background(tenant, withdraw, withdraw)

    def _undo(self, tenant, admission: Admission | None, ticket: str, reserved_tokens: int) -> None:
        """Give back what the admission of a request refused after all may hold: one the store did not answer
        (it may still run it) once the store answers again, an admitted one at once; an answered refusal holds
        nothing."""
        if admission is None or not admission.held:
            return
        if admission.unsettled:
            withdraw = self._withdrawal(tenant, ticket, reserved_tokens)
            self._end_late(withdraw, again=withdraw)
        else:
            self._withdraw(tenant, ticket, reserved_tokens)

    def _ending(self, tenant, ticket: str, reserved_tokens: int, actual_tokens: int) -> tuple[Ending, Ending]:
        """The store call that ends a served request's admission, and the one to repeat it with.

        Releasing and settling are harmless twice, except an excess (more tokens used than reserved): an end
        the store did not answer may still have charged it, so it is repeated by releasing only.
        """
        limiter = self.services.stores.limiter
        end = functools.partial(limiter.end, tenant, ticket=ticket, reserved_tokens=reserved_tokens,
                                actual_tokens=actual_tokens)
        if actual_tokens <= reserved_tokens:
            return end, end
        return end, functools.partial(limiter.release, tenant, ticket=ticket)

    def _withdrawal(self, tenant, ticket: str, reserved_tokens: int) -> Ending:
        """The store call that withdraws an admission (harmless twice)."""
        return functools.partial(self.services.stores.limiter.withdraw, tenant, ticket=ticket,
                                 reserved_tokens=reserved_tokens)

    def _end_in_background(self, tenant, end: Ending, again: Ending) -> None:
        """Run `_end_admission` in the background; a concurrency refusal meanwhile waits for its first try."""
        tried = asyncio.get_running_loop().create_future()
        task = self.services.background.spawn(self._end_admission(end, again, tried), name="limits-release")
        task.add_done_callback(functools.partial(_resolve, tried))     # cancelled before its first try, too
        if tenant.limits.concurrent is not None:
            releasing = self._releasing.setdefault(tenant.name, set())
            releasing.add(tried)
            tried.add_done_callback(functools.partial(self._released, tenant.name))

    def _released(self, tenant_name: str, tried: asyncio.Future) -> None:
        releasing = self._releasing.get(tenant_name)
        if releasing is not None:
            releasing.discard(tried)
            if not releasing:
                del self._releasing[tenant_name]

    async def _end_admission(self, end: Ending, again: Ending, tried: asyncio.Future) -> None:
        """End an answered admission. Should the store not answer (a network blip), the slot would stay taken
        for the in-flight TTL (15 minutes): so it is ended `again` every STORE_RETRY_S until the store answers,
        for up to LATE_END_S.

        `tried` resolves after the first try: a request refused for concurrency waits for that try, never for
        the retries, which last as long as the store is away.
        """
        answered = await end()
        _resolve(tried)
        if not answered:
            await asyncio.sleep(STORE_RETRY_S)
            await _until_answered(again)

    def _end_late(self, end: Ending, *, again: Ending) -> None:
        """End, in the background, an admission the store was asked for and did not answer in time."""
        self.services.background.spawn(self._end_when_answered(end, again), name="limits-late-end")

    async def _end_when_answered(self, end: Ending, again: Ending) -> None:
        """A stalled Redis runs the admission it did not answer once it resumes, taking a concurrency slot for
        the in-flight TTL (15 minutes). So: end it until Redis answers an end, then once more (`again`), which
        Redis surely runs after the late admission. Given up after LATE_END_S (the TTL frees the slot then)."""
        if await _until_answered(end):
            await again()

    async def finish(self, ctx: RequestContext) -> None:
        tenant = ctx.tenant
        if tenant is None:
            return
        hold = refusal = None
        if tenant.budget.limited:
            hold, refusal = ctx.extra.pop(BUDGET_HOLD, None), ctx.extra.pop(BUDGET_REFUSAL, None)
        charge_later(self.services, tenant, ctx.cost_usd, hold)
        if ctx.admission is not None and ctx.admission.held:     # else the store never saw it: nothing to end
            # a hit called no model: it uses none of the tenant's tokens per minute (its request counts)
            used = 0 if ctx.cache_status == "hit" else ctx.usage.input_tokens + ctx.usage.output_tokens
            if ctx.error is not None and ctx.error in (refusal, ctx.extra.get(SLA_REFUSAL)):
                # refused, for its budget or its route's SLA, after the cache missed
                self._undo(tenant, ctx.admission, ctx.admission.ticket, ctx.reserved_tokens)
            elif ctx.admission.unsettled:       # admitted degraded: the store may apply it late
                end, again = self._ending(tenant, ctx.admission.ticket, ctx.reserved_tokens, used)
                self._end_late(end, again=again)
            else:
                self._give_back(tenant, ctx.admission.ticket, ctx.reserved_tokens, actual_tokens=used)


def output_reserve(ctx: RequestContext) -> int:
    """The answer's tokens reserved at admission: max_tokens (or the default) for each of its n choices; none
    for embeddings, whose answer is no tokens."""
    if ctx.endpoint == "embeddings":
        return 0
    return (DEFAULT_OUTPUT_RESERVE if ctx.max_tokens is None else ctx.max_tokens) * ctx.choices


def reservation_usd(ctx: RequestContext) -> Decimal:
    """What a budgeted request holds of its budget while in flight: the cost the router predicted for it on the
    model its plan calls first (its prompt, and max_tokens or the route's expected output length, for each of
    its n choices); a model the router did not judge (a route's fallback) is priced by those tokens alone."""
    decision = ctx.decision
    if decision is None or not decision.plan:
        return Decimal(0)
    first = decision.plan[0]
    for candidate in decision.candidates:
        if candidate.model.name == first.name:
            return candidate.predicted_cost_usd
    return token_cost_usd(first, Usage(ctx.prompt_tokens, decision.output_tokens * ctx.choices))


def _cache_may_answer(ctx: RequestContext, state: BudgetState) -> bool:
    """Whether a request refused for its spent budget may still be answered, free, from the cache: its refusal
    then waits for the cache's miss (a store outage is refused at once)."""
    return ctx.cache_lookup and ctx.cache_key is not None and state.reason != "store_unavailable"


def _resolve(future: asyncio.Future, *_) -> None:
    """Mark `future` done, once (also a done callback: the finished task is ignored)."""
    if not future.done():
        future.set_result(None)


async def _until_answered(end: Ending) -> bool:
    """Call `end` every STORE_RETRY_S until the store answers it; False when LATE_END_S passed first."""
    deadline_s = time.monotonic() + LATE_END_S
    while not await end():
        if time.monotonic() > deadline_s:
            return False
        await asyncio.sleep(STORE_RETRY_S)
    return True
