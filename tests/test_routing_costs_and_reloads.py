"""Routing at its edges: predicted cost against what is charged, reloads of routing settings,
a budget downgrade's SLA verdict, best effort's tier, alias listing and a deterministic explain."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from decimal import Decimal

import pytest

from gateway.context import Attempt, Usage
from gateway.cost import request_cost_usd
from gateway.errors import ModelBusy, NoModelMeetsSla, UpstreamStatus
from gateway.fleet import Fleet
from gateway.policy.load import parse_policy
from gateway.policy.model import Breaker, GpuSource, LatencyPrior, Match, Model, Policy, Price, Route, Routing, Sla
from gateway.routing import tighten_from_headers
from gateway.stages.account import gpu_seconds
from tests.support.fakes import FakeClock
from tests.test_routing_planner import Setup, chat_route, models, plan_names


def priced(name: str, **fields) -> Model:
    return Model(name=name, endpoint="http://127.0.0.1:1/v1", upstream_model=name, size_b=1, max_concurrency=1,
                 latency_prior=LatencyPrior(ttft_ms=100, tpot_ms=10), **fields)


@pytest.mark.parametrize("fields", [
    dict(gpu_hour_usd=Decimal("3.6"), gpus=GpuSource(source="nvml", ids=("0", "1", "2", "3"))),
    dict(gpu_hour_usd=Decimal("3600"), price=Price(Decimal("1"), Decimal("1"))),
], ids=["four-gpus", "tokens-and-gpu-time"])
def test_the_predicted_cost_is_what_the_request_is_charged(fields):
    """GPU time is predicted per GPU, and beside any token price, as the account stage charges it: a 4-GPU
    model was predicted at a quarter of its cost, a token-priced one without its GPU time."""
    model = priced("m", **fields)
    setup = Setup(Route(name="chat", match=Match(models=("auto",)), candidates=("m",), sla=Sla()),
                  extra_models={"m": model})
    predicted = setup.decide(prompt_tokens=10, max_tokens=1).candidates[0].predicted_cost_usd   # 100 ms: TTFT
    attempt = Attempt(model=model, started_s=0.0, ended_s=0.1, status=200)
    charged = request_cost_usd(model, Usage(input_tokens=10, output_tokens=1), gpu_seconds=gpu_seconds(attempt))
    assert predicted == pytest.approx(charged)


def policy_version(sha: str, prior_weight: int = 5, ttft_ms: float = 40) -> Policy:
    fleet_models = models()
    fleet_models["small"] = replace(fleet_models["small"], latency_prior=LatencyPrior(ttft_ms=ttft_ms, tpot_ms=4))
    return Policy(version=1, models=fleet_models, routes=(chat_route(),), routing=Routing(prior_weight=prior_weight),
                  content_sha256=sha)


def test_a_reload_applies_a_new_prior_weight():
    """routing.prior_weight changed by a reload takes effect (it used to wait for a restart)."""
    fleet = Fleet(policy_version("a", prior_weight=5))
    fleet.adopt(policy_version("b", prior_weight=100))
    assert fleet.estimates.prior_weight == 100


def test_a_policy_reverted_to_an_earlier_version_gets_its_latency_prior_back():
    """A -> B -> A: A's router is still cached, and the model's prior must be A's again, not B's."""
    fleet = Fleet(policy_version("a", ttft_ms=40))
    fleet.adopt(policy_version("b", ttft_ms=4000))
    version_a = policy_version("a", ttft_ms=40)
    fleet.adopt(version_a)
    decision = fleet.router(version_a).decide(version_a.routes[0], prompt_tokens=10, max_tokens=1, stream=False)
    small = next(c for c in decision.candidates if c.model.name == "small")
    assert small.predicted_ttft_ms == pytest.approx(40)


def test_a_request_still_on_an_older_policy_does_not_put_its_priors_back():
    """A -> B -> C: a request that arrived on A reaches routing after both reloads. Building A's router again
    (only the two newest are kept) must leave the live estimates, measured under B's prior, as they are."""
    version_a = policy_version("a", ttft_ms=5)
    fleet = Fleet(version_a)
    fleet.adopt(policy_version("b", ttft_ms=500))
    for _ in range(50):
        fleet.record_latency(fleet.models["small"], 0.4, 0.001)
    fleet.adopt(policy_version("c", ttft_ms=500))
    before = fleet.estimates.latency_p95_s("small")
    fleet.router(version_a)
    assert fleet.estimates.latency_p95_s("small") == before


