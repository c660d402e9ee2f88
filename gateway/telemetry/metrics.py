"""Metric instruments: the GenAI client metrics (advised buckets) and the gateway's own."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Meter, Observation
from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import GEN_AI_TOKEN_TYPE
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics

from gateway.context import CLIENT_DISCONNECTED, SHUTTING_DOWN
from gateway.telemetry import genai
from gateway.telemetry.histograms import Buckets
from gateway.telemetry.sums import Sums

if TYPE_CHECKING:
    from gateway.context import Attempt, RequestContext, Usage

#: the attempts that answered, if only in part: succeeded, or cut short by the client leaving or a shutdown
CUT_SHORT = (None, CLIENT_DISCONNECTED, SHUTTING_DOWN)

#: advised ExplicitBucketBoundaries of gen_ai.client.token.usage (semconv v1.41.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
#: advised boundaries of gen_ai.client.operation.duration, time_to_first_chunk, time_per_output_chunk
DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
ROUTING_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
QUEUE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ESTIMATE_ERROR_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

CACHE_LOOKUP_STATUSES = frozenset({"hit", "miss", "stored"})


def histograms() -> dict[str, Buckets]:
    """The gateway's histograms, made before the meter provider: its readers export them."""
    made = [
        Buckets(gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}",
                description="Number of input and output tokens used.", boundaries=TOKEN_BUCKETS),
        Buckets(gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION, unit="s", description="GenAI operation duration.",
                boundaries=DURATION_BUCKETS_S),
        Buckets(gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, unit="s",
                description="Time to receive the first chunk of a streamed response.", boundaries=DURATION_BUCKETS_S),
        Buckets(gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK, unit="s",
                description="Time between consecutive chunks of a streamed response.",
                boundaries=DURATION_BUCKETS_S),
        Buckets("gateway.routing.duration", unit="s", description="Time spent choosing a model.",
                boundaries=ROUTING_BUCKETS_S),
        Buckets("gateway.queue.wait", unit="s",
                description="Time an attempt waited for a call slot on a saturated model (routing.queue_timeout_ms), "
                            "by gateway.queue.result: granted, timeout or cancelled.",
                boundaries=QUEUE_BUCKETS_S),
        Buckets("gateway.tokens.estimate_error", unit="{token}",
                description="|gateway prompt-token estimate - upstream count|, signed by "
                            "gateway.tokens.error.direction.",
                boundaries=ESTIMATE_ERROR_BUCKETS),
    ]
    return {histogram.name: histogram for histogram in made}


