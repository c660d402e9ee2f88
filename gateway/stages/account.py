"""account: tokens (upstream usage first, tiktoken when absent), cost, latency samples.

It wraps `call`: its finish runs once the call has ended, streams included.
Its handle, the last before the call, refuses a request whose budget `admit`
found spent but left for the cache to answer: the cache missed.

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
from gateway.errors import UpstreamTimeout
from gateway.stages.admit import BUDGET_REFUSAL


def gpu_seconds(attempt: Attempt) -> float | None:
    """A self-hosted request's share of GPU time: its duration over the model's concurrency, per GPU."""
    model = attempt.model
    if model.gpu_hour_usd is None or attempt.ended_s is None or not attempt.dispatched \
            or attempt.error_type == "connect_error":
        return None
    return (attempt.ended_s - attempt.started_s) * model.gpu_count / model.max_concurrency


def split_whole_answer(estimates, name: str, elapsed_s: float, output: int) -> tuple[float | None, float | None]:
    """(TTFT, time per output token) to learn from an answer that came whole in `elapsed_s`, whose split is not
    seen: the part the model's estimates make the larger takes the rest of the time, the other is not learned.
    Splitting by the usual TTFT alone would book a slow first token of a short answer as time per token (and
    feed the TTFT estimate the very median it used, so it never moved)."""
    first_s, per_token_s = estimates.latency_p50_s(name)
    generation_s = (output - 1) * per_token_s
    if generation_s < first_s:
        return max(0.0, elapsed_s - generation_s), None
    return None, (elapsed_s - min(elapsed_s, first_s)) / (output - 1)


class Account:
    """Settles what the request used and cost, and teaches the router what it measured."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        refusal = ctx.extra.get(BUDGET_REFUSAL)
        if refusal is not None:
            raise refusal           # the cache had no answer for it: the budget's 429 stands
        return None

    async def finish(self, ctx: RequestContext) -> None:
        if ctx.ended_s is None:             # (a background response's request ended with its create call)
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
        (the `n` choices of a request are generated together, as the router predicts them); and the wait of
        each call that timed out before its first token, as a TTFT of at least that long (a model that hangs on
        a share of its calls, never enough in a row to open its circuit, must not go on looking fast)."""
        fleet = self.services.fleet
        for tried in ctx.attempts:
            if (tried.error_type == UpstreamTimeout.reason and tried.dispatched and tried.ttft_s is None
                    and tried.ended_s):
                fleet.record_latency(tried.model, tried.ended_s - tried.started_s, None)
        if attempt.status != 200 or attempt.ended_s is None or ctx.settling is not None:
            return                          # (a background response's generation is not seen, only its end)
        elapsed_s = attempt.ended_s - attempt.started_s
        if ctx.endpoint == "embeddings":    # no output tokens: the whole call is the wait, as the router predicts it
            fleet.record_latency(attempt.model, elapsed_s, None)
            return
        output = -(-ctx.usage.output_tokens // max(1, ctx.choices))
        if attempt.ttft_s is not None:
            fleet.record_latency(attempt.model, attempt.ttft_s,
                                 (elapsed_s - attempt.ttft_s) / (output - 1) if output > 1 else None)
        elif output <= 1:                   # a one-token answer: all of it was the wait for the first token
            fleet.record_latency(attempt.model, elapsed_s, None)
        else:
            fleet.record_latency(attempt.model, *split_whole_answer(fleet.estimates, attempt.model.name, elapsed_s,
                                                                    output))
        if ctx.decision is not None and output and ctx.max_tokens is None:
            # only uncapped answers: the route's lengths predict requests that set no max_tokens
            fleet.estimates.record_output_tokens(ctx.decision.route.name, output)
