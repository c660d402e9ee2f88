"""The SLA planner: smallest model that meets the SLA, fallbacks, best effort, reject, explore."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from gateway.errors import ClientError, NoModelMeetsSla, PolicyError
from gateway.policy.model import (Breaker, LatencyPrior, Match, Model, Policy, Price, Route, Routing,
                                  Sla)
from gateway.routing import (Breakers, LatencyEstimates, Router, Tighten, format_decision,
                             tighten_from_headers)
from tests.support.fakes import FakeClock


def models() -> dict[str, Model]:
    """The demo's three models: small (1B), medium (8B), large (70B)."""
    def model(name: str, size_b: float, tier: int, context: int, concurrency: int, price: tuple[str, str],
              ttft_ms: float, tpot_ms: float) -> Model:
        return Model(name=name, endpoint="http://127.0.0.1:1/v1", upstream_model=f"sim-{name}",
                     size_b=size_b, tier=tier, context_window=context, max_concurrency=concurrency,
                     price=Price(Decimal(price[0]), Decimal(price[1])),
                     latency_prior=LatencyPrior(ttft_ms=ttft_ms, tpot_ms=tpot_ms))
    return {"small": model("small", 1, 1, 8192, 64, ("0.05", "0.10"), 40, 4),
            "medium": model("medium", 8, 2, 32768, 32, ("0.30", "0.60"), 80, 8),
            "large": model("large", 70, 3, 131072, 16, ("2.50", "10.00"), 200, 20)}


def chat_route(sla: Sla | None = None, candidates: tuple[str, ...] = ("small", "medium", "large"),
               fallback: tuple[str, ...] = ()) -> Route:
    """The route under test; by default every candidate meets a loose SLA."""
    return Route(name="chat", match=Match(models=("auto",)), candidates=candidates,
                 sla=sla or Sla(p95_latency_ms=6000), fallback=fallback)


class Setup:
    """A router over one route, with its clock, estimates and breakers at hand."""

    def __init__(self, route: Route, *, explore_share: float = 0.0, seed: int = 1, max_attempts: int = 4,
                 extra_models: dict[str, Model] | None = None) -> None:
        self.clock = FakeClock()
        routing = Routing(explore_share=explore_share, latency_window_s=60, prior_weight=5,
                          breaker=Breaker(failure_threshold=1, open_s=30), max_attempts=max_attempts)
        self.policy = Policy(version=1, models={**models(), **(extra_models or {})}, routes=(route,),
                             routing=routing)
        self.estimates = LatencyEstimates.from_policy(self.policy, clock=self.clock)
        self.breakers = Breakers(routing.breaker, self.clock)
        self.router = Router(self.policy, self.estimates, self.breakers, random.Random(seed))
        self.route = route

    def decide(self, prompt_tokens: int = 100, max_tokens: int | None = None, stream: bool = False,
               tighten: Tighten | None = None):
        """One decision for the route."""
        return self.router.decide(self.route, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                  stream=stream, tighten=tighten)


def plan_names(decision) -> list[str]:
    return [m.name for m in decision.plan]


def candidate(decision, name: str):
    return next(c for c in decision.candidates if c.model.name == name)


def test_smallest_model_meeting_the_sla_is_chosen():
    """All three meet a loose SLA: small goes first, the others follow smallest first."""
    decision = Setup(chat_route()).decide()
    assert plan_names(decision) == ["small", "medium", "large"]
    assert decision.sla_met and not decision.explored
    small = candidate(decision, "small")
    assert small.predicted_latency_ms == pytest.approx(40 + 255 * 4)
    assert small.predicted_ttft_ms == pytest.approx(40)
    assert small.predicted_cost_usd == Decimal("0.05") * 100 / 10**6 + Decimal("0.10") * 256 / 10**6


def test_route_match_goes_through_the_router():
    """Router.match finds the route by alias and endpoint."""
    setup = Setup(chat_route())
    assert setup.router.match("chat", "auto", None, {}, 10) is setup.route
    assert setup.router.match("chat", "nope", None, {}, 10) is None


def test_slow_small_model_gives_way_to_medium():
    """Real slow samples for small push its p95 over the SLA, so medium is chosen."""
    setup = Setup(chat_route(Sla(p95_latency_ms=2500)))
    assert plan_names(setup.decide())[0] == "small"
    for _ in range(3):
        setup.estimates.record("small", 3.0, 0.01)
    decision = setup.decide()
    assert plan_names(decision)[0] == "medium"
    assert any(r.startswith("latency ") for r in candidate(decision, "small").reasons)