def test_a_budget_downgrade_to_a_model_that_misses_the_sla_says_so():
    """The cheapest model breaks the latency SLA: the downgraded decision is marked as not meeting it."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=150)))
    for _ in range(50):
        setup.estimates.record("small", 1.0, 0.01)
    decision = setup.decide(prompt_tokens=10, max_tokens=1)
    assert plan_names(decision)[0] == "medium" and decision.sla_met
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded)[0] == "small" and downgraded.sla_met is False


def test_a_budget_downgrade_goes_to_the_cheapest_model_even_when_it_is_the_largest():
    """Downgraded is cheapest first, by predicted cost, not by size: a 70B model at $0.01 per million tokens
    beside a 1B at $50 takes a tenant past its budget (the smallest-first order would spend 5,000 times more)."""
    tiny = replace(priced("tiny", price=Price(Decimal("50"), Decimal("50"))), size_b=1)
    big = replace(priced("big", price=Price(Decimal("0.01"), Decimal("0.01"))), size_b=70)
    setup = Setup(Route(name="chat", match=Match(models=("auto",)), candidates=("tiny", "big"),
                        sla=Sla(p95_latency_ms=5000)), extra_models={"tiny": tiny, "big": big})
    decision = setup.decide(prompt_tokens=10, max_tokens=20)
    assert plan_names(decision) == ["tiny", "big"]          # the SLA is met: smallest first
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded) == ["big", "tiny"] and "cheapest model, big" in downgraded.note


def test_a_budget_downgrade_never_goes_below_the_routes_tier():
    """A tenant past its budget on a `min_tier: 2` route is downgraded to the cheapest model of that tier, never
    to the cheaper tier-1 `small` (cost and latency may give way, the tier asked for may not)."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=6000, min_tier=2)))
    decision = setup.decide(prompt_tokens=10, max_tokens=1)
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded) == ["medium", "large"]
    assert "cheapest model, medium" in downgraded.note


def test_best_effort_does_not_fall_back_below_the_tier_asked_for():
    """x-gateway-min-tier 3 with no tier-3 model: a 503 naming the tier, not the tier-1 fallback."""
    setup = Setup(chat_route(candidates=("small", "medium"), fallback=("small",)))
    with pytest.raises(NoModelMeetsSla, match="min_tier 3"):
        setup.decide(tighten=tighten_from_headers({"x-gateway-min-tier": "3"}))


def test_a_tiny_cost_ceiling_is_written_out_plainly():
    """The 503's reason reads $0.0000001, not 1E-7, and never rounds the cost to $0.000000."""
    setup = Setup(chat_route(sla=Sla(on_violation="reject")))
    with pytest.raises(NoModelMeetsSla) as refused:
        setup.decide(prompt_tokens=1, max_tokens=1, tighten=tighten_from_headers({"x-gateway-max-cost-usd": "0.0000001"}))
    assert "E-" not in str(refused.value) and "$0.000000 >" not in str(refused.value)
    assert "max_cost_usd 0.0000001" in str(refused.value)


BRACKET_POLICY = """version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", size_b: 1, latency_prior: {ttft_ms: 5, tpot_ms: 1}}
  big: {endpoint: "http://127.0.0.1:1/v1", size_b: 70, latency_prior: {ttft_ms: 500, tpot_ms: 50}}
routing: {explore_share: 0.5}
routes:
  - name: r
    match: {models: ["auto", "gpt-[45]"]}
    candidates: [small, big]
"""


def test_bracket_globs_are_not_listed_as_model_names():
    """/v1/models lists literal aliases only: `gpt-[45]` is a pattern, as `*` and `?` ones are."""
    assert parse_policy(BRACKET_POLICY).aliases() == ["auto"]


def test_explain_gives_the_planned_choice_every_time_and_names_exploration(tmp_path):
    """With explore_share 0.5 `policy explain` used to flip between models; it now shows the plan's choice
    and says what share live traffic explores."""
    policy, request = tmp_path / "p.yaml", tmp_path / "r.json"
    policy.write_text(BRACKET_POLICY)
    request.write_text('{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}')
    outputs = {subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", str(policy), "--request",
                               str(request)], capture_output=True, text=True, timeout=60).stdout for _ in range(4)}
    [output] = outputs
    assert "choice: small" in output and "routing.explore_share 0.5" in output


