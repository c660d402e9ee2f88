"""Per-candidate predictions and verdicts: latency, TTFT, cost, energy, and why a model is dropped.

latency_ms = (TTFT_p95 + (expected_output - 1) × TPOT_p95) × 1000, from the
live estimates. Load: when a model's in-flight calls reach its declared
max_concurrency, new calls queue, so both latency and TTFT are multiplied by
(in_flight + 1) / max_concurrency. Cost is prompt × input price + output ×
output price; a self-hosted model with a GPU-hour price and no token price
costs its predicted latency × gpu_hour_usd / 3600 / max_concurrency (its
share of the GPU while it runs). Energy is the model's measured joules per
output token × expected output (× n choices); a model whose answers have not
been measured yet has no energy prediction and is not held to max_energy_j.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from collections.abc import Mapping
from typing import TypeVar

from gateway.context import Candidate
from gateway.cost import plain_usd
from gateway.policy.model import Model, Sla
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.needs import NO_NEEDS, lacking
from gateway.routing.tighten import Tighten

_T = TypeVar("_T", float, Decimal)
_PER_MTOK = Decimal(1_000_000)
_MS_PER_HOUR = Decimal(3_600_000)


@dataclass(frozen=True, slots=True)
class Limits:
    """The SLA one decision is held to: the route's, tightened by the request."""

    latency_ms: float | None
    ttft_ms: float | None
    min_tier: int
    cost_usd: Decimal | None
    energy_j: float | None = None

    @classmethod
    def of(cls, sla: Sla) -> Limits:
        """A route's own limits."""
        return cls(sla.p95_latency_ms, sla.p95_ttft_ms, sla.min_tier, sla.max_cost_usd, sla.max_energy_j)

    def tightened(self, tighten: Tighten) -> Limits:
        """These limits with a request's asks applied; an ask can only make them stricter."""
        return Limits(_lowest(self.latency_ms, tighten.max_latency_ms),
                      _lowest(self.ttft_ms, tighten.max_ttft_ms),
                      max(self.min_tier, tighten.min_tier or 0),
                      _lowest(self.cost_usd, tighten.max_cost_usd),
                      _lowest(self.energy_j, tighten.max_energy_j))

    def label(self, kind: str) -> str:
        """The SLA term a reason of `kind` (its first word) broke."""
        labels = {"latency": f"p95_latency_ms {_number(self.latency_ms)}",
                  "ttft": f"p95_ttft_ms {_number(self.ttft_ms)}",
                  "cost": f"max_cost_usd {plain_usd(self.cost_usd) if self.cost_usd is not None else None}",
                  "energy": f"max_energy_j {_number(self.energy_j)}",
                  "tier": f"min_tier {self.min_tier}",
                  "context": "the context window", "circuit": "a closed circuit",
                  "unsupported": "what the request uses"}
        return labels.get(kind, kind)


def _number(value: object) -> str:
    """A limit as an SRE wrote it: 200, not 200.0."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _lowest(limit: _T | None, asked: _T | None) -> _T | None:
    """The stricter of a limit and an ask, either possibly None."""
    if asked is None:
        return limit
    return asked if limit is None or asked < limit else limit


class PricedModel:
    """A model with its per-token prices and GPU share precomputed."""

    __slots__ = ("model", "name", "tier", "supports", "context_window", "max_concurrency", "size_b",
                 "input_usd_per_tok", "output_usd_per_tok", "gpu_usd_per_ms")

    def __init__(self, model: Model) -> None:
        self.model = model
        self.name = model.name
        self.tier = model.tier
        self.supports = frozenset(model.supports) if model.supports is not None else None
        self.context_window = model.context_window
        self.max_concurrency = max(1, model.max_concurrency)
        self.size_b = model.size_b
        price = model.price
        self.input_usd_per_tok = price.input_per_mtok / _PER_MTOK
        self.output_usd_per_tok = price.output_per_mtok / _PER_MTOK
        self.gpu_usd_per_ms: Decimal | None = None
        if model.gpu_hour_usd is not None:      # charged beside any token price, per GPU, as account does
            self.gpu_usd_per_ms = model.gpu_hour_usd * model.gpu_count / _MS_PER_HOUR / self.max_concurrency

    @property
    def choice_key(self) -> tuple[float, Decimal]:
        """The order candidates are judged and shown in: (size_b, input price); the plan breaks a size tie by
        each request's predicted cost."""
        return self.size_b, self.model.price.input_per_mtok

    def cost_usd(self, prompt_tokens: int, output_tokens: int, latency_ms: float) -> Decimal:
        """Predicted cost of one request: its tokens, and its share of GPU time when the model has a GPU price."""
        tokens_usd = self.input_usd_per_tok * prompt_tokens + self.output_usd_per_tok * output_tokens
        if self.gpu_usd_per_ms is not None:
            return tokens_usd + self.gpu_usd_per_ms * int(latency_ms)
        return tokens_usd


