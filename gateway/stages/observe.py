"""observe: the SERVER span around everything, then the span tree's end and the metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
from decimal import Decimal

from gateway.context import RequestContext
from gateway.cost import energy_cost_usd
from gateway.stages.cache import reprice_stored
from gateway.tenancy.budgets import charge_later

log = logging.getLogger(__name__)


class Observe:
    """First in, last out: starts the request's span and, when all else is done, records it.

    The recording (span tree, metrics, ledger, outcome book) is scheduled as an
    event-loop callback, so it runs just after the response has been written
    and adds nothing to the client's wait; callbacks run before the loop reads
    the sockets again, so the gateway's next request already sees it.

    When an attempt ran on measured GPUs, its joules are known only after the
    sample that closes its last interval: the request is then recorded in the
    background, once they are in, never holding up the response; an answer's
    joules per output token then feed the router's energy estimate.
    """

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        self.services.telemetry.start_request(ctx, ctx.http.headers)
        return None

    async def finish(self, ctx: RequestContext) -> None:
        if ctx.priced_late:
            recording = self.services.background.spawn(self._record_with_energy(ctx), name="energy-attribution")
            pricing = self.services.pricing.setdefault(ctx.tenant_name, set())   # an outcome report waits for it
            pricing.add(recording)
            recording.add_done_callback(functools.partial(_recorded, self.services.pricing, ctx.tenant_name))
            # and one through another worker or replica, with a shared book
            self.services.recorder.pricing(ctx, for_s=self.services.pricing_s)
        else:
            asyncio.get_running_loop().call_soon(self._record_now, ctx)

    def _record_now(self, ctx: RequestContext) -> None:
        """_record as a loop callback: a failure is logged here, as the pipeline would have."""
        try:
            self._record(ctx)
        except Exception:
            log.exception("recording request %s failed", ctx.request_id)

    def _record(self, ctx: RequestContext) -> None:
        try:
            self.services.telemetry.finish_request(ctx)
        finally:                            # the ledger line and the task's cost are kept whatever telemetry does
            self.services.record_request(ctx)

    async def _record_with_energy(self, ctx: RequestContext) -> None:
        """Wait for each measured attempt's joules, add their cost, then record the request. An attempt whose
        joules are not whole (its GPUs failed, or its books did not settle) has None, and so has the request:
        no part is recorded, priced or taught as if it were the whole."""
        energy = self.services.energy
        measured = [attempt for attempt in ctx.attempts if attempt.energy_id is not None]
        energy_usd = Decimal(0)
        try:
            for attempt in measured:
                attempt.energy_j = await energy.request_finished(attempt.energy_id)
                if attempt.energy_j is not None and attempt.status == 200 and attempt.usage is not None \
                        and self.services.fleet.draws_as(attempt.model):   # not where a reload has since moved it
                    # teach the router, as account does latency: each whole measurement is one
                    self.services.fleet.record_energy(attempt.model.name, attempt.energy_j,
                                                      attempt.usage.output_tokens)
            if all(attempt.energy_j is not None for attempt in measured):   # else the request's energy is unknown:
                for attempt in measured:                                    # no part of it is priced either
                    extra_usd = energy_cost_usd(attempt.model, attempt.energy_j)
                    attempt.cost_usd += extra_usd
                    energy_usd += extra_usd
                    if attempt is ctx.attempts[-1]:     # the answer a stored entry holds: what a hit on it saves
                        reprice_stored(self.services, ctx, extra_usd)
                ctx.cost_usd += energy_usd
                ctx.energy_j = sum(attempt.energy_j for attempt in measured)
        finally:
            charge_later(self.services, ctx.tenant, energy_usd)   # admit charged the rest as the answer left
            self._record(ctx)


def _recorded(pricing: dict, tenant_name: str, recording: asyncio.Task) -> None:
    """A recording that waited for its joules is done: its request is booked to its task, energy priced."""
    waiting = pricing.get(tenant_name)
    if waiting is not None:
        waiting.discard(recording)
        if not waiting:
            del pricing[tenant_name]
