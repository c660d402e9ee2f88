"""A percentile needs enough evidence before one answer can set it: the prior fills in for the missing samples."""

from __future__ import annotations

import math
import random
from decimal import Decimal

import pytest

from gateway.policy.model import LatencyPrior, Match, Model, Policy, Price, Route, Routing, Sla, Timeouts
from gateway.replay import ReplayRequest, replay
from gateway.routing.estimates import LatencyEstimates, SampleWindow, evidence_needed
from tests.support import policies
from tests.support.fakes import FakeClock, prior_model as model
from tests.support.harness import Harness

#: the small model's TTFT prior, seconds
PRIOR_S = 0.040


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def nearest_rank(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of `values`, by sorting a copy (the reference, not the fast path)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_evidence_needed_is_the_count_where_nearest_rank_stops_being_the_largest():
    """p95 needs 20 values and the median 2 before the quantile is not simply the largest, floats rounding aside."""
    assert [evidence_needed(q) for q in (0.5, 0.9, 0.95, 0.99, 1.0)] == [2, 10, 20, 100, 1]
    for q in (0.5, 0.75, 0.9, 0.95, 0.99):
        needed = evidence_needed(q)
        assert math.ceil(q * needed) < needed and math.ceil(q * (needed - 1)) >= needed - 1


def test_one_slow_answer_leaves_the_p95_at_the_prior_and_a_second_sets_it(clock):
    """With the default prior_weight, the first slow answer after start does not set the p95; two of twenty do."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    estimates.record("small", 3.0, 0.05)
    assert estimates.latency_p95_s("small") == (pytest.approx(PRIOR_S), pytest.approx(0.004))
    estimates.record("small", 3.0, 0.05)
    assert estimates.latency_p95_s("small") == (pytest.approx(3.0), pytest.approx(0.05))


def test_one_slow_answer_after_a_quiet_spell_or_a_restart_does_not_set_the_p95(clock):
    """Once the window has emptied (samples expired, or estimates restarted) one slow answer again cannot set it."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    for _ in range(30):
        estimates.record("small", 0.030, None)
    clock.now_s += 61
    estimates.record("small", 3.0, None)
    assert estimates.ttft_p95_s("small") == pytest.approx(PRIOR_S)
    estimates.restart()
    estimates.record("small", 3.0, None)
    assert estimates.ttft_p95_s("small") == pytest.approx(PRIOR_S)


def test_a_lone_slow_answer_among_few_fast_ones_does_not_set_the_p95(clock):
    """Ten fast answers and one slow one keep the p95 at the fast level: the prior stands in for the nine missing."""
    estimates = LatencyEstimates([model()], window_s=60, prior_weight=5, clock=clock)
    for _ in range(10):
        estimates.record("small", 0.030, None)
    estimates.record("small", 3.0, None)
    assert estimates.ttft_p95_s("small") == pytest.approx(PRIOR_S)


def test_prior_weight_zero_keeps_the_samples_alone_while_one_already_fills_the_gap(clock):
    """prior_weight 0 asks for the samples alone (one slow answer is the p95, as before); prior_weight 1 gets the
    same evidence floor as the default."""
    alone = LatencyEstimates([model()], window_s=60, prior_weight=0, clock=clock)
    assert alone.ttft_p95_s("small") == pytest.approx(PRIOR_S)
    alone.record("small", 3.0, None)
    assert alone.ttft_p95_s("small") == pytest.approx(3.0)
    floored = LatencyEstimates([model()], window_s=60, prior_weight=1, clock=clock)
    floored.record("small", 3.0, None)
    assert floored.ttft_p95_s("small") == pytest.approx(PRIOR_S)


@pytest.mark.parametrize("prior_weight", [1, 5, 19, 25])
def test_percentiles_are_nearest_rank_over_the_prior_counted_as_the_missing_evidence(prior_weight):
    """Over random samples, expiries and evictions, every percentile equals nearest rank over the samples plus the
    prior counted as max(prior_weight, evidence_needed − samples), and quantile_with equals nearest rank with its
    prior added."""
    rnd = random.Random(prior_weight)
    for _ in range(200):
        prior = rnd.choice([0.5, 1.0, 2.0])
        max_samples = rnd.choice([3, 16, 1024])
        window = SampleWindow(prior, prior_weight, max_samples)
        held: list[tuple[float, float]] = []
        for now_s in range(rnd.randint(1, 50)):
            if rnd.random() < 0.1:
                window.expire(now_s - 10)
                held = [(taken_s, value) for taken_s, value in held if taken_s >= now_s - 10]
            value = rnd.choice([0.25, 0.5, 1.0, 2.0, 4.0, round(rnd.uniform(0, 5), 3)])
            window.add(now_s, value)
            held = (held + [(now_s, value)])[-max_samples:]
            samples = [value for _, value in held]
            for q in (0.5, 0.95, 0.99):
                weight = max(prior_weight, evidence_needed(q) - len(samples))
                assert window.quantile(q) == nearest_rank(samples + [prior] * weight, q)
            extra = rnd.choice([0, 2, 7])
            assert window.quantile_with(0.5, 3.0, extra) == nearest_rank(samples + [prior] * prior_weight
                                                                         + [3.0] * extra, 0.5)


def test_the_replay_simulator_keeps_the_small_model_after_one_queued_answer():
    """In `gateway replay`, one answer slowed by queueing does not move the next requests off the small model,
    exactly as live (the simulator routes with the same estimates)."""
    prices = Price(Decimal("0.05"), Decimal("0.10"))
    small = Model("small", "http://127.0.0.1:1/small", "small", size_b=1, max_concurrency=1, price=prices,
                  latency_prior=LatencyPrior(40, 4), timeouts=Timeouts(first_byte_s=60))
    large = Model("large", "http://127.0.0.1:1/large", "large", size_b=70, price=prices,
                  latency_prior=LatencyPrior(200, 20), timeouts=Timeouts(first_byte_s=60))
    route = Route("r", Match(models=("auto",)), candidates=("small", "large"), sla=Sla(p95_latency_ms=500))
    policy = Policy(version=1, models={"small": small, "large": large}, routes=(route,),
                    routing=Routing(latency_window_s=60, prior_weight=5))
    requests = [ReplayRequest(0.0, 10, 250), ReplayRequest(0.0, 10, 10)] + [
        ReplayRequest(5.0 + i, 10, 10) for i in range(3)]
    outcomes = replay(policy, requests, jitter_sigma=0.0).outcomes
    assert outcomes[1].queue_s == pytest.approx(0.04 + 249 * 0.004)      # its TTFT sample: over a second
    assert [outcome.label for outcome in outcomes] == ["small"] * 5


# --- end to end: the real gateway in front of simulated models, through the openai SDK -------------------------

SLA_MS = 500
SLOW_TTFT_MS = 700

POLICY = policies.models(
    policies.standard_model("small", timeouts=policies.short_timeouts()),
    policies.standard_model("medium", timeouts=policies.short_timeouts()),
) + """
routing: {{latency_window_s: 60, prior_weight: 5, explore_share: 0}}
routes:
  - name: sla
    match: {{models: [auto]}}
    candidates: [small, medium]
    sla: {{p95_latency_ms: %d}}
""" % SLA_MS


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY, {"small": dict(ttft_ms=5, tpot_ms=1), "medium": dict(ttft_ms=10, tpot_ms=2)}).start()
    yield harness
    harness.stop()


def served_by(gw, client) -> str:
    """The model the gateway says answered one 10-token chat request."""
    response = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hello"}], max_tokens=10)
    return response.headers["x-gateway-model"]


def test_one_slow_answer_keeps_traffic_on_the_small_model_and_a_sustained_slowdown_moves_it(gw):
    """On the running gateway, one slow answer from the small model leaves the next requests on it; once it is
    slow again, the second slow answer in the window moves traffic to the medium model."""
    client = gw.openai()
    assert [served_by(gw, client) for _ in range(3)] == ["small"] * 3
    gw.sim_config("small", ttft_ms=SLOW_TTFT_MS)
    try:
        assert served_by(gw, client) == "small"                         # the one slow answer
    finally:
        gw.sim_config("small", ttft_ms=5)
    assert [served_by(gw, client) for _ in range(3)] == ["small"] * 3
    gw.sim_config("small", ttft_ms=SLOW_TTFT_MS)
    try:
        assert [served_by(gw, client) for _ in range(3)] == ["small", "medium", "medium"]
    finally:
        gw.sim_config("small", ttft_ms=5)
