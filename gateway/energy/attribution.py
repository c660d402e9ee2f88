"""Attribution of measured GPU joules to requests: pure arithmetic, no I/O.

For each model and each sampling interval of `dt_s` seconds:

    measured = energy-counter delta of the model's GPUs (or power x dt when only power is known)
    idle     = min(measured, idle_w x dt_s x n_gpus)
    active   = measured - idle

`active` is split among the requests in flight on the model in proportion to
the tokens each processed during the interval. A request whose progress is not
seen (a non-streamed answer arrives whole) is counted as progressing at the
rate of the streamed ones in flight beside it, per second in flight: on a
batching model server every request in the batch makes a token per step.
When no request made visible progress, the split is in proportion to each
one's time in flight during the interval. With no request in flight, all of
`measured` is idle. So attributed + idle == measured.

Several processes measuring the same GPUs (the workers of `gateway run
--workers N`, replicas reading one DCGM exporter) each see the GPUs' whole
energy but only their own requests. Each books its share of every interval
(`Others`: the requests the other processes had in flight, as they last said
through Redis): its requests' mean number in flight over all of theirs, or,
with none in flight anywhere, an equal part of the idle interval; so the
processes' books add up to what the GPUs used, not N times it.

`idle_w` (per GPU) is configured (`gpus.idle_w`) or learned: the lowest
sustained power, i.e. the minimum of the 1 s average powers of the last
`idle_window_s` seconds (10 minutes by default), never above the current
interval's average. A model saturated for longer than the window learns its
busy power as idle; configure `idle_w` for such servers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field


@dataclass
class ModelEnergy:
    """Running totals for one model."""

    measured_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    active_s: float = 0.0       # time with at least one request in flight
    idle_s: float = 0.0         # time with none
    idle_w_per_gpu: float | None = None     # the idle power used in the last interval

    @property
    def idle_to_active_ratio(self) -> float | None:
        """Seconds idle per second active; None before any active time."""
        return self.idle_s / self.active_s if self.active_s else None


@dataclass(frozen=True)
class Others:
    """The other processes measuring the same GPUs: how many, and their requests' mean number in flight (over
    their last interval, added up)."""

    processes: int
    in_flight: float

    def share(self, in_flight: float) -> float:
        """This process's share of an interval in which its own requests were `in_flight` on average."""
        total = in_flight + self.in_flight
        return in_flight / total if total > 0 else 1.0 / (1 + self.processes)


@dataclass(frozen=True)
class IntervalSplit:
    """How one interval's energy was booked (this process's share of it)."""

    measured_j: float
    idle_j: float
    shares_j: dict[str, float] = field(default_factory=dict)    # request id -> joules


@dataclass
class _Flight:
    model: Hashable             # the model's key in the books (the monitor's: its pool's models)
    started_s: float
    ended_s: float | None = None
    tracks_tokens: bool = True  # progress is reported as it happens (a stream); else only time is known
    tokens: int = 0             # cumulative tokens processed, as last reported
    tokens_booked: int = 0      # `tokens` when the last interval closed
    energy_j: float = 0.0
    idle_guessed: bool = False  # it ran in an interval booked before its GPUs' idle power was known (all idle)
    abandoned: bool = False     # nobody waits for its joules any more: dropped once the interval of its end is booked


class IdleLearner:
    """The lowest sustained power: minimum of 1 s average powers over a sliding window."""

    def __init__(self, bucket_s: float = 1.0, window_s: float = 600.0) -> None:
        self.bucket_s = bucket_s
        self._averages_w: deque[float] = deque(maxlen=max(1, int(window_s / bucket_s)))
        self._bucket_j = 0.0
        self._bucket_s = 0.0

    def add(self, power_w: float, dt_s: float) -> None:
        """Count `dt_s` seconds at `power_w`; closes a bucket once it spans `bucket_s`."""
        self._bucket_j += power_w * dt_s
        self._bucket_s += dt_s
        if self._bucket_s >= self.bucket_s:
            self._averages_w.append(self._bucket_j / self._bucket_s)
            self._bucket_j = self._bucket_s = 0.0

    @property
    def known(self) -> bool:
        """Whether a whole `bucket_s` of power has been seen, so the idle power is more than a guess."""
        return bool(self._averages_w)

    def estimate_w(self, current_w: float) -> float:
        """The idle power: the lowest 1 s average seen, capped by the current power."""
        return min(min(self._averages_w, default=current_w), current_w)


