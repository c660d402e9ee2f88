"""route: match the policy route, then plan the models that meet its SLA, smallest first."""

from __future__ import annotations

import time

from gateway.context import RequestContext
from gateway.errors import NotFound
from gateway.routing.tighten import tighten_from_headers


class Route:
    """Chooses the route and the plan of models; answers 404 for an alias no route takes."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        runtime = ctx.runtime
        headers = ctx.http.headers
        started_s = time.perf_counter()
        with self.services.telemetry.route_span(ctx):
            route = runtime.routes.match(ctx.endpoint, ctx.requested_model, ctx.tenant and ctx.tenant.name,
                                         headers, ctx.prompt_tokens)
            if route is None:
                raise NotFound(f"the model '{ctx.requested_model}' does not exist or no route serves it "
                               f"on {ctx.endpoint}", param="model")
            runtime.identity.check_allowed(ctx.tenant, route.name, ctx.requested_model)
            router = self.services.fleet.router(ctx.policy)
            tighten = tighten_from_headers(headers)
            ctx.sla_tightened = tighten.as_dict()
            max_tokens = 0 if ctx.endpoint == "embeddings" else ctx.max_tokens
            ctx.decision = router.decide(route, prompt_tokens=ctx.prompt_tokens, max_tokens=max_tokens,
                                         stream=ctx.stream, tighten=tighten)
        ctx.extra["routing_s"] = time.perf_counter() - started_s
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
