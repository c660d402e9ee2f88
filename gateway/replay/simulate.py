"""Virtual-time replay: a discrete-event simulation driven by the gateway's real router.

Each request arrives at its trace time and is identified and routed by the
live code path (`route.Routing`: tenant allow lists, `decide_request`, the
real `Router`; prompt_tokens = input tokens, max_tokens = output tokens),
using `LatencyEstimates` and `Breakers` on a virtual clock. Lines the traffic's
own gateway refused before routing are not replayed; its cache hits are routed,
then answered at no cost when the matched route's cache is on (else called).
Each planned model is a simulated server (see `servers`); the call loop mirrors
the call stage: a model whose circuit is open is skipped unless it is the last
hope, and an attempt whose first byte comes too late times out and falls back
to the next model: a stream's first token after the model's `first_byte_s`, a
whole answer (its first byte is its end) after `total_s`, as live
(`upstream.client_timeout`). The router learns as the account stage teaches it:
a finished call's TTFT (queueing included) and TPOT, an embedding's whole time
as its TTFT, and the wait of every dispatched attempt that timed out before its
first token; in-flight counts are kept, so the router reacts to load as it does
live. Every attempt is priced as the account stage prices it (see `_charge`),
failed ones included.

With `routing.queue_timeout_ms` the server's queue is the gateway's: the live
gateway sends a model no more than `max_concurrency` calls and holds the rest.
Waiters are then served highest tenant priority first; a wait past the
deadline falls back as `queue_timeout`, with nothing charged or learned and no
breaker failure; the model's circuit is asked when the slot comes (one that
opened meanwhile sends the request on as `circuit_open`); and an attempt's
timeouts, TTFT sample and GPU time start when it takes its slot, as live.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from operator import attrgetter

from gateway.context import Attempt, Usage
from gateway.cost import request_cost_usd
from gateway.policy.model import DEFAULT_PRIORITY, Model, Policy, Route, Tenant
from gateway.replay.outcome import Outcome, ReplayResult
from gateway.replay.route import Refusal, Routing
from gateway.replay.servers import JITTER_SIGMA, Jitter, ModelServer, Service, Ticket, draw_jitter
from gateway.replay.traffic import ReplayRequest
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.planner import Router
from gateway.stages.account import gpu_seconds, split_whole_answer


@dataclass(slots=True)
class _Flight:
    """One request between arrival and its end: its plan and its current attempt."""

    outcome: Outcome
    request: ReplayRequest
    route: Route
    plan: tuple[Model, ...]
    jitter: Jitter
    position: int = 0
    tried: list[str] = field(default_factory=list)
    model: Model | None = None
    service: Service | None = None
    ticket: Ticket | None = None
    dispatched_s: float = 0.0
    started_s: float | None = None
    call_s: float = 0.0                 # when the model's clock starts: dispatch, or the slot with gateway slots
    priority: int = DEFAULT_PRIORITY
    failure: str = "timeout"            # why the last attempt failed
    last_hope: bool = False             # the attempt's model is the plan's last and nothing was tried before
    energy_j: float | None = 0.0        # the attempts' so far; None once a model tried has no power assumption


class _Clock:
    """The virtual clock the estimates and breakers read."""

    __slots__ = ("now_s",)

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


Handler = Callable[[_Flight, Ticket, float], None]


class Simulation:
    """One policy, one traffic list, one seed: run() gives the ReplayResult."""

    def __init__(self, policy: Policy, requests: Sequence[ReplayRequest], *, seed: int,
                 jitter_sigma: float = JITTER_SIGMA, power_w: Mapping[str, float] | None = None) -> None:
        self.policy = policy
        self.seed = seed
        ordered = sorted(requests, key=attrgetter("arrival_s"))
        self.requests = [r for r in ordered if r.recorded_answer != "refused"]
        self.refused_in_trace = len(ordered) - len(self.requests)
        self.jitter = draw_jitter(len(self.requests), seed, jitter_sigma)
        self.power_w = dict(power_w or {})
        self.clock = _Clock()
        self.estimates = LatencyEstimates.from_policy(policy, clock=self.clock)
        self.breakers = Breakers(policy.routing.breaker, self.clock)
        self.router = Router(policy, self.estimates, self.breakers, random.Random(f"replay-router:{seed}"))
        self.routing = Routing(policy, self.router)
        self.servers = {name: ModelServer(model) for name, model in policy.models.items()}
        self.queue_timeout_s = policy.routing.queue_timeout_ms / 1000.0     # 0: the model servers queue
        self.outcomes: list[Outcome] = []
        self._events: list[tuple[float, int, Handler, _Flight, Ticket]] = []
        #: tenant -> {(period, index): USD spent}, for budgets that downgrade; periods are counted from the
        #: traffic's first arrival (a day of 86,400 s, a month of the whole trace, at most 31 days)
        self._spent: dict[str, dict[tuple[str, int], Decimal]] = {}
        self._sequence = 0

    def run(self) -> ReplayResult:
        """Process arrivals and server events in time order until all have ended."""
        events, requests, clock = self._events, self.requests, self.clock
        next_arrival = 0
        while next_arrival < len(requests) or events:
            if events and (next_arrival == len(requests) or events[0][0] <= requests[next_arrival].arrival_s):
                time_s, _, handler, flight, ticket = heapq.heappop(events)
                clock.now_s = time_s
                handler(flight, ticket, time_s)
            else:
                request = requests[next_arrival]
                clock.now_s = request.arrival_s
                self._arrive(next_arrival, request)
                next_arrival += 1
        return ReplayResult(self.policy, self.seed, self.outcomes, self.refused_in_trace,
                            self.routing.by_recorded_route, self.routing.without_headers,
                            sum(1 for request in self.requests if request.output_estimated))

    def _push(self, time_s: float, handler: Handler, flight: _Flight, ticket: Ticket) -> None:
        """Schedule an event; ties run in scheduling order."""
        self._sequence += 1
        heapq.heappush(self._events, (time_s, self._sequence, handler, flight, ticket))

    def _arrive(self, index: int, request: ReplayRequest) -> None:
        """Identify, match and plan a new request, then answer a recorded cache hit or call its first model."""
        outcome = Outcome(index, request.arrival_s, request.input_tokens, request.output_tokens)
        self.outcomes.append(outcome)
        decision = self.routing.decide(request)
        if isinstance(decision, Refusal):
            outcome.route = decision.route
            _end(outcome, "rejected", decision.reason)
            return
        tenant = self.policy.tenants.get(request.tenant) if request.tenant is not None else None
        if tenant is not None and self._budget_spent(tenant, request.arrival_s):
            decision = self.router.cheapest(decision)       # as admit does live, on_exhausted: downgrade
        outcome.route, outcome.planned_sla_met = decision.route.name, decision.sla_met
        if request.recorded_answer == "cache_hit" and decision.route.cache.enabled:   # at once, at no cost
            outcome.status, outcome.sla_ok, outcome.latency_s = "cache_hit", True, 0.0
            outcome.ttft_s = 0.0 if request.streamed else None
            return
        flight = _Flight(outcome, request, decision.route, decision.plan, self.jitter[index])
        if tenant is not None:
            flight.priority = tenant.priority
        self._dispatch(flight, request.arrival_s)

    def _budget_spent(self, tenant: Tenant, now_s: float) -> bool:
        """Whether the tenant's budget says downgrade and its day (or month) is spent by now. Budgets that
        reject (429) are not simulated, as the README says."""
        budget = tenant.budget
        if not budget.limited or budget.on_exhausted != "downgrade":
            return False
        spent = self._spent.get(tenant.name, {})
        day, month = _budget_periods(now_s)
        return ((budget.usd_per_day is not None and spent.get(day, Decimal(0)) >= budget.usd_per_day)
                or (budget.usd_per_month is not None and spent.get(month, Decimal(0)) >= budget.usd_per_month))

    def _dispatch(self, flight: _Flight, now_s: float) -> None:
        """Send the request to the next model of its plan that may take it, as the call stage does."""
        plan = flight.plan
        while flight.position < len(plan):
            position, model = flight.position, plan[flight.position]
            flight.position += 1
            flight.last_hope = not flight.tried and position == len(plan) - 1
            # with gateway slots the circuit is peeked at now and asked once the slot is taken, as live
            may_call = self.breakers.available if self.queue_timeout_s else self.breakers.allow
            if not may_call(model.name) and not flight.last_hope:
                continue
            flight.tried.append(model.name)
            flight.model, flight.dispatched_s, flight.call_s, flight.started_s = model, now_s, now_s, None
            flight.service = Service.of(model, flight.outcome.output_tokens, flight.jitter)
            flight.ticket = ticket = Ticket(flight)
            self.estimates.started(model.name)
            rank = -flight.priority if self.queue_timeout_s else 0
            if self.servers[model.name].admit(ticket, rank):
                if not self._start(flight, now_s):
                    self._hand_on(model.name, now_s)
            else:
                deadline_s = self.queue_timeout_s or first_byte_limit_s(model, flight.request.streamed)
                self._push(now_s + deadline_s, self._on_queue_deadline, flight, ticket)
            return
        self._end_failed(flight, flight.failure if flight.tried else "circuit_open")

    def _start(self, flight: _Flight, now_s: float) -> bool:
        """The attempt holds a slot: schedule how it ends. With gateway slots its circuit is asked first; one
        that opened meanwhile sends the request on to its next model, and the slot is to be handed on (False)."""
        if self.queue_timeout_s and not self.breakers.allow(flight.model.name) and not flight.last_hope:
            self._not_sent(flight, now_s, "circuit_open")
            return False
        flight.started_s = now_s
        flight.outcome.queue_s += now_s - flight.dispatched_s
        if self.queue_timeout_s:            # the wait was the gateway's: the call starts now
            flight.call_s = now_s
        waited_s = now_s - flight.call_s
        service, streamed = flight.service, flight.request.streamed
        first_byte_s = service.ttft_s if streamed else service.total_s
        limit_s = first_byte_limit_s(flight.model, streamed)
        if waited_s + first_byte_s > limit_s:
            self._push(flight.call_s + limit_s, self._on_first_byte_timeout, flight, flight.ticket)
        elif waited_s + service.total_s > flight.model.timeouts.total_s:
            self._push(flight.call_s + flight.model.timeouts.total_s, self._on_total_timeout, flight, flight.ticket)
        else:
            self._push(now_s + service.total_s, self._on_finish, flight, flight.ticket)
        return True

    def _release(self, flight: _Flight, now_s: float) -> None:
        """The attempt gives its slot to the next waiter."""
        self.estimates.finished(flight.model.name)
        self._hand_on(flight.model.name, now_s)

    def _hand_on(self, model_name: str, now_s: float) -> None:
        """A slot of the model is free: the next waiter that starts keeps it (a loop, not a recursion: a long
        line may refuse it in turn)."""
        server = self.servers[model_name]
        while (waiter := server.release()) is not None:
            if self._start(waiter.key, now_s):
                return

    def _on_queue_deadline(self, flight: _Flight, ticket: Ticket, now_s: float) -> None:
        """A queued attempt saw no first byte in time (or, with gateway slots, got no slot in time): it leaves
        the queue and falls back."""
        if flight.ticket is not ticket or flight.started_s is not None:
            return
        ticket.cancelled = True
        if self.queue_timeout_s:
            self._not_sent(flight, now_s, "queue_timeout")
            return
        flight.outcome.queue_s += now_s - flight.dispatched_s
        self.estimates.finished(flight.model.name)
        self.breakers.record_failure(flight.model.name)
        self._cut_before_first_token(flight, now_s)

    def _not_sent(self, flight: _Flight, now_s: float, failure: str) -> None:
        """The gateway did not send the attempt after its wait for a slot, as live: the wait counts, nothing is
        charged or held against the model's circuit, and the request moves to its next model."""
        flight.outcome.queue_s += now_s - flight.dispatched_s
        self.estimates.finished(flight.model.name)
        flight.failure = failure
        self._dispatch(flight, now_s)

    # The model's circuit hears of each attempt before its slot is handed on, as live: the call stage records a
    # failure or success before the attempt ends, and a waiter given the slot asks the circuit then.

    def _on_first_byte_timeout(self, flight: _Flight, ticket: Ticket, now_s: float) -> None:
        """A running attempt's first byte came too late: it is cut and falls back."""
        self.breakers.record_failure(flight.model.name)
        self._release(flight, now_s)
        self._cut_before_first_token(flight, now_s)

    def _on_total_timeout(self, flight: _Flight, ticket: Ticket, now_s: float) -> None:
        """An attempt ran past total_s: a stream that sent tokens fails, with no fallback, and pays for them;
        an answer that sent nothing yet falls back, as after a late first byte."""
        self.breakers.record_failure(flight.model.name)
        self._release(flight, now_s)
        sent = flight.service.tokens_by(now_s - flight.started_s) if flight.request.streamed else 0
        if not sent:
            self._cut_before_first_token(flight, now_s)
            return
        self._charge(flight, now_s, _usage(flight.request, flight.outcome.input_tokens, sent))
        self._end_failed(flight, "timeout")

    def _cut_before_first_token(self, flight: _Flight, now_s: float) -> None:
        """A dispatched attempt timed out before its first token: the router learns its wait as a TTFT of at
        least that long, as the account stage teaches it live; it is charged, and the request falls back."""
        self.estimates.record(flight.model.name, now_s - flight.call_s, None)
        self._charge(flight, now_s, Usage())
        self._fall_back(flight, now_s)

    def _fall_back(self, flight: _Flight, now_s: float) -> None:
        """After a failure the model's circuit has heard of: try the next model."""
        flight.failure = "timeout"
        self._dispatch(flight, now_s)

    def _on_finish(self, flight: _Flight, ticket: Ticket, now_s: float) -> None:
        """The answer is complete: teach the router as the account stage does (an embedding's whole time is its
        TTFT: it has no output tokens; a whole answer's split is `split_whole_answer`'s), then settle."""
        self.breakers.record_success(flight.model.name)
        self._release(flight, now_s)
        model, service, outcome = flight.model, flight.service, flight.outcome
        output_tokens = outcome.output_tokens
        elapsed_s = now_s - flight.call_s
        if flight.request.endpoint == "embeddings":
            self.estimates.record(model.name, elapsed_s, None)
        elif flight.request.stream:
            ttft_s = flight.started_s - flight.call_s + service.ttft_s
            self.estimates.record(model.name, ttft_s, service.tpot_s if output_tokens > 1 else None)
        elif output_tokens <= 1:            # a whole answer of one token: all of it was the wait, as live
            self.estimates.record(model.name, elapsed_s, None)
        else:                               # a whole answer hides its split: learned as live learns it
            self.estimates.record(model.name, *split_whole_answer(self.estimates, model.name, elapsed_s,
                                                                  output_tokens))
            # no output length: live learns it from requests without max_tokens, and every replayed one has it
        energy_j = self._charge(flight, now_s, _usage(flight.request, outcome.input_tokens, output_tokens))
        if energy_j is not None:            # the router learns joules per token, as from a live measurement
            self.estimates.record_energy(model.name, energy_j, output_tokens)
        self._settle(flight, now_s)

    def _charge(self, flight: _Flight, now_s: float, usage: Usage) -> float | None:
        """Price the attempt ending now as the account stage does: the tokens it used, the GPU time from
        dispatch to end (queueing on the model server included), and its predicted energy (returned; None
        without a power assumption for its model)."""
        model = flight.model
        gpu_s = gpu_seconds(Attempt(model=model, started_s=flight.call_s, ended_s=now_s))
        power_w = self.power_w.get(model.name)
        energy_j = None
        if power_w is not None:
            held_s = now_s - flight.started_s if flight.started_s is not None else 0.0
            energy_j = held_s * power_w / max(1, model.max_concurrency)
        cost_usd = request_cost_usd(model, usage, gpu_seconds=gpu_s, energy_j=energy_j)
        flight.outcome.cost_usd += cost_usd
        if flight.request.tenant in self.policy.tenants:      # what the tenant's budget is charged
            spent = self._spent.setdefault(flight.request.tenant, {})
            for key in _budget_periods(now_s):
                spent[key] = spent.get(key, Decimal(0)) + cost_usd
        flight.energy_j = None if flight.energy_j is None or energy_j is None else flight.energy_j + energy_j
        return energy_j

    def _end_failed(self, flight: _Flight, reason: str) -> None:
        """The request ends unanswered, having paid for its attempts."""
        outcome = flight.outcome
        outcome.models_tried = tuple(flight.tried)
        outcome.energy_j = flight.energy_j if flight.tried else None
        _end(outcome, "failed", reason)

    def _settle(self, flight: _Flight, now_s: float) -> None:
        """Fill in the answered request's outcome; TTFT is a stream's alone and its limits apply to streams only,
        as in the planner and the live account stage."""
        service, outcome = flight.service, flight.outcome
        outcome.model = flight.model.name
        outcome.models_tried = tuple(flight.tried)
        if flight.request.streamed:     # a whole answer has no first token of its own, as live (ttft_s null)
            outcome.ttft_s = flight.started_s + service.ttft_s - outcome.arrival_s
        outcome.latency_s = now_s - outcome.arrival_s
        outcome.energy_j = flight.energy_j
        sla = flight.route.sla
        outcome.sla_ok = ((sla.p95_latency_ms is None or outcome.latency_s * 1000.0 <= sla.p95_latency_ms)
                          and (sla.p95_ttft_ms is None or not flight.request.streamed
                               or outcome.ttft_s * 1000.0 <= sla.p95_ttft_ms))


