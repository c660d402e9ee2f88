"""Review findings on `gateway replay`: it must price and route a replayed request as the live gateway would."""

from __future__ import annotations

import dataclasses
import json
import os
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from gateway.policy.load import load_policy
from gateway.policy.model import (
    Budget, LatencyPrior, Match, Model, Policy, Price, Route, Sla, Tenant, Timeouts,
)
from gateway.replay import ReplayRequest, compare, read_traffic, render_markdown, replay, summarize
from gateway.replay.cli import main
from tests.support.harness import Harness
from tests.support.policies import SMART_AND_EMBEDDINGS_ROUTES, models, sha256_hex, standard_model

DEMO = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"


def _model(name: str, ttft_ms: float, tpot_ms: float, price: Price) -> Model:
    return Model(name, f"http://127.0.0.1:1/{name}", name, size_b=1 if name == "small" else 70,
                 context_window=131072, max_concurrency=64, price=price,
                 latency_prior=LatencyPrior(ttft_ms, tpot_ms), timeouts=Timeouts(first_byte_s=60.0))


def _ledger_line(ts: float, **overrides) -> dict:
    """A request line as gateway/recorder.py writes it: its answered attempt names its cached input tokens."""
    attempt = {"model": "small", "status": 200, "error": None, "duration_s": 0.3, "gpu_s": None,
               "input_tokens": 1000, "cached_input_tokens": 900, "output_tokens": 10, "reasoning_tokens": 0,
               "tokens_estimated": False, "cost_usd": "0.00020"}
    line = {"ts": ts, "request_id": f"r{ts}", "tenant": None, "endpoint": "chat", "alias": "auto", "route": "r",
            "model": "small", "models_tried": ["small"], "fallback": "none", "fallback_reason": None,
            "cache": "miss", "stream": True, "status": 200, "outcome": "success", "prompt_tokens": 1000,
            "input_tokens": 1000, "output_tokens": 10, "tokens_estimated": False, "cost_usd": "0.0002",
            "saved_usd": "0", "latency_s": 0.3, "ttft_s": 0.04, "energy_j": None, "sla_met": True,
            "budget_downgrade": False, "task_id": None, "workflow": None, "attempts": [attempt]}
    return {**line, **overrides}


def test_a_ledger_replayed_against_its_own_policy_prices_cached_input_as_the_ledger_did(tmp_path: Path):
    """The ledger records each attempt's cached input tokens (provider prompt cache) so its cost can be worked
    out again; replaying it against the same policy must price them at `cached_input_per_mtok`, as the account
    stage did, not at the full input price."""
    small = _model("small", 40, 4, Price(Decimal(1), Decimal(1), cached_input_per_mtok=Decimal("0.1")))
    policy = Policy(version=1, models={"small": small},
                    routes=(Route("r", Match(models=("auto",)), candidates=("small",)),))
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(_ledger_line(100.0)) + "\n")
    outcome, = replay(policy, read_traffic(path)).outcomes
    # (1000 - 900) x 1 + 900 x 0.1 + 10 x 1 micro-USD, the cost the live gateway booked
    assert outcome.cost_usd == Decimal("0.0002")


def test_a_tenant_budget_spent_with_on_exhausted_downgrade_sends_its_requests_to_the_cheapest_model():
    """A spent budget with `on_exhausted: downgrade` re-plans the tenant's requests cheapest first live (README
    "Budgets"); the replay only leaves out budgets' 429s, so a policy whose point is a downgrade budget must not
    replay as if it had none: the third request, after 0.022 USD of a 0.015 USD day, goes to small."""
    small = _model("small", 400, 4, Price(Decimal("0.1"), Decimal("0.1")))
    large = _model("large", 50, 4, Price(Decimal(10), Decimal(10)))
    acme = Tenant("acme", budget=Budget(usd_per_day=Decimal("0.015"), on_exhausted="downgrade"))
    route = Route("r", Match(models=("auto",)), candidates=("small", "large"),
                  sla=Sla(p95_ttft_ms=100, on_violation="best_effort"))
    policy = Policy(version=1, models={"small": small, "large": large}, routes=(route,), tenants={"acme": acme})
    requests = [ReplayRequest(float(i), 1000, 100, tenant="acme") for i in range(3)]
    result = replay(policy, requests, jitter_sigma=0.0)
    assert [o.label for o in result.outcomes][:2] == ["large", "large"]
    assert result.outcomes[2].label == "small"
    assert summarize(result).cost_usd < 3 * Decimal("0.011")


