"""Circuit breaker state machine: closed -> open -> half-open -> closed or open again."""

from __future__ import annotations

import pytest

from gateway.policy.model import Breaker
from gateway.routing.breaker import Breakers
from tests.support.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def breakers(clock: FakeClock) -> Breakers:
    return Breakers(Breaker(failure_threshold=3, open_s=10.0), clock)


def test_opens_after_threshold_consecutive_failures(breakers):
    """Three consecutive failures open the circuit; fewer do not."""
    for _ in range(2):
        breakers.record_failure("m")
    assert breakers.state("m") == "closed"
    assert breakers.allow("m")
    breakers.record_failure("m")
    assert breakers.state("m") == "open"
    assert not breakers.allow("m")
    assert not breakers.available("m")


def test_success_resets_the_consecutive_count(breakers):
    """A success between failures restarts the count, so the circuit stays closed."""
    breakers.record_failure("m")
    breakers.record_failure("m")
    breakers.record_success("m")
    breakers.record_failure("m")
    breakers.record_failure("m")
    assert breakers.state("m") == "closed"


def test_half_open_admits_one_probe_and_success_closes(breakers, clock):
    """After open_s one probe is admitted, others wait, and its success closes the circuit."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 10
    assert breakers.state("m") == "half_open"
    assert breakers.available("m")
    assert breakers.allow("m")
    assert not breakers.allow("m")
    assert not breakers.available("m")
    breakers.record_success("m")
    assert breakers.state("m") == "closed"
    assert breakers.allow("m")


def test_failed_probe_reopens(breakers, clock):
    """A failure in half-open reopens the circuit for another open_s."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 10
    assert breakers.allow("m")
    breakers.record_failure("m")
    assert breakers.state("m") == "open"
    clock.now_s += 9.9
    assert not breakers.allow("m")
    clock.now_s += 0.1
    assert breakers.state("m") == "half_open"


def test_lost_probe_frees_its_slot_after_open_s(breakers, clock):
    """A probe that never reports back does not block the model forever."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 10
    assert breakers.allow("m")
    clock.now_s += 5
    assert not breakers.allow("m")
    clock.now_s += 5
    assert breakers.allow("m")


def test_retry_after_opens_until_then(breakers, clock):
    """One failure with Retry-After opens the circuit for that long, even below the threshold."""
    breakers.record_failure("m", retry_after_s=25)
    assert breakers.state("m") == "open"
    assert breakers.retry_in_s("m") == pytest.approx(25)
    clock.now_s += 24
    assert not breakers.allow("m")
    clock.now_s += 1
    assert breakers.state("m") == "half_open"


def test_a_short_retry_after_does_not_cut_the_open_time_short(breakers, clock):
    """The failure that reaches the threshold carries Retry-After 1: the circuit stays open for open_s, the later
    of the two, not for the upstream's second."""
    for _ in range(2):
        breakers.record_failure("m")
    breakers.record_failure("m", retry_after_s=1)
    clock.now_s += 5
    assert breakers.state("m") == "open"
    assert breakers.retry_in_s("m") == pytest.approx(5)


def test_retry_in_is_zero_once_the_circuit_is_half_open(breakers, clock):
    """Past its open time a circuit is due now, not overdue: `retry_in_s` (shown by /admin/models) is 0, never
    negative, whether its probe is out or not."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 15
    assert breakers.retry_in_s("m") == 0.0
    assert breakers.allow("m")
    assert breakers.retry_in_s("m") == 0.0


def test_success_while_open_does_not_close(breakers, clock):
    """A late success from a call started before the circuit opened leaves it open."""
    for _ in range(3):
        breakers.record_failure("m")
    breakers.record_success("m")
    assert breakers.state("m") == "open"


def test_models_are_independent(breakers):
    """One model's failures do not open another model's circuit."""
    for _ in range(3):
        breakers.record_failure("a")
    assert breakers.state("a") == "open"
    assert breakers.state("b") == "closed"
    assert breakers.allow("b")


def test_a_released_probe_lets_the_next_call_probe_at_once(breakers, clock):
    """A probe given back without a verdict frees the half-open slot now; only the probe that holds it can."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 10.0
    assert breakers.probe_since("m") is None
    assert breakers.allow("m")
    since_s = breakers.probe_since("m")
    assert since_s == clock.now_s
    assert not breakers.allow("m")
    breakers.release_probe("m", since_s - 1.0)      # not the probe in flight: nothing changes
    assert not breakers.allow("m")
    breakers.release_probe("m", since_s)
    assert breakers.state("m") == "half_open"
    assert breakers.allow("m")


def test_a_reload_applies_a_new_failure_threshold(breakers):
    """`configure` with failure_threshold 1 (a reload) makes the next single failure open a closed circuit."""
    breakers.configure(Breaker(failure_threshold=1, open_s=10.0))
    breakers.record_failure("m")
    assert breakers.state("m") == "open"


def test_a_failed_probe_leaves_no_probe_in_flight(breakers, clock):
    """A failed probe reopens the circuit with its probe slot freed: once half-open again the next call probes at
    once, even after a reload lengthened open_s past the time since that probe."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 10
    assert breakers.allow("m")
    breakers.record_failure("m")
    assert breakers.probe_since("m") is None
    breakers.configure(Breaker(failure_threshold=3, open_s=60.0))
    clock.now_s += 10
    assert breakers.state("m") == "half_open"
    assert breakers.allow("m")


def test_a_retry_after_of_zero_leaves_the_circuit_closed(breakers):
    """A failure below the threshold whose Retry-After is 0 does not open the circuit nor limit it to one probe."""
    breakers.record_failure("m", retry_after_s=0)
    assert breakers.state("m") == "closed"
    assert breakers.allow("m") and breakers.allow("m")


def test_a_late_failure_while_open_does_not_extend_the_open_time(breakers, clock):
    """A call started before the circuit opened fails while it is open: the circuit turns half-open on time."""
    for _ in range(3):
        breakers.record_failure("m")
    clock.now_s += 5
    breakers.record_failure("m")
    assert breakers.retry_in_s("m") == pytest.approx(5)
    clock.now_s += 5
    assert breakers.state("m") == "half_open"
