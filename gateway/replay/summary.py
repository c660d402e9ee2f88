"""The numbers of one replay: counts, cost, latency percentiles, SLA attainment, energy, per minute."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from gateway.policy.model import Route
from gateway.replay.outcome import Outcome, ReplayResult

QUANTILES = (0.50, 0.95, 0.99)
#: the statuses of answered requests: by a model, or from the cache (at once, latency 0)
ANSWERED = frozenset({"ok", "cache_hit"})


@dataclass(frozen=True)
class Percentiles:
    """Nearest-rank p50, p95 and p99, in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class RouteSla:
    """How many of a route's requests met its SLA on the simulated numbers."""

    route: str
    p95_latency_ms: float | None
    p95_ttft_ms: float | None
    requests: int
    met: int

    @property
    def share(self) -> float | None:
        """met / requests, or None for a route with no requests."""
        return self.met / self.requests if self.requests else None


@dataclass(frozen=True)
class Minute:
    """One minute of arrivals: requests, their cost, the p95 latency of those answered."""

    minute: int
    requests: int
    cost_usd: Decimal
    p95_latency_ms: float | None


@dataclass(frozen=True)
class Summary:
    """Everything the report says about one policy's replay."""

    policy: str
    requests: int                       # replayed: the traffic's refused lines left out
    served: int                         # answered by a model
    rejected: dict[str, int]            # reason -> requests
    failed: dict[str, int]
    cache_hits: int                     # recorded cache hits, routed and answered at no cost
    refused_in_trace: int               # lines the traffic's own gateway refused before routing: not replayed
    estimated_output: int               # calls that failed in the trace, replayed with their route's median output
    routed_by_recorded_route: int       # a header-matched route could take them: the route their line recorded
    matched_without_headers: int        # a header-matched route could take them, no recorded route to use
    fallbacks: int                      # answered by a model after another one failed
    best_effort: int                    # the router predicted no candidate met the SLA
    per_model: dict[str, int]
    tokens: int                         # input + output of answered requests
    cost_usd: Decimal                   # every attempt's, those of failed requests included
    cost_per_request_usd: Decimal | None  # per answered request: by a model or from the cache
    cost_per_1k_tokens_usd: Decimal | None
    latency: Percentiles | None         # of answered requests, cache hits (0) included
    ttft: Percentiles | None            # of answered streams, cache hits (0) included: a whole answer has no TTFT
    queued: int                         # requests that waited for a slot, answered or not
    sla: tuple[RouteSla, ...]
    energy_j: float | None              # every attempt's; n/a unless each one's model has a power assumption
    energy_per_request_j: float | None  # per answered request, cache hits included
    per_minute: tuple[Minute, ...]


def summarize(result: ReplayResult) -> Summary:
    """The Summary of one replay."""
    outcomes = result.outcomes
    served = [o for o in outcomes if o.status == "ok"]
    tokens = sum(o.input_tokens + o.output_tokens for o in served)
    cost_usd = sum((o.cost_usd for o in outcomes), Decimal(0))
    called = [o for o in outcomes if o.models_tried]
    known = bool(called) and all(o.energy_j is not None for o in called)
    answered = [o for o in outcomes if o.status in ANSWERED]       # by a model, or at once from the cache
    energy_j = sum(o.energy_j for o in called) if known else None    # n/a unless every call has one
    return Summary(
        policy=result.policy.source, requests=len(outcomes), served=len(served),
        rejected=_reasons(outcomes, "rejected"), failed=_reasons(outcomes, "failed"),
        cache_hits=sum(1 for o in outcomes if o.status == "cache_hit"), refused_in_trace=result.refused_in_trace,
        estimated_output=result.estimated_output,
        routed_by_recorded_route=result.routed_by_recorded_route,
        matched_without_headers=result.matched_without_headers,
        fallbacks=sum(1 for o in served if len(o.models_tried) > 1),
        best_effort=sum(1 for o in outcomes if o.planned_sla_met is False),
        per_model=dict(sorted(Counter(o.model for o in served).items())),
        tokens=tokens, cost_usd=cost_usd,
        cost_per_request_usd=cost_usd / len(answered) if answered else None,
        cost_per_1k_tokens_usd=cost_usd * 1000 / tokens if tokens else None,
        latency=percentiles([o.latency_s for o in answered]),
        ttft=percentiles([o.ttft_s for o in answered if o.ttft_s is not None]),
        queued=sum(1 for o in outcomes if o.queue_s > 0),
        sla=tuple(_route_sla(route, outcomes) for route in result.policy.routes),
        energy_j=energy_j, energy_per_request_j=energy_j / len(answered) if energy_j is not None and answered else None,
        per_minute=per_minute(outcomes))


def percentiles(values_s: Sequence[float]) -> Percentiles | None:
    """Nearest-rank p50/p95/p99 of seconds, in milliseconds; None when empty."""
    if not values_s:
        return None
    ordered = sorted(values_s)
    return Percentiles(*(nearest_rank(ordered, q) * 1000.0 for q in QUANTILES))


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def per_minute(outcomes: Sequence[Outcome]) -> tuple[Minute, ...]:
    """Per arrival minute (0 = the first minute of the traffic), including empty minutes; cost of every
    request, p95 latency of the answered ones."""
    if not outcomes:
        return ()
    last = int(max(o.arrival_s for o in outcomes) // 60)
    counts = [0] * (last + 1)
    costs = [Decimal(0)] * (last + 1)
    latencies: list[list[float]] = [[] for _ in range(last + 1)]
    for outcome in outcomes:
        minute = int(outcome.arrival_s // 60)
        counts[minute] += 1
        costs[minute] += outcome.cost_usd
        if outcome.status in ANSWERED:
            latencies[minute].append(outcome.latency_s)
    return tuple(Minute(m, counts[m], costs[m],
                        nearest_rank(sorted(latencies[m]), 0.95) * 1000.0 if latencies[m] else None)
                 for m in range(last + 1))


def _reasons(outcomes: Sequence[Outcome], status: str) -> dict[str, int]:
    """Requests per reason among those with `status`."""
    return dict(sorted(Counter(o.reason for o in outcomes if o.status == status).items()))


def _route_sla(route: Route, outcomes: Sequence[Outcome]) -> RouteSla:
    """A route's SLA attainment: unanswered requests count as missed, cache hits as met."""
    mine = [o for o in outcomes if o.route == route.name]
    return RouteSla(route.name, route.sla.p95_latency_ms, route.sla.p95_ttft_ms,
                    len(mine), sum(1 for o in mine if o.sla_ok))