class EnergyLedger:
    """Per-model energy books: measured, attributed to requests, idle. A model is any key (a name; the
    monitor's are its pools' tuples of model names)."""

    def __init__(self, idle_w_per_gpu: Mapping[Hashable, float | None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, idle_window_s: float = 600.0) -> None:
        self._idle_w = {model: w for model, w in (idle_w_per_gpu or {}).items() if w is not None}
        self._clock = clock
        self._idle_window_s = idle_window_s
        self._learners: dict[Hashable, IdleLearner] = {}
        self._flights: dict[str, _Flight] = {}
        self._totals: dict[Hashable, ModelEnergy] = {}

    def request_started(self, request_id: str, model: Hashable, *, tracks_tokens: bool = True) -> None:
        """A request is now in flight on `model`; `tracks_tokens` False: no `progress` will come for it."""
        self._flights[request_id] = _Flight(model=model, started_s=self._clock(), tracks_tokens=tracks_tokens)

    def progress(self, request_id: str, tokens: int) -> None:
        """The cumulative tokens (prompt once prefilled, plus output so far) the request has processed."""
        flight = self._flights.get(request_id)
        if flight is not None:
            flight.tokens = max(flight.tokens, tokens)

    def mark_ended(self, request_id: str) -> float | None:
        """The request stopped using the GPU now (or earlier, if marked before); it keeps its share of the
        interval still open. Returns when it ended; None for an unknown request."""
        flight = self._flights.get(request_id)
        if flight is None:
            return None
        if flight.ended_s is None:
            flight.ended_s = self._clock()
        return flight.ended_s

    def idle_guessed(self, request_id: str) -> bool:
        """Whether the request ran while its GPUs' idle power was not known yet (its share was booked idle)."""
        flight = self._flights.get(request_id)
        return flight is not None and flight.idle_guessed

    def started_s(self, request_id: str) -> float | None:
        """When the request began (None for an unknown one)."""
        flight = self._flights.get(request_id)
        return flight.started_s if flight is not None else None

    def request_finished(self, request_id: str) -> float:
        """Forget the request and return the joules attributed to it (0.0 when unknown)."""
        flight = self._flights.pop(request_id, None)
        return flight.energy_j if flight is not None else 0.0

    def abandon(self, request_id: str) -> float:
        """Nobody waits for the request's joules any more, but the interval of its end is not booked yet: it keeps
        its share of that interval (given to no other request) and is dropped once it is booked. Returns the
        joules booked to it so far."""
        flight = self._flights.get(request_id)
        if flight is None:
            return 0.0
        flight.abandoned = True
        return flight.energy_j

    def forget_abandoned(self, model: Hashable) -> None:
        """Drop the abandoned requests of a model whose GPUs are no longer sampled (their books will not close)."""
        for rid in [rid for rid, f in self._flights.items() if f.model == model and f.abandoned]:
            del self._flights[rid]

    def forget_idle(self, model: Hashable) -> None:
        """Forget the idle power learned of a model's GPUs: it runs on others now, whose idle power is learned
        afresh."""
        self._learners.pop(model, None)

    def set_idle_w(self, idle_w_per_gpu: Mapping[Hashable, float | None]) -> None:
        """Configured idle powers after a policy reload; models without one learn theirs."""
        self._idle_w = {model: w for model, w in idle_w_per_gpu.items() if w is not None}

    def model_of(self, request_id: str) -> Hashable | None:
        """The model a request in flight runs on."""
        flight = self._flights.get(request_id)
        return flight.model if flight is not None else None

    def in_flight(self, model: Hashable, dt_s: float) -> float:
        """How many of this process's requests were in flight on `model` over the last `dt_s` seconds, on
        average (what `on_interval` would find now)."""
        now_s = self._clock()
        return sum(_overlap_s(f, now_s - dt_s, now_s) for f in self._flights.values() if f.model == model) / dt_s

    def totals(self, model: Hashable) -> ModelEnergy:
        """The running totals for `model` (zeros when nothing was measured)."""
        return self._totals.setdefault(model, ModelEnergy())

    def on_interval(self, model: Hashable, measured_j: float | None, dt_s: float,
                    power_w: float | None = None, n_gpus: int = 1, others: Others | None = None) -> IntervalSplit:
        """Book one interval of `model`'s GPUs; `measured_j` None means power x dt. With `others`, only this
        process's share of it (see the module's doc)."""
        if measured_j is None:
            if power_w is None:
                raise ValueError("on_interval needs measured_j or power_w")
            measured_j = power_w * dt_s
        if dt_s <= 0 or measured_j < 0 or n_gpus < 1:
            raise ValueError(f"bad interval: {measured_j=} {dt_s=} {n_gpus=}")
        idle_budget_j = self._idle_w_per_gpu(model, measured_j / dt_s / n_gpus, dt_s) * dt_s * n_gpus
        now_s = self._clock()
        flights = [(rid, f) for rid, f in self._flights.items() if f.model == model]
        in_flight_s = {rid: _overlap_s(f, now_s - dt_s, now_s) for rid, f in flights}
        if model not in self._idle_w and not self._learners[model].known:
            for rid, flight in flights:
                flight.idle_guessed = flight.idle_guessed or in_flight_s[rid] > 0
        if others is not None:
            share = others.share(sum(in_flight_s.values()) / dt_s)
            measured_j, idle_budget_j = measured_j * share, idle_budget_j * share
        shares_j = self._split(flights, in_flight_s, measured_j - min(measured_j, idle_budget_j))
        idle_j = measured_j - sum(shares_j.values())
        # active: some request ran during the interval (one that ended before it began is only awaiting its books),
        # here or in another process measuring the same GPUs
        busy = any(s > 0 for s in in_flight_s.values()) or (others is not None and others.in_flight > 0)
        self._book(model, measured_j, idle_j, shares_j, dt_s, busy=busy)
        for rid, flight in flights:     # abandoned requests whose end is now booked: nothing more is theirs
            if flight.abandoned and flight.ended_s is not None and flight.ended_s <= now_s:
                del self._flights[rid]
        return IntervalSplit(measured_j=measured_j, idle_j=idle_j, shares_j=shares_j)

    def _idle_w_per_gpu(self, model: Hashable, power_w_per_gpu: float, dt_s: float) -> float:
        if model in self._idle_w:
            idle_w = self._idle_w[model]
        else:
            learner = self._learners.get(model)
            if learner is None:
                learner = self._learners[model] = IdleLearner(window_s=self._idle_window_s)
            learner.add(power_w_per_gpu, dt_s)
            idle_w = learner.estimate_w(power_w_per_gpu)
        self.totals(model).idle_w_per_gpu = idle_w
        return idle_w

    @staticmethod
    def _split(flights: list[tuple[str, _Flight]], in_flight_s: dict[str, float],
               active_j: float) -> dict[str, float]:
        """Active joules per request: by tokens processed in the interval, else by time in flight."""
        weights = {rid: float(f.tokens - f.tokens_booked) for rid, f in flights if f.tracks_tokens}
        seen_tokens = sum(weights.values())
        if seen_tokens > 0:
            tracked_s = sum(in_flight_s[rid] for rid in weights)
            rate = seen_tokens / tracked_s if tracked_s > 0 else 0.0
            weights.update((rid, rate * in_flight_s[rid]) for rid, f in flights if not f.tracks_tokens)
        else:
            weights = in_flight_s
        total = sum(weights.values())
        for _, flight in flights:
            flight.tokens_booked = flight.tokens
        if total <= 0:
            return {}
        return {rid: active_j * weight / total for rid, weight in weights.items() if weight > 0}

    def _book(self, model: Hashable, measured_j: float, idle_j: float, shares_j: dict[str, float],
              dt_s: float, *, busy: bool) -> None:
        for rid, joules in shares_j.items():
            self._flights[rid].energy_j += joules
        totals = self.totals(model)
        totals.measured_j += measured_j
        totals.attributed_j += measured_j - idle_j
        totals.idle_j += idle_j
        if busy:
            totals.active_s += dt_s
        else:
            totals.idle_s += dt_s


def _overlap_s(flight: _Flight, start_s: float, end_s: float) -> float:
    """Seconds of [start_s, end_s] during which the request was in flight."""
    flight_end_s = end_s if flight.ended_s is None else min(end_s, flight.ended_s)
    return max(0.0, flight_end_s - max(start_s, flight.started_s))
