"""route: match the policy route, then plan the models that meet its SLA, smallest first."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.routing.request import decide_request


class Route:
    """Chooses the route and the plan of models; answers 404 for an alias no route takes."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        router = self.services.fleet.router(ctx.policy)
        with self.services.telemetry.route_span(ctx):
            ctx.decision, tighten = decide_request(
                ctx.runtime, router, endpoint=ctx.endpoint, alias=ctx.requested_model, tenant=ctx.tenant,
                headers=ctx.http.headers, prompt_tokens=ctx.prompt_tokens, max_tokens=ctx.max_tokens,
                stream=ctx.stream, choices=ctx.choices)
        ctx.sla_tightened = tighten.as_dict()
        if ctx.budget_downgrade:
            ctx.decision = router.cheapest(ctx.decision)
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