def test_small_recovers_when_slow_samples_expire():
    """Once the slow samples leave the window, small is chosen again."""
    setup = Setup(chat_route(Sla(p95_latency_ms=2500)))
    for _ in range(2):                              # two: one alone of twenty does not set a p95
        setup.estimates.record("small", 3.0, 0.01)
    assert plan_names(setup.decide())[0] == "medium"
    setup.clock.now_s += 61
    assert plan_names(setup.decide())[0] == "small"


def test_long_prompt_needs_a_larger_context_window():
    """A prompt beyond small's 8192-token window goes to medium, with the reason recorded."""
    decision = Setup(chat_route()).decide(prompt_tokens=9000, max_tokens=100)
    assert plan_names(decision) == ["medium", "large"]
    assert candidate(decision, "small").reasons == ("context: 9100 > 8192",)


def test_min_tier_drops_lower_tiers():
    """A route with min_tier 2 never plans the tier-1 model."""
    decision = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2))).decide()
    assert plan_names(decision) == ["medium", "large"]
    assert candidate(decision, "small").reasons == ("tier 1 < 2",)


def test_cost_ceiling_drops_expensive_models():
    """A max cost per request keeps only the models predicted under it."""
    decision = Setup(chat_route(Sla(p95_latency_ms=6000, max_cost_usd=Decimal("0.001")))).decide()
    assert plan_names(decision) == ["small", "medium"]
    assert candidate(decision, "large").reasons[0].startswith("cost $0.00281 > $0.001")


def test_a_model_predicted_exactly_at_a_limit_meets_it():
    """A limit is a ceiling the prediction may reach: `small`, predicted at 40 ms and $0.0000051 for a one-token
    answer, meets p95_latency_ms 40 and max_cost_usd 0.0000051."""
    setup = Setup(chat_route(Sla(p95_latency_ms=40, max_cost_usd=Decimal("0.0000051"), on_violation="reject")))
    decision = setup.decide(max_tokens=1)
    small = candidate(decision, "small")
    assert (small.predicted_latency_ms, small.predicted_cost_usd) == (40, Decimal("0.0000051"))
    assert small.kept and plan_names(decision) == ["small"]


def test_ttft_limit_applies_to_streams_only():
    """p95_ttft_ms drops slow-to-start models for streams but not for whole answers."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, p95_ttft_ms=100)))
    assert plan_names(setup.decide(stream=True)) == ["small", "medium"]
    assert candidate(setup.decide(stream=True), "large").reasons == ("ttft 200ms > 100ms",)
    assert plan_names(setup.decide(stream=False)) == ["small", "medium", "large"]


def test_tighten_headers_only_tighten():
    """Header limits stricter than the route's apply; looser ones leave the route's limits."""
    setup = Setup(chat_route(Sla(p95_latency_ms=2500)))
    strict = tighten_from_headers({"x-gateway-max-latency-ms": "1500", "x-gateway-min-tier": "1"})
    assert strict == Tighten(max_latency_ms=1500.0, min_tier=1)
    assert strict.as_dict() == {"max_latency_ms": 1500.0, "min_tier": 1.0}
    assert tighten_from_headers({}).empty
    assert plan_names(setup.decide(tighten=strict)) == ["small"]
    loose = tighten_from_headers({"x-gateway-max-latency-ms": "60000", "x-gateway-max-cost-usd": "5"})
    assert plan_names(setup.decide(tighten=loose)) == ["small", "medium"]
    tier = tighten_from_headers({"x-gateway-min-tier": "3"})
    assert plan_names(Setup(chat_route()).decide(tighten=tier)) == ["large"]


def test_a_ttft_header_tightens_a_route_that_sets_no_ttft_limit():
    """x-gateway-max-ttft-ms 100 on a stream drops `large` (200 ms to its first token) from a route with no TTFT
    limit of its own."""
    setup = Setup(chat_route())
    tighten = tighten_from_headers({"x-gateway-max-ttft-ms": "100"})
    decision = setup.decide(stream=True, tighten=tighten)
    assert plan_names(decision) == ["small", "medium"]
    assert candidate(decision, "large").reasons == ("ttft 200ms > 100ms",)


def test_a_zero_cost_header_keeps_only_free_models():
    """x-gateway-max-cost-usd 0 is a ceiling like any other: a free self-hosted model is planned, priced ones
    are not."""
    free = Model(name="free", endpoint="http://127.0.0.1:1/v1", upstream_model="free", size_b=3,
                 latency_prior=LatencyPrior(ttft_ms=40, tpot_ms=4))
    setup = Setup(chat_route(candidates=("small", "free", "large")), extra_models={"free": free})
    tighten = tighten_from_headers({"x-gateway-max-cost-usd": "0"})
    assert tighten.max_cost_usd == 0
    assert plan_names(setup.decide(tighten=tighten)) == ["free"]


def test_a_cost_header_finer_than_a_picodollar_is_read_down_never_up():
    """A ceiling is read to the pico-dollar by cutting the rest off: rounding 1.9 pico-dollars up to 2 would let
    through a request it refuses."""
    tighten = tighten_from_headers({"x-gateway-max-cost-usd": "0.0000000000019"})
    assert tighten.max_cost_usd == Decimal("0.000000000001")


@pytest.mark.parametrize("header, value", [("x-gateway-max-latency-ms", "fast"),
                                           ("x-gateway-max-ttft-ms", "-5"),
                                           ("x-gateway-min-tier", "1.5"),
                                           ("x-gateway-max-cost-usd", "NaN")])
def test_invalid_tighten_header_names_the_header(header, value):
    """A malformed tightening header is a 400 that names the header."""
    with pytest.raises(ClientError, match=header) as caught:
        tighten_from_headers({header: value})
    assert caught.value.status == 400
    assert caught.value.param == header


def test_best_effort_plans_fastest_first_and_says_what_failed():
    """No model meets 100 ms: best effort plans by predicted latency and notes the unmet term."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2, on_violation="best_effort"), fallback=("large",)))
    decision = setup.decide(tighten=Tighten(max_latency_ms=100))
    assert not decision.sla_met
    assert plan_names(decision) == ["medium", "large"]
    assert "p95_latency_ms 100" in decision.note
    assert "medium: latency 2120ms > 100ms" in decision.note


