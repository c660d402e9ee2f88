"""What happens to a finished request: its ledger line, and its cost booked to its task."""

from __future__ import annotations

from gateway.background import background_status
from gateway.context import Attempt, RequestContext, Usage
from gateway.cost import plain_usd
from gateway.ledger import Ledger
from gateway.outcomes import Book, OutcomeBook
from gateway.policy.model import Policy
from gateway.stages.account import gpu_seconds
from gateway.telemetry.genai import outcome


#: how much of the SHA-256 of the policy file that served a request its ledger line keeps (as the reload log names it)
POLICY_DIGITS = 12


def ledger_record(ctx: RequestContext) -> dict:
    """The request's compact record: what was decided, used, paid and measured; no prompt text."""
    usage = ctx.usage
    return {
        "ts": round(ctx.started_unix_s, 3), "request_id": ctx.request_id, "tenant": ctx.tenant_name,
        "endpoint": ctx.endpoint, "alias": ctx.requested_model, "route": ctx.route_name,
        "model": ctx.model_selected, "models_tried": [a.model.name for a in ctx.attempts],
        "fallback": ctx.fallback_state, "fallback_reason": ctx.fallback_reason,
        "cache": ctx.cache_status, "stream": ctx.stream, "status": ctx.status, "outcome": outcome(ctx),
        "prompt_tokens": ctx.prompt_tokens, "longest_prompt_tokens": ctx.longest_prompt_tokens,
        "uses": list(ctx.uses) if ctx.uses else [],
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens, "tokens_estimated": usage.estimated,
        "cost_usd": plain_usd(ctx.cost_usd), "saved_usd": plain_usd(ctx.cache_saved_usd),
        "latency_s": round(ctx.duration_s, 6),
        "ttft_s": round(ctx.ttft_s, 6) if ctx.ttft_s is not None else None,
        "energy_j": ctx.energy_j, "sla_met": ctx.decision.sla_met if ctx.decision else None,
        "budget_downgrade": ctx.budget_downgrade,
        "continues": ctx.decision is not None and ctx.decision.pinned,
        "background": background_status(ctx),
        "task_id": ctx.task_id, "workflow": ctx.workflow,
        "attempts": [attempt_record(a) for a in ctx.attempts],
        "policy": ctx.policy.content_sha256[:POLICY_DIGITS],
    }


def attempt_record(attempt: Attempt) -> dict:
    """One upstream attempt in the ledger: how it ended, what it used and cost; its tokens by every kind the
    price tells apart (cached input is cheaper), so the line's cost can be worked out again from the policy."""
    usage = attempt.usage or Usage()
    duration_s = attempt.ended_s - attempt.started_s if attempt.ended_s is not None else None
    return {
        "model": attempt.model.name, "status": attempt.status, "error": attempt.error_type,
        "duration_s": duration_s, "gpu_s": gpu_seconds(attempt),
        "input_tokens": usage.input_tokens, "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens,
        "audio_input_tokens": usage.audio_input_tokens, "audio_output_tokens": usage.audio_output_tokens,
        "cache_write_input_tokens": usage.cache_write_input_tokens,
        "tokens_estimated": usage.estimated, "energy_j": attempt.energy_j,
        "cost_usd": plain_usd(attempt.cost_usd),
    }


class Recorder:
    """Books each finished request into the outcome book and, when enabled, the ledger."""

    def __init__(self, policy: Policy) -> None:
        self.outcomes: Book = OutcomeBook()      # services_ctx gives it the stores' book: Redis when there is one
        self.ledger = Ledger(policy.ledger) if policy.ledger.path else None

    def record(self, ctx: RequestContext) -> None:
        """Book the request's cost to its task (a shared book writes it in the background) and write its
        ledger line; nothing here waits."""
        if ctx.decision is not None:
            self.outcomes.track(request_id=ctx.request_id, task_id=ctx.task_id, route=ctx.route_name,
                                tenant=ctx.tenant_name, workflow=ctx.workflow, cost_usd=ctx.cost_usd,
                                priced_late=ctx.priced_late)
        if self.ledger is not None:
            self.ledger.write(ledger_record(ctx))

    def pricing(self, ctx: RequestContext, *, for_s: float) -> None:
        """A finished request whose cost is still being priced (its measured joules), to be booked by `record` when
        it is: a report naming it waits for that, at most `for_s`."""
        if ctx.decision is not None:
            self.outcomes.pricing(request_id=ctx.request_id, task_id=ctx.task_id, tenant=ctx.tenant_name,
                                  for_s=for_s)

    def outcome(self, record: dict) -> None:
        """An outcome line in the ledger, beside the requests it judges."""
        if self.ledger is not None:
            self.ledger.write({"type": "outcome", **record})

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
