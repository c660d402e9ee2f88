"""The order a request flows through the gateway, written down once.

Each stage's `handle` runs in the order of `STAGES`; a stage answers early
(401, 429, a cache hit) by returning a response, and the stages after it do
not run. Then every stage that ran has its `finish` run in reverse order, like
the layers of an onion: `account` wraps `call`, so its finish sees the
finished call and prices it; `observe`, first in, is last out and records the
span tree and metrics of everything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import GatewayError, ShuttingDown
from gateway.responses import error_response
from gateway.stages import account, admit, cache, call, count, identify, observe, parse, route

log = logging.getLogger("gateway")

#: observe, identify, parse, count, route, lookup, admit, cache, account, call
#: (the cache read starts before admission and is awaited after it: the two store round trips overlap)
STAGES = (
    observe.Observe,
    identify.Identify,
    parse.Parse,
    count.Count,
    route.Route,
    cache.Lookup,
    admit.Admit,
    cache.Cache,
    account.Account,
    call.Call,
)


class Stage(Protocol):
    """The one contract every stage keeps."""

    async def handle(self, ctx: RequestContext) -> web.StreamResponse | None:
        """Do this stage's work; return a response to answer the request here."""

    async def finish(self, ctx: RequestContext) -> None:
        """After the response: release, record, account. Never raises."""


class Pipeline:
    """The frozen list of stage instances that serves every request."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self.stages = stages

    async def run(self, ctx: RequestContext) -> web.StreamResponse:
        """Serve one request through the stages and return its response."""
        ran: list[Stage] = []
        response: web.StreamResponse | None = None
        try:
            for stage in self.stages:
                ran.append(stage)
                response = await stage.handle(ctx)
                if response is not None:
                    break
        except GatewayError as exc:
            response = self._failed(ctx, exc, exc)
        except asyncio.CancelledError:
            if not ctx.cut_by_shutdown or asyncio.current_task().uncancel():
                ctx.status = 499        # the client went away
                await self._end(ctx, ran)
                raise
            # the drain ran out (a stream's relay has said so in-band): a 503 the client may retry elsewhere
            ended = ShuttingDown("the gateway is shutting down; try again")
            response = self._failed(ctx, ended, ended)
        except Exception as exc:        # the last line of defence for one request
            log.exception("request %s failed", ctx.request_id)
            response = self._failed(ctx, exc, GatewayError("internal error"))
        ctx.response = response
        await self._end(ctx, ran)
        if response is None:
            raise RuntimeError("the pipeline ended without a response")
        return response

    @staticmethod
    def _failed(ctx: RequestContext, exc: Exception, shown: GatewayError) -> web.StreamResponse:
        ctx.error = exc
        if ctx.response is not None and ctx.response.prepared:
            return ctx.response
        ctx.status = shown.status
        return error_response(shown, request_id=ctx.request_id)

    async def _end(self, ctx: RequestContext, ran: list[Stage]) -> None:
        """Run the finishes; a background response's (`ctx.settling`) once it has ended, its request ending now."""
        if ctx.settling is None:
            await self._finish(ctx, ran)
            return
        ctx.ended_s = time.perf_counter()
        ctx.settling.settle_later(self._finish(ctx, ran))

    @staticmethod
    async def _finish(ctx: RequestContext, ran: list[Stage]) -> None:
        for stage in reversed(ran):
            try:
                await stage.finish(ctx)
            except Exception:
                log.exception("finishing %s failed for request %s", type(stage).__name__, ctx.request_id)
