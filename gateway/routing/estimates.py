"""Live latency and energy estimates per model, started from the policy's priors.

Each model keeps time-windowed samples of TTFT and TPOT (seconds per output
token). The YAML prior counts as `prior_weight` pseudo-samples that never
expire, so an untried model is predicted at its prior rather than at zero,
and real samples dominate once there are many. Samples live in a sorted list
kept up to date on insert and expiry (bisect), so a percentile is one index.
Percentiles are nearest-rank over prior and samples together. While those are
too few for a percentile to be anything but their largest (fewer than 20 for
p95: `evidence_needed`), the prior counts for the missing ones, so one slow
answer after a start, a reload or a quiet spell cannot set a p95 by itself;
two of twenty can. A `prior_weight` of 0 asks for the samples alone, and
gets them.

Energy is learned from the joules measured on a model's GPUs and attributed
to its answers (see gateway.energy): joules per output token, the sum of the
window's joules over the sum of its output tokens. It has no prior: a model
whose answers have not been measured has no energy estimate. Once every
measured answer has left the window, the window's last figure stands until
new answers are measured: a model dropped for its energy gets no traffic to
measure, and must not then pass for one never measured.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from gateway.policy.model import Model, Policy

#: samples kept per model and quantity
MAX_SAMPLES = 1024
#: output lengths remembered per route
MAX_OUTPUT_SAMPLES = 256


class SampleWindow:
    """Time-windowed samples of one quantity, plus a prior that never expires."""

    __slots__ = ("_times_s", "_values", "_sorted", "_prior", "_prior_weight", "_below_prior", "_max_samples")

    def __init__(self, prior: float | None, prior_weight: int, max_samples: int) -> None:
        self._times_s: deque[float] = deque()
        self._values: deque[float] = deque()
        self._prior = prior
        self._prior_weight = prior_weight if prior is not None else 0
        self._sorted: list[float] = [prior] * self._prior_weight
        self._below_prior = 0               # samples below the prior: where its pseudo-samples sit in `_sorted`
        self._max_samples = max_samples

    def __len__(self) -> int:
        """Real samples held (the prior not counted)."""
        return len(self._values)

    def add(self, now_s: float, value: float) -> None:
        """Record one sample taken at `now_s`, the newest (one dated before the newest counts from it: use
        `add_many` for samples taken elsewhere, earlier)."""
        if len(self._values) >= self._max_samples:
            self._drop_oldest()
        times_s = self._times_s
        times_s.append(now_s if not times_s or now_s >= times_s[-1] else times_s[-1])
        self._values.append(value)
        bisect.insort(self._sorted, value)
        if self._prior_weight and value < self._prior:
            self._below_prior += 1

    def add_many(self, samples: list[tuple[float, float]]) -> None:
        """Record samples (taken at, value) taken elsewhere, oldest first, each in time order among those held, so
        the window expires it when it is due: one merge, not a walk per sample; the oldest go past max_samples."""
        times_s = self._times_s
        if not times_s or samples[0][0] >= times_s[-1]:
            for now_s, value in samples:
                self.add(now_s, value)
            return
        merged = list(heapq.merge(zip(times_s, self._values), samples, key=lambda sample: sample[0]))
        merged = merged[-self._max_samples:]
        self._times_s = deque(now_s for now_s, _ in merged)
        self._values = deque(value for _, value in merged)
        prior = self._prior
        self._sorted = sorted([*([prior] * self._prior_weight), *self._values])
        self._below_prior = sum(1 for value in self._values if value < prior) if self._prior_weight else 0

    def expire(self, cutoff_s: float) -> None:
        """Drop samples taken before `cutoff_s`."""
        times_s = self._times_s
        while times_s and times_s[0] < cutoff_s:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Remove the oldest real sample."""
        self._times_s.popleft()
        value = self._values.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, value)]
        if self._prior_weight and value < self._prior:
            self._below_prior -= 1

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of prior and samples; None when there is neither.

        While prior and samples are too few for the quantile to be anything but their largest (fewer than
        `evidence_needed(q)`), the prior counts for the missing ones (not with `prior_weight` 0: samples alone).
        """
        ordered = self._sorted
        count = len(ordered)
        if not count:
            return self._prior
        rank = math.ceil(q * count) - 1
        if rank < count - 1 or not self._prior_weight:
            return ordered[max(0, rank)]
        missing = evidence_needed(q) - count        # the prior's extra pseudo-samples, after the first `below`
        if missing <= 0:
            return ordered[rank]
        rank = math.ceil(q * (count + missing)) - 1
        below = self._below_prior
        if rank < below:
            return ordered[rank]
        return self._prior if rank < below + missing else ordered[rank - missing]

    def quantile_with(self, q: float, prior: float, weight: int) -> float:
        """Nearest-rank quantile as if `prior` were `weight` more samples (a prior known only when asked)."""
        ordered = self._sorted
        if not ordered:
            return prior
        weight = max(0, weight)
        rank = max(0, math.ceil(q * (len(ordered) + weight)) - 1)
        below = bisect.bisect_left(ordered, prior)
        if rank < below:
            return ordered[rank]
        return prior if rank < below + weight else ordered[rank - weight]


@functools.cache
def evidence_needed(q: float) -> int:
    """The fewest values whose nearest-rank q-quantile is not their largest (20 for p95, 2 for the median):
    among fewer, the largest value alone sets it."""
    if q >= 1.0:
        return 1                            # the largest at any count: more values would not change that
    count = max(1, math.ceil(1.0 / (1.0 - q)) - 2)   # start a little below: the float division rounds either way
    while math.ceil(q * count) >= count:
        count += 1
    return count


class _ModelStats:
    """TTFT and TPOT windows of one model."""

    __slots__ = ("ttft", "tpot", "model")

    def __init__(self, model: Model, prior_weight: int, max_samples: int) -> None:
        prior = model.latency_prior
        self.model = model
        self.ttft = SampleWindow(prior.ttft_ms / 1000.0, prior_weight, max_samples)
        self.tpot = SampleWindow(prior.tpot_ms / 1000.0, prior_weight, max_samples)


def _measures_another(known: Model, model: Model) -> bool:
    """Whether samples taken of `known` say nothing of `model`: its prior, endpoint or upstream model changed."""
    return known.latency_prior != model.latency_prior or known.server != model.server


class EnergyWindow:
    """Time-windowed (joules, output tokens) of one model's measured answers, with running sums."""

    __slots__ = ("_samples", "_joules", "_tokens", "_max_samples", "_last")

    def __init__(self, max_samples: int) -> None:
        self._samples: deque[tuple[float, float, int]] = deque()
        self._joules = 0.0
        self._tokens = 0
        self._max_samples = max_samples
        self._last: float | None = None     # the figure when the window last emptied

    def add(self, now_s: float, joules: float, output_tokens: int) -> None:
        """Record one answer's attributed joules and the output tokens it made."""
        if len(self._samples) >= self._max_samples:
            self._drop_oldest()
        self._samples.append((now_s, joules, output_tokens))
        self._joules += joules
        self._tokens += output_tokens

    def expire(self, cutoff_s: float) -> None:
        """Drop answers measured before `cutoff_s`."""
        samples = self._samples
        while samples and samples[0][0] < cutoff_s:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, joules, tokens = self._samples.popleft()
        if self._samples:
            self._joules -= joules
            self._tokens -= tokens
        else:                               # no drift: an empty window sums to exactly zero
            self._last = self.per_token_j()
            self._joules, self._tokens = 0.0, 0

    def per_token_j(self) -> float | None:
        """Joules per output token over the window; with none left in it, the last figure it had (None before any
        measured token)."""
        return max(0.0, self._joules) / self._tokens if self._tokens > 0 else self._last


