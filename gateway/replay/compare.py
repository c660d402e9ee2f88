"""NEW versus BASELINE: the same traffic replayed against two policies, request by request."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from decimal import Decimal

from gateway.replay.outcome import ReplayResult
from gateway.replay.summary import Summary, summarize

#: rows of the sample table of requests whose model changed
SAMPLE_SIZE = 10


@dataclass(frozen=True)
class ModelChange:
    """One request answered differently under the two policies."""

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    baseline: str                       # model, or rejected:<reason> / failed:<reason>
    new: str
    baseline_latency_ms: float | None
    new_latency_ms: float | None
    cost_delta_usd: Decimal


@dataclass(frozen=True)
class Comparison:
    """The two summaries, their differences, and which requests moved."""

    new: Summary
    baseline: Summary
    changed: int                        # requests whose model (or rejection) differs
    transitions: dict[str, int]         # "small -> medium": requests
    sample: tuple[ModelChange, ...]

    @property
    def cost_delta_usd(self) -> Decimal:
        """NEW total cost minus BASELINE total cost."""
        return self.new.cost_usd - self.baseline.cost_usd


def compare(new_result: ReplayResult, baseline_result: ReplayResult, *,
            sample_size: int = SAMPLE_SIZE) -> Comparison:
    """Compare two replays of the same traffic; ValueError when the traffic differs."""
    new_outcomes, old_outcomes = new_result.outcomes, baseline_result.outcomes
    if len(new_outcomes) != len(old_outcomes):
        raise ValueError(f"the replays have different traffic: {len(new_outcomes)} vs {len(old_outcomes)} requests")
    transitions: Counter[str] = Counter()
    sample: list[ModelChange] = []
    for new, old in zip(new_outcomes, old_outcomes, strict=True):
        if (new.arrival_s, new.input_tokens, new.output_tokens) != (old.arrival_s, old.input_tokens,
                                                                     old.output_tokens):
            raise ValueError(f"the replays have different traffic at request {new.index}")
        if new.label == old.label:
            continue
        transitions[f"{old.label} -> {new.label}"] += 1
        if len(sample) < sample_size:
            sample.append(ModelChange(
                new.index, new.arrival_s, new.input_tokens, new.output_tokens, old.label, new.label,
                _ms(old.latency_s), _ms(new.latency_s), new.cost_usd - old.cost_usd))
    return Comparison(summarize(new_result), summarize(baseline_result), sum(transitions.values()),
                      dict(transitions.most_common()), tuple(sample))


def _ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, None kept."""
    return None if seconds is None else seconds * 1000.0