def test_best_effort_puts_a_small_model_measured_slow_after_faster_ones():
    """Best effort orders every candidate that fits by predicted latency, not by size: `small`, measured at 3 s
    to its first token, goes after `medium` and `large` when no model meets the 100 ms asked for."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=1, on_violation="best_effort")))
    for _ in range(50):
        setup.estimates.record("small", 3.0, 0.5)
    decision = setup.decide(tighten=Tighten(max_latency_ms=100))
    assert not decision.sla_met
    predicted = {c.model.name: c.predicted_latency_ms for c in decision.candidates}
    assert predicted["medium"] < predicted["large"] < predicted["small"]
    assert plan_names(decision) == ["medium", "large", "small"]


def test_best_effort_leaves_out_a_candidate_whose_circuit_is_open_while_others_are_healthy():
    """No model meets 100 ms and `small`, the fastest, has an open circuit: best effort plans the healthy ones by
    predicted latency and leaves `small` out (it would only fail fast, or hold the request)."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, on_violation="best_effort")))
    setup.breakers.record_failure("small")
    decision = setup.decide(tighten=Tighten(max_latency_ms=100))
    assert not decision.sla_met
    assert plan_names(decision) == ["medium", "large"]


def test_reject_names_the_constraint_no_model_met():
    """A reject route raises NoModelMeetsSla naming the limit and each model's prediction."""
    setup = Setup(chat_route(Sla(p95_latency_ms=200, on_violation="reject")))
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide()
    message = caught.value.message
    assert message.startswith("no model of route 'chat' meets p95_latency_ms 200: ")
    assert "small: latency 1060ms > 200ms" in message and "large: latency 5300ms > 200ms" in message
    assert caught.value.status == 503


def test_prompt_too_long_for_every_model_is_a_client_error():
    """A request longer than every context window is a 400 context_length_exceeded."""
    with pytest.raises(ClientError) as caught:
        Setup(chat_route()).decide(prompt_tokens=200_000, max_tokens=10)
    assert caught.value.code == "context_length_exceeded"
    assert "131072" in caught.value.message


def test_a_prompt_that_fits_without_max_tokens_is_not_refused_for_a_guessed_answer_length():
    """Without max_tokens a model writes what room its context has left: a prompt one token short of the largest
    window is planned on the model whose window fits it, though the route expects a 256-token answer (it was a 400
    whose cut-off moved with the route's learned answer length); it is refused only when the prompt alone and one
    token do not fit, blaming the request's input field."""
    route = chat_route(Sla(p95_latency_ms=60_000), candidates=("small", "large"))
    decision = Setup(route).decide(prompt_tokens=131_071)
    assert plan_names(decision) == ["large"]
    assert decision.output_tokens == 256           # the guess still predicts latency and cost
    with pytest.raises(ClientError) as caught:
        Setup(route).router.decide(route, prompt_tokens=131_072, max_tokens=None, stream=False, input_param="prompt")
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")
    assert caught.value.message == ("request needs 131073 tokens (131072 prompt + at least 1 to answer) but the "
                                    "largest context window of route 'chat' is 131072")