def judge(priced: PricedModel, estimates: LatencyEstimates, breakers: Breakers, limits: Limits,
          prompt_tokens: int, output_tokens: int, stream: bool, choices: int = 1,
          needed_tokens: int | None = None, needs: Mapping[str, str] = NO_NEEDS) -> Candidate:
    """One candidate's predictions and verdict; `output_tokens` per choice (`n` choices are generated
    together: the latency of one, the output cost of all); `needed_tokens`: what its context must hold (default
    the prompt and `output_tokens`); `needs`: what the request uses beyond text (`gateway.routing.needs`)."""
    name = priced.name
    ttft_s, tpot_s = estimates.latency_p95_s(name)
    ttft_ms = ttft_s * 1000.0
    latency_ms = ttft_ms + (output_tokens - 1 if output_tokens > 1 else 0) * tpot_s * 1000.0
    in_flight = estimates.in_flight(name)
    if in_flight >= priced.max_concurrency:
        load = (in_flight + 1) / priced.max_concurrency
        ttft_ms *= load
        latency_ms *= load
    cost_usd = priced.cost_usd(prompt_tokens, output_tokens * choices, latency_ms)
    per_token_j = estimates.joules_per_output_token(name) if output_tokens > 0 else None
    energy_j = per_token_j * output_tokens * choices if per_token_j is not None else None
    needed = prompt_tokens + output_tokens if needed_tokens is None else needed_tokens
    reasons = _reasons(priced, breakers, limits, needed, stream,
                       latency_ms, ttft_ms, cost_usd, energy_j, needs)
    return Candidate(priced.model, latency_ms, ttft_ms, cost_usd, not reasons, reasons, energy_j)


def _reasons(priced: PricedModel, breakers: Breakers, limits: Limits, needed_tokens: int, stream: bool,
             latency_ms: float, ttft_ms: float, cost_usd: Decimal, energy_j: float | None,
             needs: Mapping[str, str]) -> tuple[str, ...]:
    """Every reason to drop the candidate; empty when it is kept."""
    reasons: list[str] = []
    if needed_tokens > priced.context_window:
        reasons.append(f"context: {needed_tokens} > {priced.context_window}")
    if needs and (missing := lacking(priced.supports, needs)):
        reasons.append(f"unsupported: {', '.join(missing)}")
    if priced.tier < limits.min_tier:
        reasons.append(f"tier {priced.tier} < {limits.min_tier}")
    if limits.latency_ms is not None and latency_ms > limits.latency_ms:
        reasons.append(f"latency {latency_ms:.0f}ms > {limits.latency_ms:g}ms")
    if stream and limits.ttft_ms is not None and ttft_ms > limits.ttft_ms:
        reasons.append(f"ttft {ttft_ms:.0f}ms > {limits.ttft_ms:g}ms")
    if limits.cost_usd is not None and cost_usd > limits.cost_usd:
        reasons.append(f"cost ${plain_usd(cost_usd)} > ${plain_usd(limits.cost_usd)}")
    if limits.energy_j is not None and energy_j is not None and energy_j > limits.energy_j:
        reasons.append(f"energy {energy_j:.1f}J > {limits.energy_j:g}J")
    if not breakers.available(priced.name):
        reasons.append(f"circuit {breakers.state(priced.name)}")
    return tuple(reasons)


def fits(priced: PricedModel, needed_tokens: int, limits: Limits, needs: Mapping[str, str] = NO_NEEDS) -> bool:
    """Whether a model fits the request's context, takes what it uses beyond text and has the tier (the terms
    best effort keeps)."""
    return needed_tokens <= priced.context_window and priced.tier >= limits.min_tier and \
        not lacking(priced.supports, needs)


#: the terms no answer may break, however fast or cheap: the context it needs, what it uses beyond text (images,
#: tools: `supports`) and the tier asked for
HARD_TERMS = frozenset({"context", "unsupported", "tier"})


def meets_hard_terms(candidate: Candidate) -> bool:
    """Whether the candidate was dropped, if at all, only for speed, price or an open circuit."""
    return not any(reason_kind(r) in HARD_TERMS for r in candidate.reasons)


def reason_kind(reason: str) -> str:
    """The SLA term a reason is about: its first word."""
    return reason.split(" ", 1)[0].rstrip(":")
