"""Latency estimates: priors, time windows, percentiles, in-flight and output-length memory."""

from __future__ import annotations

import pytest

from gateway.routing.estimates import LatencyEstimates
from tests.support.fakes import FakeClock, prior_model as model


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_prior_is_the_estimate_before_any_sample(clock):
    """An untried model is predicted at its YAML prior, not at zero."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    assert estimates.ttft_p95_s("small") == pytest.approx(0.040)
    assert estimates.tpot_p95_s("small") == pytest.approx(0.004)
    assert estimates.ttft_p50_s("small") == pytest.approx(0.040)
    assert estimates.sample_count("small") == 0


def test_slow_samples_raise_p95_within_a_bounded_number_of_records(clock):
    """A handful of slow real samples lift p95 above a 1 s SLA despite a fast prior."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    records = 0
    while estimates.ttft_p95_s("small") <= 1.0:
        estimates.record("small", 3.0, 0.05)
        records += 1
        assert records <= 5
    assert estimates.tpot_p95_s("small") == pytest.approx(0.05)


def test_many_real_samples_dominate_the_prior(clock):
    """With many fast samples the median is the measured value, not the prior."""
    estimates = LatencyEstimates([model(ttft_ms=500)], window_s=60, prior_weight=5, clock=clock)
    for _ in range(100):
        estimates.record("small", 0.1, None)
    assert estimates.ttft_p50_s("small") == pytest.approx(0.1)
    assert estimates.ttft_p95_s("small") == pytest.approx(0.1)


def test_samples_expire_after_the_window_and_the_prior_returns(clock):
    """Samples older than window_s are dropped, so a model recovers to its prior."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    for _ in range(10):
        estimates.record("small", 3.0, 0.05)
    clock.now_s += 30
    for _ in range(2):                              # two: one alone of twenty does not set a p95
        estimates.record("small", 2.0, None)
    assert estimates.ttft_p95_s("small") == pytest.approx(3.0)
    clock.now_s += 31
    assert estimates.ttft_p95_s("small") == pytest.approx(2.0)
    assert estimates.tpot_p95_s("small") == pytest.approx(0.004)
    clock.now_s += 30
    assert estimates.ttft_p95_s("small") == pytest.approx(0.040)
    assert estimates.sample_count("small") == 0


def test_memory_is_bounded_and_keeps_the_newest(clock):
    """Past max_samples the oldest samples are evicted and only the newest count."""
    estimates = LatencyEstimates([model()], window_s=600, prior_weight=0, clock=clock, max_samples=16)
    for _ in range(16):
        estimates.record("small", 9.0, None)
    for _ in range(16):
        estimates.record("small", 1.0, None)
    assert estimates.sample_count("small") == 16
    assert estimates.ttft_p95_s("small") == pytest.approx(1.0)


def test_in_flight_counts_never_go_negative(clock):
    """started/finished track concurrent calls, and a stray finish does not go below zero."""
    estimates = LatencyEstimates([model()], clock=clock)
    estimates.started("small")
    estimates.started("small")
    estimates.finished("small")
    assert estimates.in_flight("small") == 1
    estimates.finished("small")
    estimates.finished("small")
    assert estimates.in_flight("small") == 0


def test_expected_output_tokens_is_recent_median_or_default(clock):
    """A route's expected output is the default until answers are seen, then their median."""
    estimates = LatencyEstimates([model()], window_s=60, clock=clock)
    assert estimates.expected_output_tokens("chat", 256) == 256
    for n in (10, 20, 30, 40, 500):
        estimates.record_output_tokens("chat", n)
    assert estimates.expected_output_tokens("chat", 256) == 30
    clock.now_s += 61
    assert estimates.expected_output_tokens("chat", 256) == 256


def test_one_long_answer_does_not_set_the_expected_output_alone(clock):
    """Until prior_weight answers are seen, the default fills in for the missing ones: one 25k-token answer
    leaves the expectation at the default, three of five make it theirs."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    estimates.record_output_tokens("chat", 25_000)
    assert estimates.expected_output_tokens("chat", 256) == 256
    for _ in range(2):
        estimates.record_output_tokens("chat", 25_000)
    assert estimates.expected_output_tokens("chat", 256) == 25_000


def test_two_short_answers_do_not_set_the_expected_output_alone(clock):
    """The default fills in for short answers as for long ones: two 10-token answers of five leave the expectation
    at the default, a third makes it theirs."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    for _ in range(2):
        estimates.record_output_tokens("chat", 10)
    assert estimates.expected_output_tokens("chat", 256) == 256
    estimates.record_output_tokens("chat", 10)
    assert estimates.expected_output_tokens("chat", 256) == 10


def test_track_adds_models_and_a_changed_prior_restarts(clock):
    """Tracking a new policy's models adds new ones and re-seeds a model whose prior changed."""
    estimates = LatencyEstimates([model()], clock=clock)
    for _ in range(2):                              # two: one alone of twenty does not set a p95
        estimates.record("small", 3.0, None)
    estimates.record("unknown", 1.0, None)
    estimates.track([model(), model("medium", ttft_ms=80)])
    assert estimates.ttft_p95_s("small") == pytest.approx(3.0)
    assert estimates.ttft_p95_s("medium") == pytest.approx(0.080)
    estimates.track([model(ttft_ms=60)])
    assert estimates.ttft_p95_s("small") == pytest.approx(0.060)