def test_prompt_beyond_candidates_best_effort_uses_a_fitting_fallback():
    """When no candidate's window fits but a fallback's does, best effort plans the fallback; reject refuses."""
    route = chat_route(Sla(p95_latency_ms=6000), candidates=("small",), fallback=("large",))
    decision = Setup(route).decide(prompt_tokens=20_000, max_tokens=100)
    assert plan_names(decision) == ["large"] and not decision.sla_met
    reject = chat_route(Sla(p95_latency_ms=6000, on_violation="reject"), candidates=("small",), fallback=("large",))
    with pytest.raises(NoModelMeetsSla, match="the context window: small: context: 20100 > 8192"):
        Setup(reject).decide(prompt_tokens=20_000, max_tokens=100)


def test_a_request_that_fills_the_largest_window_exactly_is_refused_for_the_sla_not_its_length():
    """131,000 prompt tokens and max_tokens 72 fit `large`'s 131,072-token window exactly: when `large` is too slow
    the answer is 503 `sla_unmet`, not a 400 telling the client to shorten a prompt that fits."""
    setup = Setup(chat_route(Sla(p95_latency_ms=100, on_violation="reject"), candidates=("large",)))
    with pytest.raises(NoModelMeetsSla, match="large: latency"):
        setup.decide(prompt_tokens=131_000, max_tokens=72)


def test_tier_nobody_has_is_no_model_meets_sla():
    """A min_tier above every candidate, with no fallback, raises NoModelMeetsSla naming min_tier."""
    with pytest.raises(NoModelMeetsSla, match="min_tier 4"):
        Setup(chat_route(Sla(min_tier=4))).decide()


def test_plan_ends_with_fallbacks_that_fit_the_context():
    """Fallbacks follow the kept candidates even when they miss the SLA, but only if the prompt fits."""
    setup = Setup(chat_route(Sla(p95_latency_ms=1500), candidates=("small", "medium"), fallback=("medium", "large")))
    decision = setup.decide()
    assert plan_names(decision) == ["small", "medium", "large"]
    assert not candidate(decision, "medium").kept


def test_a_fallback_whose_window_the_request_fills_exactly_is_planned():
    """8092 prompt tokens and max_tokens 100 fill `small`'s 8192-token window exactly: it fits as a fallback."""
    setup = Setup(chat_route(candidates=("medium",), fallback=("small",)))
    assert plan_names(setup.decide(prompt_tokens=8092, max_tokens=100)) == ["medium", "small"]
    assert plan_names(setup.decide(prompt_tokens=8093, max_tokens=100)) == ["medium"]


def test_fallback_with_open_circuit_is_skipped():
    """A fallback whose circuit is open is left out of a plan that has a healthy model."""
    setup = Setup(chat_route(candidates=("small",), fallback=("large",)))
    setup.breakers.record_failure("large")
    assert plan_names(setup.decide()) == ["small"]


def test_open_circuit_drops_candidate_and_all_open_still_attempts():
    """An open circuit drops a model; when every circuit is open best effort still plans a request."""
    setup = Setup(chat_route(fallback=("large",)))
    setup.breakers.record_failure("small")
    decision = setup.decide()
    assert plan_names(decision) == ["medium", "large"]
    assert candidate(decision, "small").reasons == ("circuit open",)
    for name in ("medium", "large"):
        setup.breakers.record_failure(name)
    decision = setup.decide()
    assert not decision.sla_met
    assert plan_names(decision) == ["small", "medium", "large"]


def test_every_circuit_open_still_plans_the_fallbacks_that_fit():
    """With the candidate's and the fallback's circuits both open, best effort plans both (a request is still
    attempted, and the fallback is there if the candidate fails)."""
    setup = Setup(chat_route(candidates=("small",), fallback=("large",)))
    for name in ("small", "large"):
        setup.breakers.record_failure(name)
    decision = setup.decide()
    assert not decision.sla_met
    assert plan_names(decision) == ["small", "large"]


def test_load_beyond_concurrency_scales_the_prediction():
    """At max_concurrency in flight, latency is multiplied by (in_flight + 1) / max_concurrency."""
    setup = Setup(chat_route())
    for _ in range(64):
        setup.estimates.started("small")
    small = candidate(setup.decide(), "small")
    assert small.predicted_latency_ms == pytest.approx((40 + 255 * 4) * 65 / 64)
    assert small.predicted_ttft_ms == pytest.approx(40 * 65 / 64)


def test_gpu_hour_priced_model_costs_its_gpu_share():
    """A self-hosted model without token prices costs latency × GPU-hour price / 3600 / concurrency."""
    gpu = Model(name="gpu", endpoint="http://127.0.0.1:1/v1", upstream_model="gpu", max_concurrency=4,
                gpu_hour_usd=Decimal("3.60"), latency_prior=LatencyPrior(ttft_ms=100, tpot_ms=10))
    setup = Setup(chat_route(candidates=("gpu",)), extra_models={"gpu": gpu})
    cost = candidate(setup.decide(max_tokens=11), "gpu").predicted_cost_usd
    assert cost == Decimal("3.60") / 3_600_000 / 4 * 200


