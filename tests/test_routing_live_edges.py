"""Routing from live measurements at its edges: size ties, reloads that move a model, and what answers teach."""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import Decimal

import pytest

from gateway.explain import explain
from gateway.fleet import Fleet
from gateway.policy.load import parse_policy
from gateway.policy.model import Breaker, LatencyPrior, Match, Model, Policy, Price, Route, Routing, Sla
from gateway.routing import Breakers, LatencyEstimates, Router
from gateway.runtime import Runtime
from tests.support import policies
from tests.support.fakes import FakeClock
from tests.support.harness import Harness


def api_model(name: str, input_usd: str, output_usd: str, size_b: float = 8, **fields) -> Model:
    """An 8B model priced per token, with a 40 ms TTFT and 4 ms per token prior."""
    return Model(name=name, endpoint=f"http://127.0.0.1:1/{name}/v1", upstream_model=name, size_b=size_b,
                 price=Price(Decimal(input_usd), Decimal(output_usd)),
                 latency_prior=LatencyPrior(ttft_ms=40, tpot_ms=4), **fields)


def router_over(*models: Model, sla: Sla | None = None) -> tuple[Router, Route]:
    """A router over one route whose candidates are `models`, in that order."""
    route = Route(name="chat", match=Match(models=("auto",)), candidates=tuple(m.name for m in models),
                  sla=sla or Sla(p95_latency_ms=6000))
    policy = Policy(version=1, models={m.name: m for m in models}, routes=(route,),
                    routing=Routing(latency_window_s=60, prior_weight=5))
    clock = FakeClock()
    router = Router(policy, LatencyEstimates.from_policy(policy, clock=clock),
                    Breakers(policy.routing.breaker, clock), random.Random(1))
    return router, route


# --- ties in size -------------------------------------------------------------------------------

def test_equal_size_tie_goes_to_the_cheaper_answer_not_the_cheaper_input():
    """Of two models the same size, the one whose predicted cost for this request is lower is chosen, output price included."""
    dear_output = api_model("dear-output", "0.10", "4.00")
    cheap_output = api_model("cheap-output", "0.15", "0.20")
    router, route = router_over(dear_output, cheap_output)
    decision = router.decide(route, prompt_tokens=100, max_tokens=500, stream=False)
    costs = {c.model.name: c.predicted_cost_usd for c in decision.candidates}
    assert costs["cheap-output"] < costs["dear-output"]
    assert [m.name for m in decision.plan] == ["cheap-output", "dear-output"]


def test_equal_size_tie_counts_the_gpu_share_of_a_self_hosted_model():
    """A self-hosted model with no token price but a dear GPU hour loses a size tie to a cheaper API model."""
    self_hosted = api_model("self-hosted", "0", "0", gpu_hour_usd=Decimal("40"), max_concurrency=1)
    api = api_model("api", "0.10", "0.20")
    router, route = router_over(self_hosted, api)
    decision = router.decide(route, prompt_tokens=100, max_tokens=200, stream=False)
    costs = {c.model.name: c.predicted_cost_usd for c in decision.candidates}
    assert costs["api"] < costs["self-hosted"]
    assert decision.plan[0].name == "api"


def test_a_smaller_model_still_wins_over_a_cheaper_larger_one():
    """Size decides before price: the cost tie-break never puts a larger model ahead of a smaller one."""
    small_dear = api_model("small-dear", "5.00", "15.00", size_b=1)
    large_cheap = api_model("large-cheap", "0.01", "0.01", size_b=70)
    router, route = router_over(large_cheap, small_dear)
    decision = router.decide(route, prompt_tokens=100, max_tokens=100, stream=False)
    assert [m.name for m in decision.plan] == ["small-dear", "large-cheap"]


# --- embeddings ---------------------------------------------------------------------------------

EMBEDDINGS_POLICY = """version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", size_b: 1, latency_prior: {ttft_ms: 40, tpot_ms: 4}}
  large: {endpoint: "http://127.0.0.1:1/v1", size_b: 70, latency_prior: {ttft_ms: 60, tpot_ms: 1}}
routes:
  - name: r
    candidates: [small, large]
    sla: {p95_latency_ms: 100}
    default_output_tokens: 256
"""