def test_cost_per_answered_request_counts_the_requests_the_cache_answered(tmp_path: Path):
    """Three requests, two of them recorded cache hits: a policy that caches the route answers all three and pays
    for one, so its cost per answered request is a third of the policy that calls all three, not the same."""
    demo = load_policy(DEMO)
    hit = {"cache": "hit", "models_tried": [], "attempts": [], "route": "chat-default", "cost_usd": "0"}
    lines = [_ledger_line(100.0, route="chat-default"), _ledger_line(101.0, **hit), _ledger_line(102.0, **hit)]
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests = read_traffic(path)
    no_cache = dataclasses.replace(demo, routes=tuple(
        dataclasses.replace(r, cache=dataclasses.replace(r.cache, enabled=False)) for r in demo.routes))
    cached, called = summarize(replay(demo, requests)), summarize(replay(no_cache, requests))
    assert cached.cost_usd * 3 == called.cost_usd
    assert cached.cost_per_request_usd * 3 == called.cost_per_request_usd
    markdown = render_markdown(compare(replay(demo, requests), replay(no_cache, requests)))
    assert "| cost per answered request (USD) | 0.00005100 | 0.00001700 | -0.00003400 |" in markdown


def test_epoch_millisecond_timestamps_are_refused_not_replayed_a_thousand_times_slower(tmp_path: Path, capsys):
    """JSONL timestamps are seconds; epoch milliseconds (JavaScript's Date.now(), 1.7e12) read as seconds would
    spread one second of traffic over 17 minutes, with no queueing and every SLA met. The span check only catches
    a trace longer than 31 days, so such a trace must be refused naming the line, as seconds mixed with
    milliseconds are."""
    path = tmp_path / "traffic.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 1_700_000_000_000 + 10 * i, "input_tokens": 100,
                                        "output_tokens": 50}) + "\n" for i in range(100)))
    code = main(["--policy", str(DEMO), "--traffic", str(path), "--out", str(tmp_path / "r.md")])
    assert code == 1
    assert f"{path}:1:" in capsys.readouterr().err


def test_a_request_the_live_gateway_rate_limited_is_not_replayed_as_an_answered_call(tmp_path: Path):
    """A tenant's 429 comes after routing, so its ledger line names the first planned model (no attempt, no
    output tokens). It was refused before any model was called, and must count as "refused before routing in
    the trace", not be replayed as a call with 0 output tokens that is answered, cheap and within its SLA."""
    ledger = tmp_path / "requests.jsonl"
    policy = models(standard_model("small"), standard_model("medium"), standard_model("large")) + """
routes:
  - name: chat-default
    match: {{models: ["auto"], endpoints: [chat]}}
    candidates: [small]
""" + SMART_AND_EMBEDDINGS_ROUTES + f"""tenants:
  acme:
    keys_sha256: ["{sha256_hex('sk-acme-review-key-0001')}"]
    limits: {{{{requests_per_minute: 1}}}}
ledger: {{{{path: "{ledger}"}}}}
"""
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    environ.update(OTEL_SDK_DISABLED="true")
    gw = Harness(policy, environ=environ).start()
    try:
        client = gw.openai(api_key="sk-acme-review-key-0001", max_retries=0)
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    finally:
        gw.stop()
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [line["status"] for line in lines if line.get("type") != "outcome"] == [200, 429]
    assert [r.recorded_answer for r in read_traffic(ledger)] == ["call", "refused"]