def test_a_request_for_n_choices_is_predicted_at_n_times_the_output():
    """n choices are generated together: the latency of one, the output cost of all (n: 5 used to be
    predicted at one choice's cost, so a cost ceiling let it through)."""
    setup = Setup(chat_route())
    one, five = (setup.router.decide(setup.route, prompt_tokens=10, max_tokens=40, stream=False, choices=n)
                 for n in (1, 5))
    small_one, small_five = (next(c for c in d.candidates if c.model.name == "small") for d in (one, five))
    output_usd = small_one.model.price.output_per_mtok * 40 / 1_000_000
    assert small_five.predicted_cost_usd - small_one.predicted_cost_usd == pytest.approx(4 * output_usd)
    assert small_five.predicted_latency_ms == small_one.predicted_latency_ms


def test_n_choices_reach_the_prediction_from_a_request(tmp_path):
    """`policy explain` (the live path) passes the request's n: a $0.05 ceiling refuses 5 × 40 tokens at
    $1,000 per million output tokens."""
    policy, request = tmp_path / "p.yaml", tmp_path / "r.json"
    policy.write_text("""version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", price: {input_per_mtok: 0, output_per_mtok: 1000},
          latency_prior: {ttft_ms: 5, tpot_ms: 1}}
routes:
  - name: r
    candidates: [small]
    sla: {max_cost_usd: 0.05, on_violation: reject}
""")
    request.write_text('{"model": "auto", "max_tokens": 40, "n": 5, "messages": [{"role": "user", "content": "hi"}]}')
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", str(policy), "--request",
                           str(request)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max_cost_usd 0.05" in done.stderr


@pytest.mark.parametrize("change", [dict(endpoint="http://10.0.0.9:8000/v1"), dict(upstream_model="other"),
                                    dict(api_key_env="NEW_KEY")], ids=["endpoint", "upstream_model", "api_key_env"])
def test_a_reload_that_calls_a_model_elsewhere_closes_its_circuit(change):
    """A model whose circuit opened is pointed at another server, model or credential by a reload: its circuit
    starts closed (the failures were of what it no longer calls); an unchanged model's stays open."""
    version_a = policy_version("a")
    fleet = Fleet(version_a)
    for name in ("small", "medium"):
        for _ in range(5):
            fleet.breakers.record_failure(name)
    assert fleet.breakers.state("small") == fleet.breakers.state("medium") == "open"
    moved = replace(version_a, models={**version_a.models, "small": replace(version_a.models["small"], **change)},
                    content_sha256="b")
    fleet.adopt(moved)
    assert fleet.breakers.state("small") == "closed" and fleet.breakers.state("medium") == "open"


def test_a_budget_downgrade_keeps_the_routes_fallbacks_after_its_candidates():
    """A tenant past its budget is downgraded to the cheapest candidate: the route's fallback still follows the
    candidates in the plan (it was dropped, so one failing model left the request with nothing to fall back on)."""
    setup = Setup(chat_route(candidates=("medium", "small"), fallback=("large",)))
    decision = setup.decide(prompt_tokens=10, max_tokens=1)
    assert plan_names(decision) == ["small", "medium", "large"]
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded) == ["small", "medium", "large"]


def test_a_reject_route_whose_models_circuits_are_open_says_when_to_come_back():
    """A `reject` route whose every candidate is out only for its open circuit answers 503 `sla_unmet` with a
    Retry-After of the first circuit's half-open time, so the SDK waits that long, not its own back-off."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=6000, on_violation="reject"), candidates=("small", "medium")))
    setup.breakers.record_failure("small")
    setup.clock.now_s += 10
    setup.breakers.record_failure("medium")
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide()
    assert "circuit open" in str(caught.value) and caught.value.headers["Retry-After"] == "20"
    slow = Setup(chat_route(sla=Sla(p95_latency_ms=6000, on_violation="reject"), candidates=("small", "medium")))
    for name in ("small", "medium"):
        for _ in range(30):
            slow.estimates.record(name, 9.0, 0.1)
    with pytest.raises(NoModelMeetsSla) as too_slow:
        slow.decide()
    assert "Retry-After" not in too_slow.value.headers


def test_the_retry_after_of_an_open_circuit_rounds_up_and_is_never_zero():
    """A circuit half-open in 19.5 s asks the client back in 20 s, and one half-open in 0.5 s in 1 s: never a
    moment too soon, and never 0 (an SDK would retry at once into the same open circuit)."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=6000, on_violation="reject"), candidates=("small",)))
    setup.breakers.record_failure("small")
    for waited_s, retry_after in ((10.5, "20"), (19.0, "1")):
        setup.clock.now_s += waited_s
        with pytest.raises(NoModelMeetsSla) as caught:
            setup.decide()
        assert caught.value.headers["Retry-After"] == retry_after