def first_byte_limit_s(model: Model, streamed: bool) -> float:
    """How long an attempt may wait for its first byte, as live (`upstream.client_timeout`): a stream's first
    token within `first_byte_s` (and `total_s`); a whole answer, whose first byte comes with its end, `total_s`."""
    timeouts = model.timeouts
    return min(timeouts.first_byte_s, timeouts.total_s) if streamed else timeouts.total_s


def _end(outcome: Outcome, status: str, reason: str) -> None:
    """A request that got no answer."""
    outcome.status, outcome.reason, outcome.sla_ok = status, reason, False


def replay(policy: Policy, requests: Sequence[ReplayRequest], *, seed: int = 0,
           jitter_sigma: float = JITTER_SIGMA, power_w: Mapping[str, float] | None = None) -> ReplayResult:
    """Replay `requests` against `policy` in virtual time; the same seed gives the same result."""
    return Simulation(policy, requests, seed=seed, jitter_sigma=jitter_sigma, power_w=power_w).run()


def _budget_periods(now_s: float) -> tuple[tuple[str, int], tuple[str, int]]:
    """The budget day and month a replayed moment falls in: days of 86,400 s from the traffic's first arrival, and
    the whole traffic (at most 31 days) as its month."""
    return ("day", int(now_s // 86_400)), ("month", 0)


def _usage(request: ReplayRequest, input_tokens: int, output_tokens: int) -> Usage:
    """What an attempt used, with the parts of it the trace says were priced apart (cached input, audio, input
    written to the prompt cache)."""
    return Usage(input_tokens, output_tokens, request.cached_input_tokens,
                 audio_input_tokens=request.audio_input_tokens, audio_output_tokens=request.audio_output_tokens,
                 cache_write_input_tokens=request.cache_write_input_tokens)