def test_observed_output_length_replaces_the_default():
    """Without max_tokens the route's recent median output length drives the prediction (once there are
    prior_weight answers: before, the default fills in for the missing ones)."""
    setup = Setup(chat_route())
    for _ in range(setup.estimates.prior_weight):
        setup.estimates.record_output_tokens("chat", 11)
    assert candidate(setup.decide(), "small").predicted_latency_ms == pytest.approx(40 + 10 * 4)


def test_explore_share_one_always_explores():
    """With explore_share 1.0 the chosen model is never the smallest kept one, and it is marked."""
    setup = Setup(chat_route(), explore_share=1.0)
    for _ in range(20):
        decision = setup.decide()
        assert decision.explored
        assert plan_names(decision)[0] in ("medium", "large")
        assert sorted(plan_names(decision)) == ["large", "medium", "small"]


def test_exploration_never_sends_a_request_over_its_cost_ceiling():
    """Exploring tries models dropped for being slow, never one dropped for its price: with every request
    explored, `large`, over the $0.001 ceiling, is never chosen."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, max_cost_usd=Decimal("0.001"))), explore_share=1.0)
    chosen = {plan_names(setup.decide())[0] for _ in range(40)}
    assert chosen == {"medium"}


def test_same_seed_same_choices():
    """Two routers with the same rng seed explore identically; different seeds eventually differ."""
    def choices(seed: int) -> list[str]:
        setup = Setup(chat_route(), explore_share=0.5, seed=seed)
        return [plan_names(setup.decide())[0] for _ in range(40)]
    assert choices(7) == choices(7)
    assert choices(7) != choices(8)
    assert set(choices(7)) == {"small", "medium", "large"}


def test_plan_is_truncated_to_max_attempts():
    """The plan never holds more models than routing.max_attempts."""
    decision = Setup(chat_route(fallback=("large",)), max_attempts=2).decide()
    assert plan_names(decision) == ["small", "medium"]


def test_a_best_effort_plan_is_truncated_to_max_attempts_too():
    """When no model meets the SLA, best effort still tries at most routing.max_attempts models."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, on_violation="best_effort"), fallback=("large",)),
                  max_attempts=2)
    decision = setup.decide(tighten=Tighten(max_latency_ms=10))
    assert not decision.sla_met
    assert plan_names(decision) == ["small", "medium"]


def test_unknown_model_in_route_is_a_policy_error():
    """A route naming a model the policy lacks fails at router construction."""
    with pytest.raises(PolicyError, match="unknown model 'huge'"):
        Setup(chat_route(candidates=("small", "huge")))


def test_format_decision_shows_every_candidate_and_the_plan():
    """The explain table lists each candidate with its verdict, the plan and the SLA."""
    decision = Setup(chat_route(Sla(p95_latency_ms=2000), fallback=("large",))).decide()
    text = format_decision(decision)
    assert "plan: small -> large" in text
    assert "p95_latency_ms 2000" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["small"].endswith("chosen")
    assert "dropped: latency 2120ms > 2000ms" in lines["medium"]
    assert "(in plan)" in lines["large"]


def test_a_budget_downgrade_does_not_lead_with_a_model_whose_circuit_is_open():
    """`small`'s circuit is open, so the planner serves from `medium`; a budget downgrade goes to the cheapest model
    that can be called (medium), says so, and reports its SLA verdict: leading with `small`, which the call would
    skip, named a model that never answered and said the SLA was not met."""
    setup = Setup(chat_route())
    setup.breakers.record_failure("small")
    decision = setup.decide(prompt_tokens=10, max_tokens=1)
    assert plan_names(decision) == ["medium", "large"] and decision.sla_met
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded)[0] == "medium"
    assert downgraded.sla_met and "cheapest model, medium" in downgraded.note


@pytest.mark.parametrize("header", ["x-gateway-max-latency-ms", "x-gateway-max-ttft-ms", "x-gateway-max-energy-j"])
@pytest.mark.parametrize("value", ["0", "-0", "nan", "inf", "-1"])
def test_a_time_or_energy_header_must_be_a_positive_finite_number(header, value):
    """A limit of 0, NaN (which every prediction would pass) or infinity is a 400 naming the header."""
    with pytest.raises(ClientError, match=header) as caught:
        tighten_from_headers({header: value})
    assert caught.value.param == header