def test_no_retry_after_when_a_model_whose_circuit_is_open_is_also_too_slow():
    """`small` is out for its open circuit and for its predicted latency: it would not serve once its circuit
    turns half-open, so the 503 does not tell the client to come back then."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=1000, on_violation="reject"), candidates=("small", "medium")))
    setup.breakers.record_failure("small")
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide()
    assert "small: latency 1060ms > 1000ms, circuit open" in str(caught.value)
    assert "Retry-After" not in caught.value.headers


def test_a_reload_applies_its_latency_window_and_breaker_settings():
    """A reload's latency window and breaker settings reach the live estimates and circuits: with
    failure_threshold 1 one failure now opens a circuit."""
    version_a = policy_version("a")
    fleet = Fleet(version_a)
    routing = replace(version_a.routing, latency_window_s=60.0, breaker=Breaker(failure_threshold=1, open_s=7.0))
    fleet.adopt(replace(version_a, routing=routing, content_sha256="b"))
    assert fleet.estimates.window_s == 60.0
    fleet.breakers.record_failure("small")
    assert fleet.breakers.state("small") == "open"
    assert fleet.breakers.retry_in_s("small") == pytest.approx(7.0, abs=0.5)


async def test_a_reload_that_cuts_max_concurrency_applies_to_the_call_slots():
    """A model's max_concurrency cut to 1 by a reload caps its call slots at 1, even for a call that asks with
    the older version's limit."""
    version_a = policy_version("a")
    fleet = Fleet(version_a)
    small = replace(version_a.models["small"], max_concurrency=1)
    cut = replace(version_a, models={**version_a.models, "small": small}, content_sha256="b")
    fleet.adopt(cut)
    assert await fleet.slots.take("small", 64, 1, 1.0) == 0.0
    with pytest.raises(ModelBusy):
        await fleet.slots.take("small", 64, 1, 0.01)


def test_a_fleet_starts_with_its_policys_latency_window_and_prior_weight():
    """The routing settings of the policy a gateway starts with apply from the start, not from the first reload:
    with prior_weight 0 one slow answer is the p95, and with a 60 s window it is gone 61 s later."""
    clock = FakeClock()
    version_a = policy_version("a", prior_weight=0)
    fleet = Fleet(replace(version_a, routing=replace(version_a.routing, latency_window_s=60.0)), clock=clock)
    fleet.record_latency(fleet.models["small"], 3.0, 0.001)
    assert fleet.estimates.ttft_p95_s("small") == pytest.approx(3.0)
    clock.now_s += 61
    assert fleet.estimates.sample_count("small") == 0


def test_a_models_retry_after_reaches_its_circuit_through_the_fleet():
    """A 429 with Retry-After 90, recorded by the fleet, opens the model's circuit for those 90 s at the first
    failure, below the threshold of 5."""
    clock = FakeClock()
    fleet = Fleet(policy_version("a"), clock=clock)
    fleet.record_failure("small", UpstreamStatus("rate limited", upstream_status=429, retry_after_s=90.0))
    assert fleet.breakers.state("small") == "open"
    assert fleet.breakers.retry_in_s("small") == pytest.approx(90.0)


def test_a_changed_prior_weight_restarts_every_models_samples():
    """Samples measured under one prior weight are forgotten when a reload changes it: each model starts again
    from its prior."""
    fleet = Fleet(policy_version("a", prior_weight=5))
    for _ in range(20):
        fleet.record_latency(fleet.models["small"], 0.4, 0.001)
    assert fleet.estimates.sample_count("small") == 20
    fleet.adopt(policy_version("b", prior_weight=100))
    assert fleet.estimates.sample_count("small") == 0


def test_the_router_of_the_previous_policy_version_is_kept_for_requests_still_on_it():
    """After a reload the previous version's router is the same one, not rebuilt; an older one is dropped."""
    version_a = policy_version("a")
    fleet = Fleet(version_a)
    router_a = fleet.router(version_a)
    fleet.adopt(policy_version("b"))
    assert fleet.router(version_a) is router_a


def test_a_call_that_finished_no_longer_counts_in_flight():
    """Each call started and finished on a model leaves its in-flight count where it was."""
    fleet = Fleet(policy_version("a"))
    fleet.started("small")
    fleet.started("small")
    fleet.finished("small")
    assert fleet.estimates.in_flight("small") == 1
    fleet.finished("small")
    assert fleet.estimates.in_flight("small") == 0
