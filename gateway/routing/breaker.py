"""Per-model circuit breakers: closed, open, half-open.

Closed: calls flow; `failure_threshold` consecutive failures open it. An
upstream's Retry-After also opens it, until then. Open: no calls for
`open_s` (or the Retry-After, whichever is later). Half-open: one probe at a
time is admitted; its success closes the circuit, its failure reopens it.
A probe that never reports back frees its slot after `open_s`; one whose
client left before the model answered is given back at once (`release_probe`).

The planner asks `available` (a peek that takes nothing); the call stage asks
`allow` right before an attempt, which takes the half-open probe slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from gateway.policy.model import Breaker

State = Literal["closed", "open", "half_open"]
CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"


class _Circuit:
    """One model's breaker state."""

    __slots__ = ("failures", "open_until_s", "probe_since_s")

    def __init__(self) -> None:
        self.failures = 0
        self.open_until_s: float | None = None      # None: closed
        self.probe_since_s: float | None = None     # when the half-open probe was admitted

    def state(self, now_s: float) -> State:
        """The state at `now_s`."""
        if self.open_until_s is None:
            return CLOSED
        return OPEN if now_s < self.open_until_s else HALF_OPEN

    def open_until(self, until_s: float) -> None:
        """Open the circuit until at least `until_s`."""
        if self.open_until_s is None or until_s > self.open_until_s:
            self.open_until_s = until_s
        self.probe_since_s = None


class Breakers:
    """The circuit breakers of every model, created on first use."""

    def __init__(self, config: Breaker, clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = max(1, config.failure_threshold)
        self.open_s = config.open_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def configure(self, config: Breaker) -> None:
        """Apply new settings (a policy reload); circuits keep their state."""
        self.failure_threshold = max(1, config.failure_threshold)
        self.open_s = config.open_s

    def forget(self, model_name: str) -> None:
        """Start the model's circuit afresh, closed: what it counted was of a server it no longer calls."""
        self._circuits.pop(model_name, None)

    def state(self, model_name: str) -> State:
        """closed, open or half_open."""
        circuit = self._circuits.get(model_name)
        return CLOSED if circuit is None else circuit.state(self._clock())

    def available(self, model_name: str) -> bool:
        """Whether `allow` would admit a call now, without taking the probe slot."""
        circuit = self._circuits.get(model_name)
        if circuit is None or circuit.open_until_s is None:
            return True
        now_s = self._clock()
        return circuit.state(now_s) == HALF_OPEN and self._probe_free(circuit, now_s)

    def allow(self, model_name: str) -> bool:
        """Whether a call may go to the model now; in half-open this takes the probe slot."""
        circuit = self._circuits.get(model_name)
        if circuit is None or circuit.open_until_s is None:
            return True
        now_s = self._clock()
        if circuit.state(now_s) == OPEN or not self._probe_free(circuit, now_s):
            return False
        circuit.probe_since_s = now_s
        return True

    def probe_since(self, model_name: str) -> float | None:
        """When the half-open probe in flight was admitted (None: none is): `allow` just took it when this is
        now, and it names the probe to `release_probe`."""
        circuit = self._circuits.get(model_name)
        return None if circuit is None else circuit.probe_since_s

    def release_probe(self, model_name: str, since_s: float) -> None:
        """Give back the probe admitted at `since_s` without a verdict (its client left before the model
        answered): the next call probes at once instead of the circuit waiting `open_s` for a report."""
        circuit = self._circuits.get(model_name)
        if circuit is not None and circuit.probe_since_s == since_s:
            circuit.probe_since_s = None

    def _probe_free(self, circuit: _Circuit, now_s: float) -> bool:
        """Whether no probe is in flight (or the last one is long overdue)."""
        since_s = circuit.probe_since_s
        return since_s is None or now_s - since_s >= self.open_s

    def retry_in_s(self, model_name: str) -> float:
        """Seconds until an open circuit turns half-open; 0 when it is not open."""
        circuit = self._circuits.get(model_name)
        if circuit is None or circuit.open_until_s is None:
            return 0.0
        return max(0.0, circuit.open_until_s - self._clock())

    def record_success(self, model_name: str) -> None:
        """A call succeeded: reset the failure count; a half-open circuit closes."""
        circuit = self._circuits.get(model_name)
        if circuit is None or circuit.state(self._clock()) == OPEN:
            return
        circuit.failures = 0
        circuit.open_until_s = None
        circuit.probe_since_s = None

    def record_failure(self, model_name: str, retry_after_s: float | None = None) -> None:
        """A call failed; open the circuit at the threshold, on a failed probe, or for Retry-After."""
        circuit = self._circuits.get(model_name)
        if circuit is None:
            circuit = self._circuits[model_name] = _Circuit()
        now_s = self._clock()
        state = circuit.state(now_s)
        circuit.failures += 1
        if state == HALF_OPEN or (state == CLOSED and circuit.failures >= self.failure_threshold):
            circuit.open_until(now_s + self.open_s)
        if retry_after_s is not None and retry_after_s > 0:
            circuit.open_until(now_s + retry_after_s)