def test_a_tier_header_of_zero_is_read_and_a_negative_one_refused():
    """x-gateway-min-tier 0 is a tier (it asks for nothing more than the route's), -1 is a 400."""
    assert tighten_from_headers({"x-gateway-min-tier": "0"}).min_tier == 0
    with pytest.raises(ClientError, match="x-gateway-min-tier"):
        tighten_from_headers({"x-gateway-min-tier": "-1"})


def test_a_cost_header_is_read_up_to_max_usd_and_a_word_is_refused():
    """x-gateway-max-cost-usd may be as high as a policy's limit, $1e9; a cent above it or a word is a 400."""
    assert tighten_from_headers({"x-gateway-max-cost-usd": "1000000000"}).max_cost_usd == Decimal("1E9")
    for value in ("1000000000.01", "cheap"):
        with pytest.raises(ClientError, match="x-gateway-max-cost-usd"):
            tighten_from_headers({"x-gateway-max-cost-usd": value})


@pytest.mark.parametrize("header, value", [("x-gateway-max-latency-ms", "1500"), ("x-gateway-max-ttft-ms", "90"),
                                           ("x-gateway-min-tier", "2"), ("x-gateway-max-cost-usd", "0.5"),
                                           ("x-gateway-max-energy-j", "40")])
def test_each_tighten_header_alone_tightens(header, value):
    """Any one tightening header alone makes the ask non-empty and is recorded by its field name."""
    tighten = tighten_from_headers({header: value})
    assert not tighten.empty
    field = header.removeprefix("x-gateway-").replace("-", "_")
    assert tighten.as_dict() == {field: float(value)}


def test_a_tier_header_below_the_routes_tier_does_not_lower_it():
    """x-gateway-min-tier 1 on a `min_tier: 2` route leaves the route's tier: `small` stays out."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2)))
    decision = setup.decide(tighten=tighten_from_headers({"x-gateway-min-tier": "1"}))
    assert plan_names(decision) == ["medium", "large"]
    assert candidate(decision, "small").reasons == ("tier 1 < 2",)


def test_looser_ttft_and_cost_headers_leave_the_routes_own_limits():
    """Headers asking for a later first token and a dearer request than the route allows change nothing: `large`
    stays out of a stream for its TTFT and its cost."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, p95_ttft_ms=100, max_cost_usd=Decimal("0.001"))))
    loose = tighten_from_headers({"x-gateway-max-ttft-ms": "5000", "x-gateway-max-cost-usd": "5"})
    decision = setup.decide(stream=True, tighten=loose)
    assert plan_names(decision) == ["small", "medium"]
    assert [r.split()[0] for r in candidate(decision, "large").reasons] == ["ttft", "cost"]


def test_a_header_limit_is_named_as_the_client_wrote_it():
    """A refusal for x-gateway-max-latency-ms 100 names `p95_latency_ms 100`, not `100.0`."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, on_violation="reject")))
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide(tighten=tighten_from_headers({"x-gateway-max-latency-ms": "100"}))
    assert caught.value.message.startswith("no model of route 'chat' meets p95_latency_ms 100: small: latency")


def test_a_refusal_for_ttft_names_the_ttft_limit():
    """A stream no model starts within p95_ttft_ms 30 is refused naming `p95_ttft_ms 30`."""
    setup = Setup(chat_route(Sla(p95_ttft_ms=30, on_violation="reject")))
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide(stream=True)
    assert caught.value.message.startswith("no model of route 'chat' meets p95_ttft_ms 30: small: ttft 40ms > 30ms")


def test_a_refusal_for_open_circuits_names_the_closed_circuit_it_needed():
    """A reject route whose every model's circuit is open says it needed a closed circuit."""
    setup = Setup(chat_route(Sla(on_violation="reject"), candidates=("small",)))
    setup.breakers.record_failure("small")
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide()
    assert caught.value.message == "no model of route 'chat' meets a closed circuit: small: circuit open"


def test_a_model_starting_exactly_at_the_ttft_limit_meets_it():
    """A TTFT limit is a ceiling the prediction may reach: `small`, predicted at 40 ms to its first token, meets
    p95_ttft_ms 40 on a stream."""
    setup = Setup(chat_route(Sla(p95_ttft_ms=40, on_violation="reject")))
    decision = setup.decide(stream=True)
    assert candidate(decision, "small").kept and plan_names(decision) == ["small"]


def test_best_effort_plans_a_candidate_whose_window_the_request_fills_exactly():
    """8092 prompt tokens and max_tokens 100 fill `small`'s window exactly: when no model meets the SLA, best effort
    still plans it, fastest first."""
    setup = Setup(chat_route(candidates=("small", "large")))
    decision = setup.decide(prompt_tokens=8092, max_tokens=100, tighten=Tighten(max_latency_ms=10))
    assert not decision.sla_met
    assert plan_names(decision) == ["small", "large"]


