"""identify: API key -> tenant (keys are stored hashed); open when the policy has no tenants."""

from __future__ import annotations

from gateway.context import RequestContext


class Identify:
    """Finds the tenant a request's key belongs to; 401 for a missing or unknown key."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        ctx.tenant = ctx.runtime.identity.identify(ctx.http.headers)
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