def test_the_report_shows_a_small_cost_total_and_its_change_not_zero():
    """Three short requests cost 0.000018 USD on small and 0.000108 on medium: six times as much. The summary
    table must show both totals and their difference, not 0.0000, 0.0001 and +0.0001."""
    small = _model("small", 40, 4, Price(Decimal("0.05"), Decimal("0.10")))
    medium = _model("medium", 40, 4, Price(Decimal("0.30"), Decimal("0.60")))

    def policy(model: str) -> Policy:
        return Policy(version=1, models={"small": small, "medium": medium},
                      routes=(Route("r", Match(models=("auto",)), candidates=(model,)),))

    requests = [ReplayRequest(float(i), 100, 10) for i in range(3)]
    new, baseline = replay(policy("medium"), requests), replay(policy("small"), requests)
    assert (summarize(baseline).cost_usd, summarize(new).cost_usd) == (Decimal("0.000018"), Decimal("0.000108"))
    markdown = render_markdown(compare(new, baseline))
    assert "| cost total (USD) | 0.00001800 | 0.0001080 | +0.00009000 |" in markdown


def test_a_cached_route_on_traffic_that_records_no_cache_hits_is_said_to_be_unsimulated(tmp_path: Path, capsys):
    """Only the traffic's recorded cache hits can be answered from the cache (traffic holds no prompts), and an
    Azure CSV records none: replaying a policy that caches a route against one that does not gives the same cost,
    which reads as "caching saves nothing". The replay must say that the cache was not simulated."""
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                    "".join(f"{i},100,20\n" for i in range(5)))
    out = tmp_path / "r.md"
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "cache" in err and "chat-default" in err
    assert "chat-default" in out.read_text().split("## Summary")[0]


def test_a_policy_that_answers_requests_from_the_cache_is_not_reported_slower(tmp_path: Path):
    """Four calls of 200 output tokens and four recorded cache hits of 10: a policy that caches the route answers
    the four hits at once, so its latency percentiles cannot be above those of a policy that calls all eight.
    Leaving its cache hits out of its percentiles (but not the baseline's calls) reports caching as slower."""
    demo = load_policy(DEMO)
    hit = {"cache": "hit", "models_tried": [], "attempts": [], "output_tokens": 10}
    lines = [_ledger_line(100.0 + i, route="chat-default", output_tokens=200, attempts=[]) for i in range(4)]
    lines += [_ledger_line(110.0 + i, route="chat-default", **hit) for i in range(4)]
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests = read_traffic(path)
    no_cache = dataclasses.replace(demo, routes=tuple(
        dataclasses.replace(r, cache=dataclasses.replace(r.cache, enabled=False)) for r in demo.routes))
    cached = summarize(replay(demo, requests, jitter_sigma=0.0))
    called = summarize(replay(no_cache, requests, jitter_sigma=0.0))
    assert (cached.cache_hits, called.cache_hits) == (4, 0)
    assert cached.latency.p50_ms <= called.latency.p50_ms
    assert cached.latency.p95_ms <= called.latency.p95_ms


def test_a_call_that_failed_live_is_replayed_with_the_median_output_of_its_routes_answered_calls(tmp_path):
    """A ledger line whose call failed live (a 5xx: every model timed out, say) records no output: replayed as 0
    output tokens, the policy that would answer it would look as if it wrote nothing and cost only the prompt.
    It is replayed with the median output of its route's answered calls instead, the same under every policy
    (so two replays still compare), and the report says how many were."""
    lines = [_ledger_line(100.0, output_tokens=100), _ledger_line(101.0, output_tokens=300),
             _ledger_line(102.0, output_tokens=200),
             _ledger_line(103.0, status=502, outcome="upstream_error", output_tokens=0, cost_usd="0",
                          attempts=[{"model": "small", "status": 504, "error": "timeout", "output_tokens": 0}]),
             _ledger_line(104.0, status=499, outcome="client_disconnected", output_tokens=7)]
    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests = read_traffic(path)
    assert [r.output_tokens for r in requests] == [100, 300, 200, 200, 7]   # a client that left keeps its own
    small = _model("small", 40, 4, Price(Decimal(1), Decimal(1)))
    policy = Policy(version=1, models={"small": small}, routes=(Route("r", Match(models=("auto",)),
                                                                      candidates=("small",)),))
    summary = summarize(replay(policy, requests))
    assert summary.estimated_output == 1
    assert "| calls that failed in the trace, replayed with their route's median output | 1 |" in \
        render_markdown(summary)