def test_a_request_with_no_output_is_predicted_at_its_wait_alone():
    """max_tokens 0 (an embeddings call) is planned for no output: `small` is predicted at its 40 ms TTFT, not at a
    guessed answer's length."""
    decision = Setup(chat_route()).decide(max_tokens=0)
    assert decision.output_tokens == 0
    assert candidate(decision, "small").predicted_latency_ms == pytest.approx(40)


def test_exploring_tries_a_model_dropped_for_its_latency_and_marks_the_sla_unmet():
    """With every request explored and only `small` meeting 2000 ms, the explored model is one dropped as slow: the
    decision says the SLA is not met and why it was tried."""
    setup = Setup(chat_route(Sla(p95_latency_ms=2000)), explore_share=1.0)
    chosen = set()
    for _ in range(20):
        decision = setup.decide()
        first = plan_names(decision)[0]
        chosen.add(first)
        assert decision.explored and not decision.sla_met
        assert decision.note.startswith(f"explored {first} instead of small to refresh its estimate (latency ")
    assert chosen == {"medium", "large"}


def test_exploring_tries_a_model_dropped_for_its_ttft():
    """A stream explores `large`, dropped only for its 200 ms first token, as well as the kept `medium`."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, p95_ttft_ms=100)), explore_share=1.0)
    chosen = {plan_names(setup.decide(stream=True))[0] for _ in range(40)}
    assert chosen == {"medium", "large"}


def test_exploring_never_chooses_a_model_whose_circuit_is_open():
    """An open circuit is no measurement to refresh: with `small`'s open, every explored request goes to `large`."""
    setup = Setup(chat_route(), explore_share=1.0)
    setup.breakers.record_failure("small")
    chosen = {plan_names(setup.decide())[0] for _ in range(40)}
    assert chosen == {"large"}


def test_fallbacks_after_a_met_sla_keep_the_tier():
    """A `min_tier: 2` route's tier-1 fallback is left out; its tier-2 fallback, exactly at the tier, follows."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2), candidates=("large",), fallback=("small", "medium")))
    decision = setup.decide()
    assert decision.sla_met
    assert plan_names(decision) == ["large", "medium"]


def test_best_effort_fallbacks_keep_the_tier():
    """When no model meets the SLA, best effort's fallbacks are still held to the route's tier."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2), candidates=("medium",), fallback=("small", "large")))
    decision = setup.decide(tighten=Tighten(max_latency_ms=10))
    assert not decision.sla_met
    assert plan_names(decision) == ["medium", "large"]


def test_every_circuit_open_plans_only_the_fallbacks_of_the_tier():
    """With every circuit open, best effort plans the candidates and fallbacks anyway, but never one under the
    route's tier."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2), candidates=("medium",), fallback=("small", "large")))
    for name in ("small", "medium", "large"):
        setup.breakers.record_failure(name)
    decision = setup.decide()
    assert not decision.sla_met
    assert plan_names(decision) == ["medium", "large"]


def test_the_retry_after_of_an_open_circuit_is_rounded_up_not_to_the_nearest_second():
    """A circuit half-open in 19.3 s asks the client back in 20 s: 19 s would send it into the open circuit."""
    setup = Setup(chat_route(sla=Sla(on_violation="reject"), candidates=("small",)))
    setup.breakers.record_failure("small")
    setup.clock.now_s += 10.7
    with pytest.raises(NoModelMeetsSla) as caught:
        setup.decide()
    assert caught.value.headers["Retry-After"] == "20"


def test_best_effort_names_only_the_terms_the_fitting_models_missed():
    """The best-effort note lists the models it may plan and the term they missed, not a lower tier's model."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2)))
    decision = setup.decide(tighten=Tighten(max_latency_ms=100))
    assert decision.note == ("SLA not met (p95_latency_ms 100: medium: latency 2120ms > 100ms; large: latency 5300ms "
                             "> 100ms); best effort by predicted latency")


def test_a_request_with_no_output_may_fill_a_window_with_its_prompt():
    """With max_tokens 0 (embeddings) the prompt alone must fit: 8192 tokens fit `small`'s window, 8193 are a 400
    that counts prompt tokens only."""
    route = chat_route(candidates=("small",))
    assert plan_names(Setup(route).decide(prompt_tokens=8192, max_tokens=0)) == ["small"]
    with pytest.raises(ClientError) as caught:
        Setup(route).router.decide(route, prompt_tokens=8193, max_tokens=0, stream=False, input_param="input")
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input")
    assert caught.value.message == ("request needs 8193 prompt tokens but the largest context window of route 'chat' "
                                    "is 8192")