def test_an_embeddings_request_is_predicted_at_its_wait_alone():
    """Embeddings write no tokens: the live routing path predicts `small` at its 40 ms wait and keeps it under a
    100 ms SLA, where the route's 256-token chat answers (1,060 ms) would have dropped it."""
    policy = parse_policy(EMBEDDINGS_POLICY)
    decision, _ = explain(Runtime.build(policy, {}), Fleet(policy, rng=random.Random(1)), endpoint="embeddings",
                          body={"model": "auto", "input": "hello"}, headers={}, tenant_name=None)
    small = next(c for c in decision.candidates if c.model.name == "small")
    assert small.predicted_latency_ms == pytest.approx(40)
    assert decision.sla_met and [m.name for m in decision.plan] == ["small", "large"]


# --- reloads ------------------------------------------------------------------------------------

def fleet_policy(small: Model) -> Policy:
    """A policy over `small` and an 8B model, with a 500 ms p95 SLA."""
    medium = api_model("medium", "1.00", "2.00")
    route = Route(name="chat", match=Match(models=("auto",)), candidates=("small", "medium"),
                  sla=Sla(p95_latency_ms=500))
    return Policy(version=1, models={"small": small, "medium": medium}, routes=(route,),
                  routing=Routing(latency_window_s=300, prior_weight=5, breaker=Breaker()))


def plan_after_reload(changes: dict) -> tuple[str, int]:
    """(first planned model, small's samples) after small measured slow and a reload changed `changes` on it."""
    small = api_model("small", "0.05", "0.10", size_b=1)
    before = fleet_policy(small)
    fleet = Fleet(before, clock=FakeClock(), rng=random.Random(1))
    for _ in range(3):
        fleet.record_latency(fleet.models["small"], 2.0, 0.01)
    route = before.routes[0]
    assert fleet.router(before).decide(route, prompt_tokens=10, max_tokens=10, stream=False).plan[0].name == "medium"
    after = replace(fleet_policy(replace(small, **changes)), content_sha256="after")
    fleet.adopt(after)
    decision = fleet.router(after).decide(after.routes[0], prompt_tokens=10, max_tokens=10, stream=False)
    return decision.plan[0].name, fleet.estimates.sample_count("small")


@pytest.mark.parametrize("changes", [{"endpoint": "http://127.0.0.1:2/new-server/v1"},
                                     {"upstream_model": "llama-3.2-1b-instruct-v2"}],
                         ids=["endpoint", "upstream_model"])
def test_reload_that_moves_a_model_starts_its_estimates_from_the_prior(changes):
    """A reload that points a model at another server or upstream model forgets the samples the old one gave."""
    assert plan_after_reload(changes) == ("small", 0)


def test_reload_that_leaves_a_model_be_keeps_its_samples():
    """A reload that changes only a model's price keeps its measured samples, so it stays predicted slow."""
    assert plan_after_reload({"price": Price(Decimal("0.06"), Decimal("0.10"))}) == ("medium", 3)


# --- end to end: what live answers teach the router ----------------------------------------------

SIMS = {"small": dict(ttft_ms=5, tpot_ms=1), "medium": dict(ttft_ms=5, tpot_ms=1),
        "spare": dict(ttft_ms=5, tpot_ms=1)}


def e2e_policy(small_sim: str = "small", first_byte_s: float = 2, sla_ms: int = 1000,
               small_tpot_ms: float = 1, total_s: float = 10) -> str:
    """small (1B, served by simulator `small_sim`) and medium (8B) under a p95 latency SLA; window 60 s."""
    return policies.models(
        policies.model("small", small_sim, size_b=1, price=policies.price(0.1, 0.2),
                       latency_prior=policies.latency(5, small_tpot_ms),
                       timeouts=policies.short_timeouts(first_byte_s, total_s)),
        policies.model("medium", size_b=8, price=policies.price(1, 2), latency_prior=policies.latency(5, 1),
                       timeouts=policies.short_timeouts()),
    ) + """
routing: {{latency_window_s: 60, prior_weight: 5, explore_share: 0, breaker: {{failure_threshold: 5, open_s: 30}}}}
routes:
  - name: sla
    match: {{models: [auto]}}
    candidates: [small, medium]
    sla: {{p95_latency_ms: %d}}
    fallback: [medium]
    default_output_tokens: 100
""" % sla_ms


@pytest.fixture
def gw():
    harness = Harness(e2e_policy(), SIMS).start()
    try:
        yield harness
    finally:
        harness.stop()


def chat(gw, **kwargs):
    """One chat call through the openai SDK; returns the raw response."""
    return gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hello"}], **kwargs)


def served_by(gw, **kwargs) -> str:
    """The model the gateway says answered one chat call."""
    return chat(gw, **kwargs).headers["x-gateway-model"]


async def reload(holder) -> bool:
    """holder.reload() on the gateway's own loop."""
    return holder.reload()


