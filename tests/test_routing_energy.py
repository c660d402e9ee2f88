"""sla.max_energy_j: energy per output token learned per model, predicted per request, held as an SLA term."""

from __future__ import annotations

import math
import random

import pytest

from gateway.errors import NoModelMeetsSla
from gateway.policy.load import check_policy, parse_policy
from gateway.policy.model import Sla
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.explain import format_decision
from gateway.routing.planner import Router
from gateway.routing.tighten import tighten_from_headers
from gateway.errors import ClientError


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


GPUS = "{source: nvml, ids: [0]}"


def policy_text(sla: str, small_gpus: str = GPUS) -> str:
    gpus_line = f"    gpus: {small_gpus}\n" if small_gpus else ""
    return f"""
version: 1
models:
  small:
    endpoint: http://127.0.0.1:1/v1
    size_b: 1
    latency_prior: {{ttft_ms: 10, tpot_ms: 1}}
{gpus_line}  medium:
    endpoint: http://127.0.0.1:2/v1
    size_b: 8
    latency_prior: {{ttft_ms: 10, tpot_ms: 1}}
    gpus: {{source: nvml, ids: [1]}}
routes:
  - name: chat
    candidates: [small, medium]
    sla: {sla}
"""


def router(sla: str = "{max_energy_j: 150}") -> tuple[Router, LatencyEstimates, Clock]:
    policy = parse_policy(policy_text(sla))
    clock = Clock()
    estimates = LatencyEstimates.from_policy(policy, clock=clock)
    return Router(policy, estimates, Breakers(policy.routing.breaker, clock), random.Random(0)), estimates, clock


def decide(r: Router, max_tokens: int = 100, **kwargs):
    route = r.policy.routes[0]
    return r.decide(route, prompt_tokens=10, max_tokens=max_tokens, stream=False, **kwargs)


def test_energy_per_token_is_the_windows_joules_over_its_tokens():
    estimates = LatencyEstimates([], window_s=60, clock=(clock := Clock()))
    assert estimates.joules_per_output_token("small") is None
    estimates.record_energy("small", 100.0, 50)
    clock.now_s += 30
    estimates.record_energy("small", 20.0, 50)
    assert estimates.joules_per_output_token("small") == pytest.approx(1.2)
    clock.now_s += 40                      # the first answer leaves the 60 s window
    assert estimates.joules_per_output_token("small") == pytest.approx(0.4)
    clock.now_s += 30                      # all have left: the last figure stands, the model is not "unmeasured"
    assert estimates.joules_per_output_token("small") == pytest.approx(0.4)
    estimates.record_energy("small", 300.0, 100)
    assert estimates.joules_per_output_token("small") == pytest.approx(3.0)


def test_answers_without_output_or_with_unreadable_joules_teach_nothing():
    estimates = LatencyEstimates([], clock=Clock())
    estimates.record_energy("small", 50.0, 0)
    estimates.record_energy("small", math.nan, 10)
    estimates.record_energy("small", -1.0, 10)
    assert estimates.joules_per_output_token("small") is None
    estimates.record_energy("small", 0.0, 10)          # measured, and nothing above idle: 0 J is a real answer
    assert estimates.joules_per_output_token("small") == 0.0


def test_the_window_keeps_at_most_max_samples_answers():
    estimates = LatencyEstimates([], clock=Clock(), max_samples=3)
    for joules in (100.0, 1.0, 1.0, 1.0):
        estimates.record_energy("small", joules, 1)
    assert estimates.joules_per_output_token("small") == pytest.approx(1.0)


def test_a_model_measured_above_the_limit_is_dropped_for_energy():
    r, estimates, _ = router()
    estimates.record_energy("small", 200.0, 100)       # 2 J a token: 200 J for 100 tokens
    estimates.record_energy("medium", 50.0, 100)       # 0.5 J a token: 50 J
    decision = decide(r)
    small, medium = decision.candidates
    assert small.predicted_energy_j == pytest.approx(200.0)
    assert small.reasons == ("energy 200.0J > 150J",)
    assert medium.kept and medium.predicted_energy_j == pytest.approx(50.0)
    assert decision.plan[0].name == "medium" and decision.sla_met


def test_a_model_predicted_exactly_at_the_energy_limit_meets_it():
    """max_energy_j is a ceiling the prediction may reach: 1.5 J a token for 100 tokens meets max_energy_j 150."""
    r, estimates, _ = router()
    estimates.record_energy("small", 150.0, 100)
    decision = decide(r)
    assert decision.candidates[0].predicted_energy_j == 150.0
    assert decision.candidates[0].kept and decision.plan[0].name == "small"


def test_a_model_dropped_for_energy_stays_dropped_after_its_window_and_is_explored():
    r, estimates, clock = router()
    estimates.record_energy("small", 400.0, 100)
    clock.now_s += 10 * estimates.window_s
    assert decide(r).plan[0].name == "medium"          # still 400 J predicted: not back as "unmeasured"
    policy = parse_policy(policy_text("{max_energy_j: 150}").replace("routes:", "routing: {explore_share: 1.0}\nroutes:"))
    explorer = Router(policy, estimates, Breakers(policy.routing.breaker, clock), random.Random(0))
    decision = decide(explorer)
    assert decision.explored and decision.plan[0].name == "small" and not decision.sla_met