def test_a_batch_needs_the_context_for_its_longest_prompt_not_all_of_them():
    """A completions batch or an embeddings list is read prompt by prompt: 20,000 tokens in all, none longer than
    5,000, fit `small`'s 8,192-token window with max_tokens 100 (and are priced at all 20,000); a longest prompt
    of 8,100 does not, and past every window the 400 names the longest prompt."""
    setup = Setup(chat_route(candidates=("small", "medium")))
    decision = setup.router.decide(setup.route, prompt_tokens=20_000, max_tokens=100, stream=False,
                                   longest_prompt_tokens=5_000, input_param="prompt")
    assert plan_names(decision) == ["small", "medium"]
    assert candidate(decision, "small").predicted_cost_usd == Decimal("0.05") * 20_000 / 10**6 \
        + Decimal("0.10") * 100 / 10**6
    decision = setup.router.decide(setup.route, prompt_tokens=20_000, max_tokens=100, stream=False,
                                   longest_prompt_tokens=8_100, input_param="prompt")
    assert plan_names(decision) == ["medium"]
    assert candidate(decision, "small").reasons == ("context: 8200 > 8192",)
    with pytest.raises(ClientError) as caught:
        setup.router.decide(setup.route, prompt_tokens=40_000, max_tokens=0, stream=False,
                            longest_prompt_tokens=32_769, input_param="input")
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input")
    assert caught.value.message == ("request needs 32769 longest prompt tokens but the largest context window of "
                                    "route 'chat' is 32768")


def test_a_budget_downgrade_leaves_a_decision_with_no_model_of_the_context_as_it_was():
    """When no candidate has the context (only a fallback served best effort), there is nothing cheaper to
    downgrade to: the decision stands."""
    setup = Setup(chat_route(candidates=("small",), fallback=("large",)))
    decision = setup.decide(prompt_tokens=20_000, max_tokens=100)
    assert setup.router.cheapest(decision) is decision


def test_a_budget_downgrade_never_leads_with_a_model_too_small_for_the_request():
    """`small`, the cheapest, lacks the context for a 9,100-token request: the downgrade goes to `medium`."""
    setup = Setup(chat_route())
    decision = setup.decide(prompt_tokens=9000, max_tokens=100)
    downgraded = setup.router.cheapest(decision)
    assert plan_names(downgraded) == ["medium", "large"]


def test_a_budget_downgrade_with_every_circuit_open_leads_with_the_cheapest():
    """With every circuit open the downgrade still plans a request, cheapest first."""
    setup = Setup(chat_route())
    for name in ("small", "medium", "large"):
        setup.breakers.record_failure(name)
    downgraded = setup.router.cheapest(setup.decide())
    assert plan_names(downgraded) == ["small", "medium", "large"]
    assert "cheapest model, small" in downgraded.note


def test_a_budget_downgrade_is_not_marked_explored_and_keeps_max_attempts():
    """A downgraded decision explored nothing, and plans at most routing.max_attempts models."""
    setup = Setup(chat_route(), explore_share=1.0, max_attempts=2)
    decision = setup.decide()
    assert decision.explored
    downgraded = setup.router.cheapest(decision)
    assert not downgraded.explored
    assert plan_names(downgraded) == ["small", "medium"]


def test_candidates_of_one_size_are_shown_cheapest_input_first():
    """The candidates a decision shows (the explain table) are ordered by size, then input price, not as listed."""
    twin = Model(name="twin", endpoint="http://127.0.0.1:1/v1", upstream_model="twin", size_b=8, tier=2,
                 price=Price(Decimal("0.20"), Decimal("0.60")), latency_prior=LatencyPrior(ttft_ms=80, tpot_ms=8))
    setup = Setup(chat_route(candidates=("large", "medium", "twin", "small")), extra_models={"twin": twin})
    decision = setup.decide()
    assert [c.model.name for c in decision.candidates] == ["small", "twin", "medium", "large"]


def test_only_a_request_that_did_not_go_to_the_smallest_kept_model_is_marked_explored():
    """With explore_share 0.5 about half the requests are explored: those led by `small` are not marked."""
    setup = Setup(chat_route(), explore_share=0.5)
    marks = set()
    for _ in range(40):
        decision = setup.decide()
        marks.add(decision.explored)
        assert decision.explored == (plan_names(decision)[0] != "small")
        assert (decision.note == "") == (not decision.explored)
    assert marks == {True, False}


def test_a_fallback_named_twice_is_planned_once():
    """A model listed twice under `fallback` is one attempt, not two calls to the same model."""
    setup = Setup(chat_route(candidates=("small",), fallback=("large", "medium", "large")))
    assert plan_names(setup.decide()) == ["small", "large", "medium"]