def test_pointing_a_slow_model_at_a_healthy_server_wins_its_traffic_back(gw):
    """After small measured slow, a reload that moves it to a fast server sends it traffic at once, not after the window."""
    gw.sim_config("small", ttft_ms=1500)
    assert [served_by(gw, max_tokens=5) for _ in range(3)][-1] == "medium"
    gw.write_policy(e2e_policy(small_sim="spare"))
    assert gw.call(reload(gw.holder)) is True
    assert served_by(gw, max_tokens=5) == "small"
    assert gw.sim_stats("spare")["total"] == 1


def test_a_fast_failure_does_not_make_a_model_look_fast(gw):
    """Answers that fail in milliseconds (500s) add no latency sample to the failing model; the fallback that answered does."""
    gw.sim_config("small", error_rate=1.0, ttft_ms=1)
    states = [chat(gw, max_tokens=5).headers["x-gateway-fallback"] for _ in range(3)]
    estimates = gw.services.fleet.estimates
    assert states == ["fallback"] * 3
    assert (estimates.sample_count("small"), estimates.sample_count("medium")) == (0, 3)


def test_short_whole_answers_do_not_inflate_the_time_per_token(gw):
    """A model with a 300 ms first token answering short non-streamed requests still serves a 100-token one it answers in 0.4 s."""
    gw.sim_config("small", ttft_ms=300, tpot_ms=1)
    assert [served_by(gw, max_tokens=2) for _ in range(8)] == ["small"] * 8
    assert gw.services.fleet.estimates.tpot_p50_s("small") < 0.1      # not the first token's wait spread over two
    assert served_by(gw, max_tokens=100) == "small"


def test_calls_that_time_out_teach_the_router_the_model_is_slow():
    """A model whose calls intermittently pass its timeout stops being chosen after a few such calls."""
    hangs_at_times = {**SIMS, "small": dict(ttft_ms=5, tpot_ms=1, hang_rate=0.3)}
    harness = Harness(e2e_policy(first_byte_s=0.3, sla_ms=200, total_s=0.3), hangs_at_times).start()
    try:
        states = [chat(harness, max_tokens=5).headers["x-gateway-fallback"] for _ in range(30)]
    finally:
        harness.stop()
    timed_out = sum(state != "none" for state in states)
    assert timed_out >= 1, "the simulator's seeded hangs are part of the scenario"
    assert all(state == "none" for state in states[-10:]), states


def test_capped_answers_do_not_set_the_expected_length_of_uncapped_ones():
    """One-token classification calls do not make the router expect one-token answers for requests that set no max_tokens."""
    harness = Harness(e2e_policy(first_byte_s=5, small_tpot_ms=20),
                      {**SIMS, "small": dict(ttft_ms=5, tpot_ms=20), "medium": dict(ttft_ms=5, tpot_ms=1)}).start()
    try:
        uncapped = chat(harness).headers         # 5 + 99 × 20 ms predicted: over the 1 s SLA
        assert (uncapped["x-gateway-model"], uncapped["x-gateway-fallback"]) == ("medium", "none")
        assert [served_by(harness, max_tokens=1) for _ in range(10)] == ["small"] * 10
        assert served_by(harness) == "medium"
    finally:
        harness.stop()


def test_embeddings_answers_teach_the_router_their_latency():
    """An embeddings call has no output tokens: its whole time is learned as the model's wait, so a model that
    turns out slower than its prior loses an embeddings route's traffic, as it would a chat route's."""
    harness = Harness(e2e_policy(sla_ms=150), {**SIMS, "small": dict(ttft_ms=400, tpot_ms=0)}).start()
    try:
        served = [harness.openai().embeddings.with_raw_response.create(model="auto", input="hello").headers[
            "x-gateway-model"] for _ in range(4)]
    finally:
        harness.stop()
    assert served[0] == "small" and served[-1] == "medium", served


def test_admin_models_counts_the_time_per_token_samples_a_whole_answer_teaches(gw):
    """Non-streamed answers often teach only the time per token (their TTFT is hidden): /admin/models' counts
    say so (`latency_samples` alone, the TTFT count, read 0 while the estimates moved)."""
    from gateway.admin import model_status
    for _ in range(3):
        served_by(gw, max_tokens=50)
    status = model_status(gw.services.fleet, gw.holder.current.policy.models["small"])
    assert status["tpot_samples"] >= 3 and status["ttft_samples"] == status["latency_samples"]
    assert status["tpot_samples"] > status["ttft_samples"]
