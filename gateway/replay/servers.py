"""Simulated model servers: `max_concurrency` slots, a queue, and service times from the priors.

A request's service time on a model is TTFT + (output - 1) x TPOT, the model's
latency_prior scaled by the request's own lognormal jitter factors (median 1),
so two policies replaying the same traffic draw the same luck for each request.
A server does not slow down as it fills; beyond its slots, requests wait, first
come first; with a rank given (the gateway's call slots, `routing.queue_timeout_ms`),
lowest rank first, then first come.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from gateway.policy.model import Model

#: sigma of the lognormal jitter applied to a model's TTFT and TPOT priors
JITTER_SIGMA = 0.25


@dataclass(frozen=True, slots=True)
class Jitter:
    """One request's luck: factors on TTFT and TPOT."""

    ttft: float = 1.0
    tpot: float = 1.0


def draw_jitter(count: int, seed: int, sigma: float = JITTER_SIGMA) -> list[Jitter]:
    """`count` jitter pairs from a seeded RNG; the same seed gives the same list."""
    if sigma <= 0:
        return [Jitter()] * count
    rng = random.Random(f"replay-jitter:{seed}")
    draw = rng.lognormvariate
    return [Jitter(draw(0.0, sigma), draw(0.0, sigma)) for _ in range(count)]


@dataclass(frozen=True, slots=True)
class Service:
    """How long one request takes on one model once it holds a slot."""

    ttft_s: float
    tpot_s: float
    output_tokens: int

    @property
    def total_s(self) -> float:
        """TTFT plus the rest of the tokens."""
        return self.ttft_s + max(self.output_tokens - 1, 0) * self.tpot_s

    def tokens_by(self, elapsed_s: float) -> int:
        """Output tokens sent `elapsed_s` after taking the slot: the first at TTFT, then one per TPOT."""
        if elapsed_s < self.ttft_s or not self.output_tokens:
            return 0
        if self.tpot_s <= 0:
            return self.output_tokens
        return min(self.output_tokens, 1 + int((elapsed_s - self.ttft_s) / self.tpot_s))

    @classmethod
    def of(cls, model: Model, output_tokens: int, jitter: Jitter) -> Service:
        """The model's priors scaled by the request's jitter."""
        prior = model.latency_prior
        return cls(prior.ttft_ms / 1000.0 * jitter.ttft, prior.tpot_ms / 1000.0 * jitter.tpot, output_tokens)


@dataclass(slots=True)
class Ticket:
    """One attempt waiting for, or holding, a slot on a server."""

    key: object                         # whatever the simulation uses to find the attempt again
    cancelled: bool = False


@dataclass
class ModelServer:
    """One model's slots and queue."""

    model: Model
    slots: int = 0
    running: int = 0
    waiting: list[tuple[int, int, Ticket]] = field(default_factory=list)     # a heap: (rank, arrival, ticket)
    _arrivals: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.slots = max(1, self.model.max_concurrency)

    def admit(self, ticket: Ticket, rank: int = 0) -> bool:
        """Take a slot now (True), or join the queue (False) behind lower ranks and earlier arrivals."""
        if self.running < self.slots:
            self.running += 1
            return True
        heapq.heappush(self.waiting, (rank, next(self._arrivals), ticket))
        return False

    def release(self) -> Ticket | None:
        """Free a slot; the next live waiter takes it and is returned."""
        while self.waiting:
            ticket = heapq.heappop(self.waiting)[2]
            if not ticket.cancelled:
                return ticket               # the slot passes straight to it
        self.running -= 1
        return None