def test_an_unmeasured_model_is_not_held_to_the_limit():
    r, estimates, _ = router()
    decision = decide(r)
    assert [c.predicted_energy_j for c in decision.candidates] == [None, None]
    assert decision.plan[0].name == "small" and decision.sla_met


def test_the_prediction_scales_with_expected_output_and_choices():
    r, estimates, _ = router()
    estimates.record_energy("small", 100.0, 100)       # 1 J a token
    assert decide(r, max_tokens=100).candidates[0].kept
    assert not decide(r, max_tokens=100, choices=2).candidates[0].kept       # 200 J for two choices
    assert decide(r, max_tokens=0).candidates[0].predicted_energy_j is None   # embeddings: no output to scale


def test_a_request_may_tighten_the_energy_limit_by_header():
    r, estimates, _ = router()
    estimates.record_energy("small", 100.0, 100)       # 100 J for 100 tokens: within 150
    tighten = tighten_from_headers({"x-gateway-max-energy-j": "80"})
    decision = decide(r, tighten=tighten)
    assert decision.candidates[0].reasons == ("energy 100.0J > 80J",)
    assert tighten.as_dict() == {"max_energy_j": 80.0}
    loose = tighten_from_headers({"x-gateway-max-energy-j": "1000"})
    assert decide(r, tighten=loose).candidates[0].kept                     # a header never loosens the route
    estimates.record_energy("small", 200.0, 50)        # now 2 J a token
    assert not decide(r, tighten=loose).candidates[0].kept


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "lots"])
def test_a_bad_energy_header_is_a_clear_400(value):
    with pytest.raises(ClientError, match="x-gateway-max-energy-j.*positive number of joules"):
        tighten_from_headers({"x-gateway-max-energy-j": value})


def test_reject_names_the_energy_term_and_best_effort_still_serves():
    r, estimates, _ = router("{max_energy_j: 10, on_violation: reject}")
    estimates.record_energy("small", 100.0, 100)
    estimates.record_energy("medium", 100.0, 100)
    with pytest.raises(NoModelMeetsSla, match=r"max_energy_j 10: small: energy 100.0J > 10J; medium: energy"):
        decide(r)
    r, estimates, _ = router("{max_energy_j: 10}")
    estimates.record_energy("small", 100.0, 100)
    estimates.record_energy("medium", 100.0, 100)
    decision = decide(r)
    assert not decision.sla_met and decision.plan and "max_energy_j 10" in decision.note


def test_explain_shows_the_predicted_energy_and_the_limit():
    r, estimates, _ = router()
    estimates.record_energy("small", 200.0, 100)
    text = format_decision(decide(r))
    assert "max_energy_j 150" in text.splitlines()[0]
    header, small, medium = text.splitlines()[4:7]
    assert header.split() == ["model", "size_b", "tier", "ctx", "ttft_ms", "latency_ms", "cost_usd", "energy_j",
                              "verdict"]
    assert small.split()[7] == "200.0" and "dropped: energy 200.0J > 150J" in small
    assert medium.split()[7] == "-" and medium.endswith("chosen")


def test_a_policy_holding_an_unmeasured_candidate_to_max_energy_j_is_refused(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("{max_energy_j: 150}", small_gpus=""))
    problems = check_policy(path)
    assert len(problems) == 1
    assert "sla.max_energy_j needs candidates whose GPUs are measured (gpus:); without gpus: chat: small" \
        in str(problems[0])
    path.write_text(policy_text("{p95_latency_ms: 500}", small_gpus=""))       # no energy term: no need
    assert check_policy(path) == []
    path.write_text(policy_text("{max_energy_j: 150}"))
    assert check_policy(path) == []


def test_sla_defaults_hold_no_energy_limit():
    assert Sla().max_energy_j is None


def test_an_answer_of_n_choices_teaches_the_router_one_choices_length_and_pace():
    """n choices are generated together: the route's expected output and the model's TPOT are per choice, so
    a request with n is not predicted n times too long (nor its energy and cost n² times)."""
    from types import SimpleNamespace

    from gateway.context import Attempt, RequestContext, Usage
    from gateway.fleet import Fleet
    from gateway.stages.account import Account

    policy = parse_policy(policy_text("{max_energy_j: 150}"))
    fleet = Fleet(policy, clock=Clock())
    account = Account(SimpleNamespace(fleet=fleet))
    route, small = policy.routes[0], policy.models["small"]
    decision = Router(policy, fleet.estimates, fleet.breakers, random.Random(0)).decide(
        route, prompt_tokens=10, max_tokens=100, stream=True)
    for _ in range(10):
        attempt = Attempt(model=small, started_s=0.0, ended_s=1.01, status=200, ttft_s=0.01,
                          usage=Usage(input_tokens=10, output_tokens=303))
        ctx = RequestContext(http=None, policy=policy, request_id="r", choices=3, decision=decision,
                             usage=attempt.usage)
        account._learn(ctx, attempt)
    assert fleet.estimates.expected_output_tokens("chat", 256) == 101
    assert fleet.estimates.tpot_p50_s("small") == pytest.approx(1.0 / 100)
