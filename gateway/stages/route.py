"""route: match the policy route, then plan the models that meet its SLA, smallest first.

It runs before admission, so a request for a model no route serves (404) or a route its tenant may not
use (403) takes nothing from the tenant's limits; admission re-plans cheapest first when the budget says
downgrade.
"""

from __future__ import annotations

from gateway.cache.key import cache_use, is_cacheable
from gateway.context import RequestContext
from gateway.errors import NoModelMeetsSla
from gateway.routing.predict import meets_hard_terms
from gateway.routing.request import decide_request
from gateway.routing.tighten import tighten_from_headers

#: ctx.extra: the 503 of a request no model of its route may serve, which a stored answer still may: `Cache`
#: raises it on a miss
SLA_REFUSAL = "sla_refusal"


class Route:
    """Chooses the route and the plan of models; answers 404 for an alias no route takes."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        router = self.services.fleet.router(ctx.policy)
        with self.services.telemetry.route_span(ctx):
            try:
                ctx.decision, tighten = decide_request(
                    ctx.runtime, router, endpoint=ctx.endpoint, alias=ctx.requested_model, tenant=ctx.tenant,
                    headers=ctx.http.headers, prompt_tokens=ctx.prompt_tokens, max_tokens=ctx.max_tokens,
                    stream=ctx.stream, choices=ctx.choices, longest_prompt_tokens=ctx.longest_prompt_tokens,
                    needs=ctx.uses)
            except NoModelMeetsSla as refusal:
                if not _cache_may_answer(ctx, refusal):
                    raise
                # a stored answer no longer has speed, price or a circuit: the cache is asked first
                ctx.decision, tighten = refusal.decision, tighten_from_headers(ctx.http.headers)
                ctx.extra[SLA_REFUSAL] = refusal
            ctx.sla_tightened = tighten.as_dict()     # inside: the span records the limits the request asked for
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None


def _cache_may_answer(ctx: RequestContext, refusal: NoModelMeetsSla) -> bool:
    """Whether a request refused because no model meets its route's SLA may still be answered from the cache: its
    route caches it, it allows a lookup, and some candidate was dropped only for speed, price, energy or its
    circuit (an answer it stored may serve the request)."""
    decision = getattr(refusal, "decision", None)
    if decision is None or not cache_use(ctx.http.headers, ctx.body)[0]:
        return False            # no lookup will be made (no-cache, or a completion the provider is asked to keep)
    return is_cacheable(ctx.body, decision.route.cache, endpoint=ctx.endpoint) and \
        any(meets_hard_terms(c) for c in decision.candidates)