class Instruments:
    """Every instrument the gateway records: histograms and sums aggregated by the gateway, read by the SDK."""

    def __init__(self, meter: Meter, dropped: Callable[[], Iterable[tuple[dict[str, str], int]]],
                 buckets: dict[str, Buckets]) -> None:
        self.token_usage = buckets[gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE]
        self.operation_duration = buckets[gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION]
        self.time_to_first_chunk = buckets[gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK]
        self.time_per_output_chunk = buckets[gen_ai_metrics.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK]
        self.routing_duration = buckets["gateway.routing.duration"]
        self.estimate_error = buckets["gateway.tokens.estimate_error"]
        self.queue_wait = buckets["gateway.queue.wait"]
        self._gateway_instruments(meter)
        # always reports (every drop kind, zero included): so every collection has SDK data and reaches the
        # readers' exporters, which add the gateway's histograms to it
        meter.create_observable_counter(
            "gateway.telemetry.dropped", unit="{item}", description="Spans and metric points the gateway dropped.",
            callbacks=[lambda _options: [Observation(count, labels) for labels, count in dropped()]])

    def _gateway_instruments(self, meter: Meter) -> None:
        self.requests = Sums(meter, "gateway.requests", unit="{request}", description="Requests handled.")
        self.outcomes = Sums(meter, "gateway.outcomes", unit="{request}", description="Requests by outcome.")
        self.cost = Sums(meter, "gateway.cost", unit="USD", description="Upstream cost of requests.")
        self.cache_lookups = Sums(meter, "gateway.cache.lookups", unit="{lookup}",
                                  description="Response cache lookups by status.")
        self.cache_saved = Sums(meter, "gateway.cache.saved", unit="USD", description="Cost that cache hits saved.")
        self.fallbacks = Sums(meter, "gateway.fallbacks", unit="{request}",
                              description="Requests that retried or fell back, by state and reason.")
        self.sla = Sums(meter, "gateway.sla", unit="{request}",
                        description="Requests served by their routing decision, by SLA met or missed; refused for "
                                    "the SLA: missed.")
        self.in_flight = Sums(meter, "gateway.in_flight", unit="{request}", monotonic=False,
                              description="Upstream attempts in flight per model.")
        self.energy = Sums(meter, "gateway.energy", unit="J", description="GPU energy attributed to requests.")
        self.task_outcomes = Sums(meter, "gateway.task.outcomes", unit="{task}",
                                  description="Reported task outcomes (POST /v1/outcomes).")
        self.task_cost = Sums(
            meter, "gateway.task.cost", unit="USD",
            description="Cost of tasks with a reported outcome; by outcome, so cost per successful task = "
                        "sum over outcomes / successes.")

    def record_routing(self, ctx: RequestContext, tenant_label: str) -> None:
        """gateway.routing.duration, when the request was routed."""
        if ctx.routing_s is None:
            return
        labels = {genai.TENANT: tenant_label}
        if ctx.route_name:
            labels[genai.ROUTE] = ctx.route_name
        self.routing_duration.record(ctx.routing_s, labels)

    def record_queue(self, attempt: Attempt, tenant_label: str) -> None:
        """gateway.queue.wait, when the attempt waited for a call slot (a slot taken at once is not a wait)."""
        result = attempt.queue_result
        if result is not None and (result != "granted" or attempt.queued_s):
            self.queue_wait.record(attempt.queued_s, {genai.MODEL_SELECTED: attempt.model.name,
                                                      genai.TENANT: tenant_label, "gateway.queue.result": result})

    def record_attempt(self, ctx: RequestContext, attempt: Attempt, tenant_label: str,
                       chunk_gaps_s: Sequence[float] = ()) -> dict[str, Any]:
        """Duration, time to first chunk and time per output chunk of one attempt; returns the attempt's labels,
        which the request's token usage reuses for the attempt that answered."""
        labels = genai.attempt_metric_labels(ctx, attempt, tenant_label)
        if attempt.ended_s is not None:
            self.operation_duration.record(max(0.0, attempt.ended_s - attempt.started_s), labels)
        if ctx.stream and attempt.ttft_s is not None:
            self.time_to_first_chunk.record(attempt.ttft_s, labels)
        for gap_s in chunk_gaps_s:
            self.time_per_output_chunk.record(gap_s, labels)
        return labels

    def record_request(self, ctx: RequestContext, tenant_label: str,
                       last_attempt_labels: dict[str, Any] | None = None) -> None:
        """The per-request gateway metrics, and token usage of the answering attempt (`last_attempt_labels`: the
        labels `record_attempt` gave the last attempt, when it was recorded, so they are not built twice)."""
        labels = genai.metric_labels(ctx, tenant_label)
        self.requests.add(1, labels)
        self.outcomes.add(1, {**labels, genai.OUTCOME: genai.outcome(ctx)})
        if ctx.attempts:        # each attempt's cost under the model that ran it (a failed call may cost GPU time)
            for attempt in ctx.attempts:
                self.cost.add(float(attempt.cost_usd), {**labels, genai.MODEL_SELECTED: attempt.model.name})
        else:
            self.cost.add(float(ctx.cost_usd), labels)
        if ctx.energy_j is not None:    # each attempt's joules under the model whose GPUs used them, as its cost
            for attempt in ctx.attempts:
                if attempt.energy_j is not None:
                    self.energy.add(attempt.energy_j, {**labels, genai.MODEL_SELECTED: attempt.model.name})
        self._record_cache(ctx, labels)
        if ctx.fallback_state != "none":
            self.fallbacks.add(1, {**labels, genai.FALLBACK_REASON: ctx.fallback_reason or "unknown"})
        if (sla := genai.sla_status(ctx)) is not None:
            self.sla.add(1, {**labels, "gateway.sla.status": sla})
        self._record_tokens(ctx, tenant_label, last_attempt_labels)

    def record_task(self, task, tenant_label: str, workflow_label: str | None) -> None:
        """A reported task outcome and the cost of the task it judges."""
        labels = {genai.ROUTE: task.route, genai.TENANT: tenant_label, "gateway.workflow": workflow_label,
                  "gateway.task.outcome": task.outcome}
        self.task_outcomes.add(1, labels)
        self.task_cost.add(float(task.cost_usd), labels)

    def _record_cache(self, ctx: RequestContext, labels: dict[str, Any]) -> None:
        if ctx.cache_status in CACHE_LOOKUP_STATUSES and not ctx.cache_refreshed:   # no-cache: no lookup was made
            self.cache_lookups.add(1, {**labels, genai.CACHE_STATUS: ctx.cache_status})
        if ctx.cache_saved_usd:
            self.cache_saved.add(float(ctx.cache_saved_usd), labels)

    def _record_tokens(self, ctx: RequestContext, tenant_label: str,
                       last_attempt_labels: dict[str, Any] | None = None) -> None:
        """gen_ai.client.token.usage and the estimate error, for the attempt that answered: the last one, when it
        succeeded, the client left, or it broke mid-stream having produced (and been charged for) tokens."""
        last = ctx.attempts[-1] if ctx.attempts else None
        answered = last if last is not None and (last.usage is not None or last.error_type in CUT_SHORT) else None
        if answered is None:
            return
        usage = answered.usage or ctx.usage
        if not (usage.input_tokens or usage.output_tokens):
            return
        labels = last_attempt_labels or genai.attempt_metric_labels(ctx, answered, tenant_label)
        self.token_usage.record(usage.input_tokens, {**labels, GEN_AI_TOKEN_TYPE: "input"})
        if ctx.endpoint != "embeddings":
            self.token_usage.record(usage.output_tokens, {**labels, GEN_AI_TOKEN_TYPE: "output"})
        if not usage.estimated and ctx.prompt_tokens:
            self._record_estimate_error(ctx.prompt_tokens, usage, answered.model.name)

    def _record_estimate_error(self, estimate: int, usage: Usage, model_name: str) -> None:
        error = estimate - usage.input_tokens
        direction = "over" if error > 0 else "under" if error < 0 else "exact"
        self.estimate_error.record(abs(error), {genai.MODEL_SELECTED: model_name,
                                                "gateway.tokens.error.direction": direction})