class LatencyEstimates:
    """Per-model TTFT/TPOT percentiles and energy per token, in-flight counts and per-route output lengths."""

    def __init__(self, models: Iterable[Model] | Mapping[str, Model], window_s: float = 300.0,
                 prior_weight: int = 5, clock: Callable[[], float] = time.monotonic,
                 max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self.prior_weight = prior_weight
        self._clock = clock
        self._max_samples = max_samples
        self._models: dict[str, _ModelStats] = {}
        self._in_flight: dict[str, int] = {}
        self._outputs: dict[str, SampleWindow] = {}
        self._energy: dict[str, EnergyWindow] = {}
        self.track(models)

    @classmethod
    def from_policy(cls, policy: Policy, clock: Callable[[], float] = time.monotonic) -> LatencyEstimates:
        """Estimates for every model of a policy, with its routing settings."""
        routing = policy.routing
        return cls(policy.models, routing.latency_window_s, routing.prior_weight, clock)

    def restart(self) -> None:
        """Forget every model's samples; each starts again from its prior (after `prior_weight` changed)."""
        self._models = {name: _ModelStats(stats.model, self.prior_weight, self._max_samples)
                        for name, stats in self._models.items()}

    def track(self, models: Iterable[Model] | Mapping[str, Model]) -> None:
        """Start tracking models not yet known; a changed prior, endpoint or upstream model restarts that model
        (the samples measured another server, or another model)."""
        for model in models.values() if isinstance(models, Mapping) else models:
            known = self._models.get(model.name)
            if known is None or _measures_another(known.model, model):
                self._models[model.name] = _ModelStats(model, self.prior_weight, self._max_samples)

    def include(self, models: Iterable[Model] | Mapping[str, Model]) -> None:
        """Start tracking models not yet known and leave the known ones be: a router for an older policy
        version (a request still in flight on it) must not put that version's priors back."""
        for model in models.values() if isinstance(models, Mapping) else models:
            if model.name not in self._models:
                self._models[model.name] = _ModelStats(model, self.prior_weight, self._max_samples)

    def measures(self, model: Model) -> bool:
        """Whether the estimates kept under the model's name are of the server `model` calls."""
        stats = self._models.get(model.name)
        return stats is not None and stats.model.server == model.server

    def record(self, model_name: str, ttft_s: float | None, tpot_s: float | None = None) -> None:
        """Record one finished call's TTFT and TPOT; unknown models are ignored."""
        stats = self._models.get(model_name)
        if stats is None:
            return
        now_s = self._clock()
        if ttft_s is not None:
            stats.ttft.add(now_s, ttft_s)
        if tpot_s is not None:
            stats.tpot.add(now_s, tpot_s)

    def record_shared(self, model_name: str, samples: list[tuple[float, float | None, float | None]]) -> None:
        """Record another process's samples (age in s, TTFT, TPOT), oldest first, each as old as it is."""
        stats = self._models.get(model_name)
        if stats is None or not samples:
            return
        now_s = self._clock()
        for window, values in ((stats.ttft, [(now_s - age_s, ttft) for age_s, ttft, _ in samples if ttft is not None]),
                               (stats.tpot, [(now_s - age_s, tpot) for age_s, _, tpot in samples if tpot is not None])):
            if values:
                values.sort(key=lambda sample: sample[0])   # batches sent again may come after newer ones
                window.add_many(values)

    def record_energy(self, model_name: str, joules: float, output_tokens: int) -> None:
        """Record the joules measured for one answer of `output_tokens` tokens (none: nothing is learned)."""
        if output_tokens <= 0 or not math.isfinite(joules) or joules < 0:
            return
        window = self._energy.get(model_name)
        if window is None:
            window = self._energy[model_name] = EnergyWindow(self._max_samples)
        window.add(self._clock(), joules, output_tokens)

    def forget_energy(self, model_name: str) -> None:
        """Forget the joules measured of a model (it now runs on other GPUs, or is another model): it has no
        energy estimate until its answers there are measured."""
        self._energy.pop(model_name, None)

    def joules_per_output_token(self, model_name: str) -> float | None:
        """Measured joules per output token over the window (the last figure once the window has emptied); None
        before any measured answer."""
        window = self._energy.get(model_name)
        if window is None:
            return None
        window.expire(self._clock() - self.window_s)
        return window.per_token_j()

    def _fresh(self, model_name: str) -> _ModelStats:
        """A model's stats with samples older than the window dropped."""
        stats = self._models[model_name]
        cutoff_s = self._clock() - self.window_s
        stats.ttft.expire(cutoff_s)
        stats.tpot.expire(cutoff_s)
        return stats

    def latency_p95_s(self, model_name: str) -> tuple[float, float]:
        """(TTFT p95, TPOT p95) in seconds, with one expiry pass: the planner's call."""
        stats = self._fresh(model_name)
        return stats.ttft.quantile(0.95), stats.tpot.quantile(0.95)

    def ttft_p95_s(self, model_name: str) -> float:
        """95th percentile time to first token, seconds."""
        return self._fresh(model_name).ttft.quantile(0.95)

    def latency_p50_s(self, model_name: str) -> tuple[float, float]:
        """(TTFT median, TPOT median) in seconds, with one expiry pass: what a whole answer's split reads."""
        stats = self._fresh(model_name)
        return stats.ttft.quantile(0.5), stats.tpot.quantile(0.5)

    def ttft_p50_s(self, model_name: str) -> float:
        """Median time to first token, seconds."""
        return self._fresh(model_name).ttft.quantile(0.5)

    def tpot_p95_s(self, model_name: str) -> float:
        """95th percentile time per output token, seconds."""
        return self._fresh(model_name).tpot.quantile(0.95)

    def tpot_p50_s(self, model_name: str) -> float:
        """Median time per output token, seconds."""
        return self._fresh(model_name).tpot.quantile(0.5)

    def sample_count(self, model_name: str) -> int:
        """Real TTFT samples inside the window."""
        return len(self._fresh(model_name).ttft)

    def tpot_sample_count(self, model_name: str) -> int:
        """Real time-per-token samples inside the window (a whole answer often teaches only this one)."""
        return len(self._fresh(model_name).tpot)

    def started(self, model_name: str) -> None:
        """A call to the model began."""
        self._in_flight[model_name] = self._in_flight.get(model_name, 0) + 1

    def finished(self, model_name: str) -> None:
        """A call to the model ended, however it ended."""
        count = self._in_flight.get(model_name, 0)
        self._in_flight[model_name] = count - 1 if count > 0 else 0

    def set_in_flight(self, model_name: str, count: int) -> None:
        """Set the calls in progress to the model (a reload moved it: those to its old server no longer count)."""
        self._in_flight[model_name] = max(0, count)

    def in_flight(self, model_name: str) -> int:
        """Calls to the model now in progress."""
        return self._in_flight.get(model_name, 0)

    def record_output_tokens(self, route_name: str, output_tokens: int) -> None:
        """Remember how many tokens a route's answer had."""
        window = self._outputs.get(route_name)
        if window is None:
            window = self._outputs[route_name] = SampleWindow(None, 0, MAX_OUTPUT_SAMPLES)
        window.add(self._clock(), float(output_tokens))

    def expected_output_tokens(self, route_name: str, default: int) -> int:
        """Median recent output length of a route; `default` counts as the missing samples until there are
        `prior_weight` of them, so one long answer does not by itself push small-context models out."""
        window = self._outputs.get(route_name)
        if window is None:
            return default
        window.expire(self._clock() - self.window_s)
        return int(window.quantile_with(0.5, float(default), max(0, self.prior_weight - len(window))))
