"""observe: the SERVER span around everything, then the span tree's end and the metrics."""

from __future__ import annotations

from gateway.context import RequestContext


class Observe:
    """First in, last out: starts the request's span and, when all else is done, records it."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        self.services.telemetry.start_request(ctx, ctx.http.headers)
        return None

    async def finish(self, ctx: RequestContext) -> None:
        self.services.telemetry.finish_request(ctx)
        self.services.record_request(ctx)
