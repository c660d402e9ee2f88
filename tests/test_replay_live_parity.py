"""`gateway replay` routes, refuses and prices as the live gateway would: streams, cache hits, refusals,
tenants, failed attempts, queueing and what the router learns."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.policy.load import load_policy
from gateway.policy.model import (
    Breaker, LatencyPrior, Match, Model, Policy, Price, Route, Routing, Sla, Tenant, Timeouts,
)
from gateway.replay import ReplayRequest, compare, read_traffic, render_markdown, replay, summarize
from gateway.replay.simulate import Simulation

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gateway" / "data" / "demo.yaml"
FREE = Price(Decimal(0), Decimal(0))
GPU_DOLLAR_PER_S = Decimal(3600)        # gpu_hour_usd that makes one GPU-second cost 1 USD


def _model(name: str, ttft_ms: float, tpot_ms: float, *, concurrency: int = 64, first_byte_s: float = 60.0,
           price: Price = Price(Decimal("0.05"), Decimal("0.10")), gpu_hour_usd: Decimal | None = None) -> Model:
    return Model(name, f"http://127.0.0.1:1/{name}", name, size_b=1 if name == "small" else 70,
                 context_window=131072, max_concurrency=concurrency, price=price, gpu_hour_usd=gpu_hour_usd,
                 latency_prior=LatencyPrior(ttft_ms, tpot_ms), timeouts=Timeouts(first_byte_s=first_byte_s))


def _policy(small: Model, large: Model, sla: Sla = Sla(), **extra) -> Policy:
    """One route: small first, large as its fallback."""
    route = Route("r", Match(models=("auto",)), candidates=("small",), sla=sla, fallback=("large",))
    return Policy(version=1, models={"small": small, "large": large}, routes=(route,), **extra)


def _ledger_line(ts: float, **overrides) -> dict:
    """A request line as gateway/recorder.py writes it."""
    line = {"ts": ts, "request_id": f"r{ts}", "tenant": None, "endpoint": "chat", "alias": "auto",
            "route": "chat-default", "model": "small", "models_tried": ["small"], "fallback": "none",
            "fallback_reason": None, "cache": "miss", "stream": True, "status": 200, "prompt_tokens": 100,
            "input_tokens": 100, "output_tokens": 50, "tokens_estimated": False, "cost_usd": "0.00001",
            "saved_usd": "0", "latency_s": 0.3, "ttft_s": 0.04, "energy_j": None, "sla_met": True,
            "task_id": None, "workflow": None, "attempts": []}
    return {**line, **overrides}


def _write_ledger(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_non_streamed_requests_are_planned_and_judged_without_ttft_limits(tmp_path):
    """A ledger line with `stream: false` is not refused by a TTFT limit the planner applies to streams only."""
    path = _write_ledger(tmp_path / "ledger.jsonl", [_ledger_line(100.0, stream=False), _ledger_line(101.0)])
    requests = read_traffic(path)
    assert [r.stream for r in requests] == [False, True]
    policy = _policy(_model("small", 40, 4), _model("large", 200, 20), Sla(p95_ttft_ms=10, on_violation="reject"))
    whole, stream = replay(policy, requests).outcomes
    assert (whole.label, whole.sla_ok) == ("small", True)
    assert stream.label == "rejected:sla"


def test_embeddings_are_never_planned_against_a_ttft_limit():
    """An embedding line (stream true by default) gets no streamed answer, so, as live, a route's TTFT limit does
    not reject it."""
    policy = _policy(_model("small", 40, 4), _model("large", 200, 20), Sla(p95_ttft_ms=10, on_violation="reject"))
    outcome, = replay(policy, [ReplayRequest(0.0, 500, 0, endpoint="embeddings")]).outcomes
    assert (outcome.label, outcome.ttft_s) == ("small", None)


def test_the_output_tokens_are_planned_as_max_tokens_against_the_context_window():
    """A request is planned with its output tokens as max_tokens, as the README says: a prompt that fits small's
    context window but leaves no room for the answer is rejected for context, not sent to small."""
    small = dataclasses.replace(_model("small", 40, 4), context_window=1000)
    route = Route("r", Match(models=("auto",)), candidates=("small",))
    policy = Policy(version=1, models={"small": small}, routes=(route,))
    fits, too_long = replay(policy, [ReplayRequest(0.0, 900, 100), ReplayRequest(1.0, 900, 101)]).outcomes
    assert (fits.label, too_long.label) == ("small", "rejected:context")


def test_a_latency_exactly_at_the_route_s_limit_meets_its_sla():
    """The SLA's p95_latency_ms is a limit to stay within: an answer taking exactly 500 ms on a 500 ms route
    counts as met."""
    policy = _policy(_model("small", 500, 0), _model("large", 200, 20), Sla(p95_latency_ms=500))
    result = replay(policy, [ReplayRequest(0.0, 10, 1)], jitter_sigma=0.0)
    assert [(o.latency_s, o.sla_ok) for o in result.outcomes] == [(0.5, True)]
    assert [(r.route, r.met) for r in summarize(result).sla] == [("r", 1)]


def test_stream_flag_of_generic_jsonl_and_azure_defaults(tmp_path):
    """Generic JSONL takes an optional `stream` (true by default); Azure CSV rows are streams."""
    generic = tmp_path / "t.jsonl"
    generic.write_text('{"timestamp": 0, "input_tokens": 1, "output_tokens": 1, "stream": false}\n'
                       '{"timestamp": 1, "input_tokens": 1, "output_tokens": 1}\n')
    azure = tmp_path / "t.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,2\n")
    assert [r.stream for r in read_traffic(generic)] == [False, True]
    assert [r.stream for r in read_traffic(azure)] == [True]


def _timed(model: Model, **timeouts: float) -> Model:
    """The model with some of its timeouts changed."""
    return dataclasses.replace(model, timeouts=dataclasses.replace(model.timeouts, **timeouts))


def test_a_whole_answer_is_waited_for_up_to_total_s():
    """A whole answer (0.836 s) longer than first_byte_s is waited for up to total_s, as live, and falls back only
    past total_s."""
    small = _model("small", 40, 4, first_byte_s=0.5)
    requests = [ReplayRequest(0.0, 10, 200, stream=True), ReplayRequest(0.0, 10, 200, stream=False)]
    stream, whole = replay(_policy(small, _model("large", 200, 20)), requests, jitter_sigma=0.0).outcomes
    assert stream.models_tried == whole.models_tried == ("small",)
    assert whole.latency_s == pytest.approx(0.836)
    cut = _policy(_timed(small, total_s=0.7), _model("large", 200, 20))
    whole_cut, = replay(cut, requests[1:], jitter_sigma=0.0).outcomes
    assert (whole_cut.models_tried, whole_cut.model) == (("small", "large"), "large")
    assert whole_cut.latency_s == pytest.approx(0.7 + 0.2 + 199 * 0.02)


def test_a_first_token_due_exactly_at_first_byte_s_is_in_time():
    """An attempt times out only when its first token would come after first_byte_s: one due at exactly 0.1 s
    on a 0.1 s limit is answered by its model, not failed over."""
    policy = _policy(_model("small", 100, 4, first_byte_s=0.1), _model("large", 200, 20))
    outcome, = replay(policy, [ReplayRequest(0.0, 10, 10)], jitter_sigma=0.0).outcomes
    assert (outcome.models_tried, outcome.ttft_s) == (("small",), pytest.approx(0.1))


def test_a_stream_cut_at_total_s_after_its_first_token_fails_and_pays_for_what_it_sent():
    """A stream that has sent tokens cannot fall back: cut at total_s (1.002 s: 241 of 1,000 tokens sent), it
    fails as a timeout on its one model and is charged for the tokens it sent."""
    small = _timed(_model("small", 40, 4), total_s=1.002)
    outcome, = replay(_policy(small, _model("large", 200, 20)), [ReplayRequest(0.0, 10, 1000)],
                      jitter_sigma=0.0).outcomes
    assert (outcome.label, outcome.models_tried) == ("failed:timeout", ("small",))
    assert outcome.cost_usd == (10 * Decimal("0.05") + 241 * Decimal("0.10")) / 1_000_000


def test_a_whole_answer_queued_on_the_model_waits_up_to_total_s():
    """A whole answer queued on a full model server is waited for up to total_s, not first_byte_s, as live."""
    policy = _policy(_model("small", 40, 4, concurrency=1, first_byte_s=0.3), _model("large", 200, 20))
    requests = [ReplayRequest(0.0, 10, 100, stream=False), ReplayRequest(0.0, 10, 100, stream=False)]
    first, second = replay(policy, requests, jitter_sigma=0.0).outcomes
    assert first.models_tried == second.models_tried == ("small",)
    assert second.queue_s == pytest.approx(0.436)
    assert second.latency_s == pytest.approx(0.872)


def test_timeouts_before_the_first_token_teach_the_router_their_wait():
    """Every dispatched attempt cut before its first token (queued on the model server past first_byte_s, or a
    whole answer past total_s) is learned as a TTFT sample of its wait, as the account stage does live."""
    small = _model("small", 40, 4, concurrency=1, first_byte_s=0.2)
    queued = Simulation(_policy(small, _model("large", 200, 20)),
                        [ReplayRequest(0.0, 10, 100), ReplayRequest(0.0, 10, 100)], seed=0, jitter_sigma=0.0)
    assert [o.models_tried for o in queued.run().outcomes] == [("small",), ("small", "large")]
    assert queued.estimates.sample_count("small") == 2        # the answer's TTFT and the cut wait
    late = Simulation(_policy(_timed(small, first_byte_s=60.0, total_s=0.3), _model("large", 200, 20)),
                      [ReplayRequest(0.0, 10, 100, stream=False)], seed=0, jitter_sigma=0.0)
    assert [o.models_tried for o in late.run().outcomes] == [("small", "large")]
    assert late.estimates.sample_count("small") == 1


def test_recorded_cache_hits_are_called_when_the_route_cache_is_off(tmp_path):
    """A ledger's cache hit is free only when the replayed policy caches its route; with the cache off it is
    called and priced like any other request."""
    hit = {"cache": "hit", "models_tried": [], "cost_usd": "0", "saved_usd": "0.00001"}
    requests = read_traffic(_write_ledger(tmp_path / "ledger.jsonl",
                                          [_ledger_line(100.0 + i, **hit) for i in range(3)]))
    demo = load_policy(DEMO)
    assert summarize(replay(demo, requests)).cache_hits == 3
    no_cache = dataclasses.replace(demo, routes=tuple(
        dataclasses.replace(r, cache=dataclasses.replace(r.cache, enabled=False)) for r in demo.routes))
    result = replay(no_cache, requests)
    summary = summarize(result)
    assert (summary.cache_hits, summary.served) == (0, 3)
    small = demo.models["small"].price
    assert [o.label for o in result.outcomes] == ["small"] * 3
    assert summary.cost_usd == 3 * (100 * small.input_per_mtok + 50 * small.output_per_mtok) / 1_000_000


def test_the_report_shows_cache_hits_when_one_policy_of_two_has_them(tmp_path):
    """The cache-hit row, left out when no policy has any, is shown when only one of the two has some: NEW
    caches the route and answers 3 hits free, BASELINE calls them."""
    hit = {"cache": "hit", "models_tried": [], "cost_usd": "0", "saved_usd": "0.00001"}
    requests = read_traffic(_write_ledger(tmp_path / "ledger.jsonl",
                                          [_ledger_line(100.0 + i, **hit) for i in range(3)]))
    demo = load_policy(DEMO)
    no_cache = dataclasses.replace(demo, routes=tuple(
        dataclasses.replace(r, cache=dataclasses.replace(r.cache, enabled=False)) for r in demo.routes))
    markdown = render_markdown(compare(replay(demo, requests), replay(no_cache, requests)))
    assert "| cache hits in the trace, answered at no cost | 0 | 3 | +3 |" in markdown


def test_recorded_cache_hits_and_refusals_are_not_paid_calls(tmp_path):
    """Cache hits in a ledger are answered at no cost and refused lines (4xx, no model) are not replayed."""
    hit = {"cache": "hit", "models_tried": [], "cost_usd": "0", "saved_usd": "0.00001"}
    lines = [_ledger_line(100.0), _ledger_line(101.0, **hit), _ledger_line(102.0, **hit),
             _ledger_line(103.0, status=401, route=None, model=None, models_tried=[], input_tokens=0,
                          output_tokens=0, cost_usd="0", sla_met=None)]
    requests = read_traffic(_write_ledger(tmp_path / "ledger.jsonl", lines))
    assert [r.recorded_answer for r in requests] == ["call", "cache_hit", "cache_hit", "refused"]
    demo = load_policy(DEMO)
    result = replay(demo, requests)
    summary = summarize(result)
    assert (summary.requests, summary.served, summary.cache_hits, summary.refused_in_trace) == (3, 1, 2, 1)
    small = demo.models["small"].price
    assert summary.cost_usd == (100 * small.input_per_mtok + 50 * small.output_per_mtok) / 1_000_000
    assert [o.label for o in result.outcomes] == ["small", "cache hit", "cache hit"]
    markdown = render_markdown(summary)
    assert "| cache hits in the trace, answered at no cost | 2 |" in markdown
    assert "| refused before routing in the trace, not replayed | 1 |" in markdown


def test_only_client_errors_before_any_model_count_as_refused_in_the_trace(tmp_path):
    """A 4xx with no model is a refusal, left out; a 5xx with no model, or a 4xx after a model was chosen (an
    upstream's own 400), reached the routing stage live, so it is replayed as a call."""
    lines = [_ledger_line(100.0, status=500, model=None, models_tried=[]),
             _ledger_line(101.0, status=400, model="small"),
             _ledger_line(102.0, status=499, route=None, model=None, models_tried=[])]
    requests = read_traffic(_write_ledger(tmp_path / "ledger.jsonl", lines))
    assert [r.recorded_answer for r in requests] == ["call", "call", "refused"]
    summary = summarize(replay(load_policy(DEMO), requests))
    assert (summary.requests, summary.served, summary.refused_in_trace) == (2, 2, 1)


def test_tenants_are_identified_and_their_allow_lists_enforced():
    """With tenants in the policy, unknown or missing tenants are refused (401) and allow lists forbid (403)."""
    tenants = {"acme": Tenant("acme", routes=("other",)), "beta": Tenant("beta", models=("smart",)),
               "gamma": Tenant("gamma", routes=("r",), models=("auto",))}
    policy = _policy(_model("small", 40, 4), _model("large", 200, 20), tenants=tenants)
    requests = [ReplayRequest(float(i), 10, 10, tenant=name) for i, name in
                enumerate(("acme", "beta", "gamma", None, "ghost"))]
    result = replay(policy, requests)
    assert [o.label for o in result.outcomes] == [
        "rejected:forbidden", "rejected:forbidden", "small", "rejected:unknown_tenant", "rejected:unknown_tenant"]
    assert summarize(result).rejected == {"forbidden": 2, "unknown_tenant": 2}


def test_an_open_gateway_ignores_the_traffic_tenant():
    """With no tenants in the policy every live caller is anonymous, so a route limited to a tenant never matches."""
    base = _policy(_model("small", 40, 4), _model("large", 200, 20))
    only_acme = Route("only-acme", Match(models=("auto",), tenants=("acme",)), candidates=("large",))
    policy = dataclasses.replace(base, routes=(only_acme, *base.routes))
    outcome, = replay(policy, [ReplayRequest(0.0, 10, 10, tenant="acme")]).outcomes
    assert (outcome.route, outcome.model) == ("r", "small")


def test_every_attempt_pays_its_gpu_time_failed_ones_included():
    """Every attempt that reached a model pays its GPU time, as in the account stage; failed requests count too."""
    small = _model("small", 40, 4, concurrency=1, first_byte_s=0.1, price=FREE, gpu_hour_usd=GPU_DOLLAR_PER_S)
    large = _model("large", 50, 20, concurrency=1, first_byte_s=0.1, price=FREE, gpu_hour_usd=GPU_DOLLAR_PER_S)
    requests = [ReplayRequest(0.0, 10, 250), ReplayRequest(0.0, 10, 5), ReplayRequest(0.0, 10, 5)]
    result = replay(_policy(small, large), requests, jitter_sigma=0.0)
    first, fell_back, failed = result.outcomes
    assert float(first.cost_usd) == pytest.approx(0.04 + 249 * 0.004)          # small, 1.036 s
    assert fell_back.models_tried == ("small", "large")
    assert float(fell_back.cost_usd) == pytest.approx(0.1 + 0.05 + 4 * 0.02)    # 0.1 s queued on small, then large
    assert (failed.label, failed.models_tried) == ("failed:timeout", ("small", "large"))
    assert float(failed.cost_usd) == pytest.approx(0.1 + 0.1)                   # queued on each until first_byte_s
    summary = summarize(result)
    assert summary.cost_usd == first.cost_usd + fell_back.cost_usd + failed.cost_usd


def test_a_fallback_whose_circuit_opened_meanwhile_is_skipped_after_a_failed_attempt():
    """As the live call stage: once an attempt has failed, a planned fallback whose circuit opened since the plan
    was made is skipped (it is no last hope), and the request fails having tried only its first model."""
    base = _policy(_model("small", 2000, 4, first_byte_s=1.0), _model("large", 500, 20, first_byte_s=0.2),
                   routing=Routing(breaker=Breaker(failure_threshold=1)))
    only_large = Route("big", Match(models=("big",)), candidates=("large",))
    policy = dataclasses.replace(base, routes=(*base.routes, only_large))
    # the first request is planned small then large; the second times out on large at 0.3 s, opening its circuit
    waiting, opener = replay(policy, [ReplayRequest(0.0, 10, 10), ReplayRequest(0.1, 10, 10, alias="big")],
                             jitter_sigma=0.0).outcomes
    assert (opener.label, opener.models_tried) == ("failed:timeout", ("large",))
    assert (waiting.label, waiting.models_tried) == ("failed:timeout", ("small",))


def test_waiting_until_the_queue_deadline_counts_as_queued():
    """A request that waits in a full queue until first_byte_s, then falls back, counts as queued, with its wait."""
    policy = _policy(_model("small", 40, 4, concurrency=1, first_byte_s=0.1), _model("large", 200, 20))
    result = replay(policy, [ReplayRequest(0.0, 10, 100) for _ in range(3)], jitter_sigma=0.0)
    assert [o.queue_s for o in result.outcomes] == [0.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert [o.models_tried for o in result.outcomes[1:]] == [("small", "large")] * 2
    assert summarize(result).queued == 2


def test_a_wait_in_a_full_model_queue_past_first_byte_s_counts_against_the_circuit():
    """A request cut while queued on a full model counts as a failure of that model, as a late first byte does
    live: with failure_threshold 1 small's circuit opens, and the next request is planned on large alone."""
    policy = _policy(_model("small", 40, 4, concurrency=1, first_byte_s=0.1), _model("large", 200, 20),
                     routing=Routing(breaker=Breaker(failure_threshold=1)))
    requests = [ReplayRequest(0.0, 10, 100), ReplayRequest(0.0, 10, 100), ReplayRequest(0.2, 10, 100)]
    running, cut, later = replay(policy, requests, jitter_sigma=0.0).outcomes
    assert (running.models_tried, cut.models_tried) == (("small",), ("small", "large"))
    assert later.models_tried == ("large",)


def test_embeddings_teach_the_router_their_whole_time():
    """As the account stage, an embedding answer's whole time (queueing on the model included) is learned as a
    TTFT sample; chat answers are learned too."""
    requests = [ReplayRequest(float(i), 500, 0, alias="text-embedding-3-small", endpoint="embeddings")
                for i in range(20)]
    simulation = Simulation(load_policy(DEMO), requests, seed=0)
    assert [o.label for o in simulation.run().outcomes] == ["small"] * 20
    assert simulation.estimates.sample_count("small") == 20
    chat = Simulation(load_policy(DEMO), [ReplayRequest(0.0, 500, 10)], seed=0)
    chat.run()
    assert chat.estimates.sample_count("small") == 1


def test_a_whole_answer_teaches_the_router_as_live_without_the_split_it_hides():
    """A non-streamed answer shows its whole time only: as the account stage does live, the part the estimates
    make larger (here the 99 tokens' generation) takes the rest of the time and the other (TTFT) is not learned;
    the replay used to learn the simulated model's true TTFT and time per token, which live never sees. A
    streamed answer's TTFT is learned, as live measures it."""
    small = _model("small", 40, 4)
    whole = Simulation(_policy(small, _model("large", 200, 20)), [ReplayRequest(0.0, 10, 100, stream=False)],
                       seed=0, jitter_sigma=0.0)
    assert [o.models_tried for o in whole.run().outcomes] == [("small",)]
    assert whole.estimates.sample_count("small") == 0
    streamed = Simulation(_policy(small, _model("large", 200, 20)), [ReplayRequest(0.0, 10, 100)], seed=0,
                          jitter_sigma=0.0)
    streamed.run()
    assert streamed.estimates.sample_count("small") == 1
