"""route: match the policy route, then plan the models that meet its SLA, smallest first.

It runs before admission, so a request for a model no route serves (404) or a route its tenant may not
use (403) takes nothing from the tenant's limits; admission re-plans cheapest first when the budget says
downgrade.
"""

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
                stream=ctx.stream, choices=ctx.choices, longest_prompt_tokens=ctx.longest_prompt_tokens)
            ctx.sla_tightened = tighten.as_dict()     # inside: the span records the limits the request asked for
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
