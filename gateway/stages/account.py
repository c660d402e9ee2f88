"""account: tokens (upstream usage first, tiktoken when absent), cost, latency samples.

It wraps `call`: its finish runs once the call has ended, streams included.

Every attempt is priced, failed fallback attempts included, by what the
gateway can see it consumed:

- tokens: the upstream's usage; else, for an answer that came (whole, or a
  stream cut after its first chunk), the prompt and the text received,
  counted with tiktoken and marked estimated. An attempt that failed before
  any answer text arrived (connect error, timeout, 429, 5xx, a non-streamed
  body cut mid-way, which cannot be read) is charged no tokens: providers
  do not bill refused requests, and the gateway cannot prove what a cut body held.
- GPU time (self-hosted, `gpu_hour_usd`): every attempt that reached the
  model server pays the time it held its share of the GPUs, success or not;
  one whose connection never opened, or that got no call slot, pays nothing.
"""

from __future__ import annotations

import time
from decimal import Decimal

from gateway.context import Attempt, RequestContext, Usage
from gateway.cost import format_usd, request_cost_usd


def gpu_seconds(attempt: Attempt) -> float | None:
    """A self-hosted request's share of GPU time: its duration over the model's concurrency, per GPU."""
    model = attempt.model
    if model.gpu_hour_usd is None or attempt.ended_s is None or not attempt.dispatched \
            or attempt.error_type == "connect_error":
        return None
    return (attempt.ended_s - attempt.started_s) * model.gpu_count / model.max_concurrency


class Account:
    """Settles what the request used and cost, and teaches the router what it measured."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        return None

    async def finish(self, ctx: RequestContext) -> None:
        ctx.ended_s = time.perf_counter()
        if not ctx.attempts:
            return
        answered = ctx.attempts[-1]
        total = Decimal(0)
        for attempt in ctx.attempts:
            attempt.cost_usd = request_cost_usd(attempt.model, attempt.usage or Usage(),
                                                gpu_seconds=gpu_seconds(attempt))
            total += attempt.cost_usd
        ctx.cost_usd = total
        ctx.usage = answered.usage or Usage()
        ctx.ttft_s = answered.ttft_s
        self._learn(ctx, answered)
        if ctx.response is not None and not ctx.response.prepared:
            ctx.response.headers["x-gateway-cost-usd"] = format_usd(total)

    def _learn(self, ctx: RequestContext, attempt: Attempt) -> None:
        """Feed the router: TTFT, time per output token and output length of a successful answer, per choice
        (the `n` choices of a request are generated together, as the router predicts them)."""
        if attempt.status != 200 or attempt.ended_s is None or ctx.endpoint == "embeddings":
            return
        output = -(-ctx.usage.output_tokens // max(1, ctx.choices))
        elapsed_s = attempt.ended_s - attempt.started_s
        fleet = self.services.fleet
        if attempt.ttft_s is not None:
            ttft_s = attempt.ttft_s
        elif output <= 1:                   # a one-token answer: all of it was the wait for the first token
            ttft_s = elapsed_s
        else:   # a whole answer at once: the model's usual TTFT, the rest is generation
            ttft_s = min(elapsed_s, fleet.estimates.ttft_p50_s(attempt.model.name))
        tpot_s = (elapsed_s - ttft_s) / (output - 1) if output > 1 else None
        fleet.record_latency(attempt.model.name, ttft_s, tpot_s)
        if ctx.decision is not None and output:
            fleet.estimates.record_output_tokens(ctx.decision.route.name, output)
