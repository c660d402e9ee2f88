"""`gateway replay`: traffic readers, the virtual-time simulation, the comparison, the report and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gateway.policy.load import load_policy
from gateway.policy.model import LatencyPrior, Match, Model, Policy, Price, Route, Sla, Timeouts
from gateway.replay import (
    ReplayRequest, TrafficError, compare, read_traffic, render_json, render_markdown, replay, summarize,
)
from gateway.replay.chart import nice_ceiling, render_chart
from gateway.replay.cli import main
from gateway.replay.outcome import Outcome, ReplayResult
from gateway.replay.summary import Minute, percentiles

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gateway" / "data" / "demo.yaml"
TRACES = Path(os.environ.get("GATEWAY_TRACES_DIR", ROOT.parent / "shared" / "traces"))
CONV = TRACES / "azure-llm-2023-conv.csv"


@pytest.fixture(scope="module")
def conv() -> Path:
    """The Azure conversational trace; tests that need it are skipped where it is absent."""
    if not CONV.exists():
        pytest.skip(f"{CONV} not present")
    return CONV


@pytest.fixture(scope="module")
def demo() -> Policy:
    return load_policy(DEMO)


def _tier2_variant(policy: Policy) -> Policy:
    """The demo with chat-default's SLA tightened to min_tier 2: small is dropped."""
    first = policy.routes[0]
    tighter = dataclasses.replace(first, sla=dataclasses.replace(first.sla, min_tier=2, p95_latency_ms=1500))
    return dataclasses.replace(policy, routes=(tighter, *policy.routes[1:]), source="tier2-variant")


def _two_models(small_concurrency: int, first_byte_s: float) -> Policy:
    """A small model (no fallback of its own) and a large fallback, with no latency SLA."""
    small = Model("small", "http://127.0.0.1:1/v1", "s", size_b=1, max_concurrency=small_concurrency,
                  price=Price(Decimal("0.05"), Decimal("0.10")), latency_prior=LatencyPrior(40, 4),
                  timeouts=Timeouts(first_byte_s=first_byte_s))
    large = Model("large", "http://127.0.0.1:2/v1", "l", size_b=70, context_window=131072,
                  price=Price(Decimal("2.5"), Decimal("10")), latency_prior=LatencyPrior(200, 20))
    route = Route("r", Match(models=("auto",)), candidates=("small",), sla=Sla(), fallback=("large",))
    return Policy(version=1, models={"small": small, "large": large}, routes=(route,))


def test_azure_reader_gives_offsets_and_token_counts(tmp_path):
    """The Azure CSV becomes arrivals relative to the first request, with context and generated tokens."""
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
    requests = read_traffic(path)
    assert [(round(r.arrival_s, 4), r.input_tokens, r.output_tokens) for r in requests] == \
        [(0.0, 374, 44), (4.3146, 396, 109)]
    assert {(r.alias, r.endpoint, r.line) for r in requests} == {("auto", "chat", 2), ("auto", "chat", 3)}


def test_ledger_reader_skips_outcome_lines_and_sorts_by_ts(tmp_path):
    """Ledger records keep tenant, alias, endpoint and route; outcome lines are skipped; arrivals sorted."""
    path = tmp_path / "ledger.jsonl"
    lines = [{"ts": 100.5, "tenant": "acme", "endpoint": "chat", "alias": "gpt-4o", "route": "chat-smart",
              "prompt_tokens": 12, "input_tokens": 14, "output_tokens": 30},
             {"type": "outcome", "ts": 101.0, "task_id": "t1", "success": True},
             {"ts": 100.0, "tenant": "beta", "endpoint": "embeddings", "alias": "text-embedding-3-small",
              "route": "embeddings", "prompt_tokens": 8, "input_tokens": 0, "output_tokens": 0}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    requests = read_traffic(path)
    assert requests == [
        ReplayRequest(0.0, 8, 0, "text-embedding-3-small", "embeddings", "beta", "embeddings", 3),
        ReplayRequest(0.5, 14, 30, "gpt-4o", "chat", "acme", "chat-smart", 1)]


def test_generic_jsonl_reader_defaults_alias_and_endpoint(tmp_path):
    """Generic JSONL takes seconds or ISO times; model is the alias, 'auto' and chat by default."""
    path = tmp_path / "traffic.jsonl"
    path.write_text('{"timestamp": "2024-01-01T00:00:10Z", "input_tokens": 5, "output_tokens": 6, "model": "smart"}\n'
                    '\n{"timestamp": "2024-01-01T00:00:00Z", "input_tokens": 1, "output_tokens": 2, "tenant": "t"}\n')
    requests = read_traffic(path)
    assert [(r.arrival_s, r.alias, r.endpoint, r.tenant) for r in requests] == \
        [(0.0, "auto", "chat", "t"), (10.0, "smart", "chat", None)]


@pytest.mark.parametrize(("name", "text", "fmt", "needle"), [
    ("bad.jsonl", '{"timestamp": 1, "input_tokens": 1, "output_tokens": 1}\n\n{oops\n', "jsonl", ":3: not valid JSON"),
    ("bad.jsonl", '{"timestamp": 1, "input_tokens": -4, "output_tokens": 1}\n', "jsonl", ":1: input_tokens"),
    ("bad.jsonl", '{"timestamp": 1, "input_tokens": 1, "output_tokens": true}\n', "jsonl", ":1: output_tokens"),
    ("bad.jsonl", '{"timestamp": 1, "output_tokens": 1}\n', "jsonl", ":1: missing key 'input_tokens'"),
    ("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,2\nyesterday,1,2\n", "azure",
     ":3: TIMESTAMP"),
    ("bad.csv", "when,in,out\n", "azure", ":1: expected the header"),
    ("bad.jsonl", '{"ts": 1, "input_tokens": 1, "output_tokens": 1, "endpoint": "images"}\n', "ledger",
     ":1: endpoint"),
])
def test_bad_line_error_names_file_and_line(tmp_path, name, text, fmt, needle):
    """A line that cannot be read is a TrafficError naming the file and the line number."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TrafficError) as caught:
        read_traffic(path, fmt)
    assert f"{path}{needle}" in str(caught.value)


def test_auto_format_detection_and_limit(tmp_path, conv):
    """auto picks azure for .csv, ledger for JSONL with 'ts', jsonl otherwise; limit keeps the first N."""
    assert len(read_traffic(conv, limit=25)) == 25
    ledger = tmp_path / "a.jsonl"
    ledger.write_text('{"ts": 3, "input_tokens": 1, "output_tokens": 1, "alias": "smart"}\n')
    generic = tmp_path / "b.jsonl"
    generic.write_text('{"timestamp": 3, "input_tokens": 1, "output_tokens": 1, "model": "smart"}\n')
    assert read_traffic(ledger)[0].alias == read_traffic(generic)[0].alias == "smart"
    with pytest.raises(TrafficError, match="missing key 'timestamp'"):
        read_traffic(ledger, "jsonl")


def test_same_seed_gives_identical_report(conv, demo):
    """Two replays with one seed render byte-identical reports; another seed draws other latencies."""
    requests = read_traffic(conv, limit=400)
    first = render_json(summarize(replay(demo, requests, seed=7)))
    assert render_json(summarize(replay(demo, requests, seed=7))) == first
    assert render_json(summarize(replay(demo, requests, seed=8))) != first


def test_first_100_requests_cost_checks_by_hand(conv, demo):
    """On the first 100 conv requests the total cost equals tokens x the chosen models' prices."""
    requests = read_traffic(conv, limit=100)
    result = replay(demo, requests, seed=1)
    summary = summarize(result)
    by_hand = sum((o.input_tokens * demo.models[o.model].price.input_per_mtok
                   + o.output_tokens * demo.models[o.model].price.output_per_mtok) / 1_000_000
                  for o in result.outcomes)
    assert summary.cost_usd == by_hand
    assert summary.per_model == dict(Counter(o.model for o in result.outcomes)) == {"small": 100}
    with CONV.open() as stream:
        rows = list(csv.DictReader(stream))[:100]
    context = sum(int(r["ContextTokens"]) for r in rows)
    generated = sum(int(r["GeneratedTokens"]) for r in rows)
    assert summary.cost_usd == (context * Decimal("0.05") + generated * Decimal("0.10")) / 1_000_000
    assert summary.tokens == context + generated


def test_tighter_sla_variant_moves_requests_up_and_costs_more(conv, demo):
    """min_tier 2 drops small: every request changes model, and NEW - BASELINE cost is positive."""
    requests = read_traffic(conv, limit=200)
    baseline, new = replay(demo, requests, seed=3), replay(_tier2_variant(demo), requests, seed=3)
    comparison = compare(new, baseline)
    assert comparison.changed == 200 == sum(comparison.transitions.values())
    assert comparison.transitions["small -> medium"] > 0
    assert comparison.cost_delta_usd > 0
    assert compare(baseline, new).cost_delta_usd == -comparison.cost_delta_usd
    assert compare(baseline, baseline).changed == 0
    markdown = render_markdown(comparison)
    assert "**200** of 200 requests" in markdown and "| small -> medium |" in markdown


def test_queued_attempt_times_out_and_falls_back():
    """A request stuck behind a one-slot model past first_byte_s falls back to the large model; energy is priced."""
    policy = _two_models(small_concurrency=1, first_byte_s=0.3)
    requests = [ReplayRequest(0.0, 10, 100) for _ in range(3)]
    result = replay(policy, requests, seed=0, jitter_sigma=0.0, power_w={"small": 640.0})
    first, second, third = result.outcomes
    assert (first.model, first.models_tried, first.latency_s) == ("small", ("small",), pytest.approx(0.436))
    assert first.energy_j == pytest.approx(0.436 * 640.0)
    assert second.models_tried == third.models_tried == ("small", "large")
    assert second.latency_s == pytest.approx(0.3 + 0.2 + 99 * 0.02)
    assert second.ttft_s == pytest.approx(0.5)
    summary = summarize(result)
    assert (summary.fallbacks, summary.per_model) == (2, {"large": 2, "small": 1})
    assert summary.energy_j is None     # large has no power assumption, so the total is n/a


def test_unroutable_and_oversized_requests_are_rejected(demo):
    """An alias no route takes and a prompt beyond every context window are counted as rejected."""
    requests = [ReplayRequest(0.0, 10, 10, alias="nope"), ReplayRequest(1.0, 200_000, 10),
                ReplayRequest(2.0, 10, 10)]
    summary = summarize(replay(demo, requests))
    assert (summary.served, summary.rejected) == (1, {"context": 1, "no_route": 1})
    assert [r.requests for r in summary.sla if r.route == "chat-default"] == [2]


def test_cli_end_to_end_writes_markdown_json_and_svg(tmp_path, conv, capsys):
    """The CLI replays a 200-request slice against two policies and writes all three reports."""
    variant = tmp_path / "variant.yaml"
    variant.write_text(DEMO.read_text().replace("min_tier: 1", "min_tier: 2"))
    out, out_json, chart = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.svg"
    status = main(["--policy", str(variant), "--baseline", str(DEMO), "--traffic", str(conv), "--limit", "200",
                   "--seed", "5", "--out", str(out), "--json", str(out_json), "--chart", str(chart)])
    assert status == 0, capsys.readouterr().err
    document = json.loads(out_json.read_text())
    assert document["policies"]["new"]["requests"] == document["policies"]["baseline"]["requests"] == 200
    assert document["comparison"]["requests_model_changed"] == 200
    assert Decimal(document["comparison"]["deltas"]["cost total (USD)"]) > 0
    markdown = out.read_text()
    assert "## SLA attainment per route" in markdown and "![cost and p95 latency per minute](r.svg)" in markdown
    svg = ElementTree.parse(chart).getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) >= 4


def test_cli_rejects_speed_and_reports_bad_traffic(tmp_path, capsys):
    """--speed is refused as not supported yet; a bad traffic line exits 1 naming file and line."""
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": 0, "input_tokens": 1, "output_tokens": 1}\n[1]\n')
    assert main(["--policy", str(DEMO), "--traffic", str(bad), "--speed", "2"]) == 2
    assert "not supported yet" in capsys.readouterr().err
    assert main(["--policy", str(DEMO), "--traffic", str(bad)]) == 1
    assert f"{bad}:2: expected a JSON object" in capsys.readouterr().err


def test_sped_up_keeps_the_window_and_divides_arrivals_by_the_speed():
    """The requests of the first window × speed trace seconds, at arrival ÷ speed; later ones are left out."""
    from gateway.replay.traffic import sped_up

    requests = [ReplayRequest(at_s, 10, 5) for at_s in (0.0, 4.0, 8.0, 8.5)]
    assert [(at_s, r.arrival_s) for at_s, r in sped_up(requests, window_s=2.0, speed=4.0)] == [
        (0.0, 0.0), (1.0, 4.0), (2.0, 8.0)]


def test_max_energy_j_holds_in_replay_once_a_model_is_measured():
    """Replay teaches the router each answer's predicted joules, as a live measurement does: once `small` is
    known to use more than the route's max_energy_j, the next request goes to `large`."""
    policy = _two_models(small_concurrency=1, first_byte_s=5)
    route = dataclasses.replace(policy.routes[0], candidates=("small", "large"), fallback=(),
                                sla=Sla(max_energy_j=100))
    policy = dataclasses.replace(policy, routes=(route,))
    requests = [ReplayRequest(0.0, 10, 100), ReplayRequest(5.0, 10, 100)]
    first, second = replay(policy, requests, seed=0, jitter_sigma=0.0, power_w={"small": 640.0}).outcomes
    assert first.model == "small" and first.energy_j == pytest.approx(0.436 * 640.0)    # 279 J: above 100
    assert second.model == "large"


def test_predicted_energy_is_shared_by_the_model_s_concurrent_slots():
    """--power-w charges a request WATTS x its service time / max_concurrency, as the README says: on a model
    with 4 slots, a 0.436 s answer at 640 W is 69.76 J, not 279 J."""
    policy = _two_models(small_concurrency=4, first_byte_s=5)
    outcome, = replay(policy, [ReplayRequest(0.0, 10, 100)], seed=0, jitter_sigma=0.0,
                      power_w={"small": 640.0}).outcomes
    assert outcome.energy_j == pytest.approx(0.436 * 640.0 / 4)


def test_rejected_requests_leave_the_predicted_energy_known():
    """A rejected request called no model, so it takes nothing from the energy total: with every model called
    given a power, the total is the answers' energy, not n/a."""
    requests = [ReplayRequest(0.0, 10, 100), ReplayRequest(1.0, 10, 100, alias="nope")]
    summary = summarize(replay(_two_models(small_concurrency=1, first_byte_s=5), requests, seed=0,
                               jitter_sigma=0.0, power_w={"small": 640.0}))
    assert summary.rejected == {"no_route": 1}
    assert summary.energy_j == summary.energy_per_request_j == pytest.approx(0.436 * 640.0)


def test_rejected_requests_are_not_counted_as_best_effort_decisions():
    """A best-effort decision is a routed request whose plan meets no SLA: a request refused before any plan
    (no route takes its alias) is a rejection, not a best-effort decision."""
    requests = [ReplayRequest(0.0, 10, 100), ReplayRequest(1.0, 10, 100, alias="nope")]
    summary = summarize(replay(_two_models(small_concurrency=1, first_byte_s=5), requests, seed=0))
    assert (summary.served, summary.rejected, summary.best_effort) == (1, {"no_route": 1}, 0)


def _queued_policy(queue_timeout_ms: float, fallback: tuple[str, ...] = ()) -> Policy:
    """`_two_models` with one slot on small, gateway call slots on, and tenants of priority 0, 1 and 9."""
    from gateway.policy.model import Routing, Tenant

    policy = _two_models(small_concurrency=1, first_byte_s=5)
    route = dataclasses.replace(policy.routes[0], fallback=fallback)
    tenants = {name: Tenant(name, priority=priority) for name, priority in (("batch", 0), ("normal", 1), ("urgent", 9))}
    small = dataclasses.replace(policy.models["small"], gpu_hour_usd=Decimal(3600))      # 1 USD a second held
    return dataclasses.replace(policy, models={**policy.models, "small": small}, routes=(route,), tenants=tenants,
                               routing=Routing(queue_timeout_ms=queue_timeout_ms))


def test_a_replayed_call_that_waited_for_a_slot_is_charged_from_its_slot():
    """Two identical requests on small's one slot: the second waits for it (the gateway's wait, not the model's
    time), so both are charged the same GPU time (1 USD a second held) though the second took longer."""
    requests = [ReplayRequest(0.0, 10, 100, tenant="normal"), ReplayRequest(0.0, 10, 100, tenant="normal")]
    first, second = replay(_queued_policy(10_000), requests, seed=0, jitter_sigma=0.0).outcomes
    assert (first.model, second.model) == ("small", "small")
    assert first.queue_s == 0 and second.queue_s > 0.1
    assert second.latency_s == pytest.approx(first.latency_s + second.queue_s)
    assert second.cost_usd == first.cost_usd


def test_replay_serves_gateway_slot_waiters_by_tenant_priority():
    """As live: with routing.queue_timeout_ms, waiters for small's one slot are served highest priority first."""
    requests = [ReplayRequest(0.0, 10, 10, tenant="normal"), ReplayRequest(0.01, 10, 10, tenant="batch"),
                ReplayRequest(0.02, 10, 10, tenant="batch"), ReplayRequest(0.03, 10, 10, tenant="urgent")]
    outcomes = replay(_queued_policy(10_000), requests, seed=0, jitter_sigma=0.0).outcomes
    assert all(o.model == "small" for o in outcomes)
    ends = [o.arrival_s + o.latency_s for o in outcomes]
    assert sorted(range(4), key=ends.__getitem__) == [0, 3, 1, 2]        # the urgent one right after the first
    fifo = replay(dataclasses.replace(_queued_policy(10_000), routing=dataclasses.replace(
        _queued_policy(10_000).routing, queue_timeout_ms=0)), requests, seed=0, jitter_sigma=0.0).outcomes
    fifo_ends = [o.arrival_s + o.latency_s for o in fifo]
    assert sorted(range(4), key=fifo_ends.__getitem__) == [0, 1, 2, 3]   # without gateway slots: the server's line


def test_replay_gateway_slot_timeout_falls_back_uncharged_and_fails_as_queue_timeout():
    requests = [ReplayRequest(0.0, 10, 100, tenant="normal"), ReplayRequest(0.01, 10, 100, tenant="urgent")]
    first, second = replay(_queued_policy(100, fallback=("large",)), requests, seed=0, jitter_sigma=0.0).outcomes
    assert first.model == "small"
    assert second.models_tried == ("small", "large") and second.model == "large"
    assert second.queue_s == pytest.approx(0.1)
    large_cost = Decimal("2.5") * 10 / 1_000_000 + Decimal("10") * 100 / 1_000_000
    assert second.cost_usd == large_cost     # the wait for small's slot cost nothing
    lone = replay(_queued_policy(100), requests, seed=0, jitter_sigma=0.0).outcomes[1]
    assert (lone.status, lone.reason, lone.cost_usd) == ("failed", "queue_timeout", Decimal(0))


def test_a_request_whose_last_attempt_timed_out_fails_as_a_timeout_whatever_failed_before():
    """The failure reason is the last attempt's: a request that got no slot on small in time (queue_timeout),
    then timed out on large, fails as `timeout`."""
    policy = _queued_policy(100, fallback=("large",))
    large = dataclasses.replace(policy.models["large"], timeouts=Timeouts(first_byte_s=0.1))
    policy = dataclasses.replace(policy, models={**policy.models, "large": large})
    requests = [ReplayRequest(0.0, 10, 100, tenant="normal"), ReplayRequest(0.01, 10, 100, tenant="normal")]
    first, second = replay(policy, requests, seed=0, jitter_sigma=0.0).outcomes
    assert first.model == "small"
    assert (second.label, second.models_tried) == ("failed:timeout", ("small", "large"))


def test_replay_asks_the_circuit_when_the_slot_comes_as_live():
    """A call that waited for small's slot while small's circuit opened goes to the fallback, not to small."""
    from gateway.policy.model import Breaker

    policy = _queued_policy(10_000, fallback=("large",))
    policy = dataclasses.replace(policy, models={**policy.models, "small": dataclasses.replace(
        policy.models["small"], timeouts=Timeouts(total_s=0.3))},
        routing=dataclasses.replace(policy.routing, breaker=Breaker(failure_threshold=1)))
    # the first whole answer needs 0.436 s on small: it is cut at total_s, 0.3 s, and small's circuit opens
    requests = [ReplayRequest(0.0, 10, 100, tenant="normal", stream=False),
                ReplayRequest(0.1, 10, 100, tenant="normal", stream=False)]
    first, second = replay(policy, requests, seed=0, jitter_sigma=0.0).outcomes
    assert first.models_tried == ("small", "large") and first.model == "large"
    assert second.models_tried == ("small", "large") and second.model == "large"
    assert second.queue_s == pytest.approx(0.2)            # it waited for the slot until the first gave it up
    assert second.cost_usd == Decimal("2.5") * 10 / 1_000_000 + Decimal("10") * 100 / 1_000_000


def test_the_summary_counts_what_its_report_says():
    """Nearest-rank percentiles (1 to 100 ms: p50 50, p95 95, p99 99); cost per answered request divides the
    cost by the answered requests (2 answered, 1 failed, 3 USD: 1.5); a fallback is a request answered after
    another model failed (a failed request that tried two models is counted as failed, not as a fallback)."""
    ranks = percentiles([i / 1000 for i in range(1, 101)])
    assert (ranks.p50_ms, ranks.p95_ms, ranks.p99_ms) == pytest.approx((50.0, 95.0, 99.0))
    answered = Outcome(0, 0.0, 10, 10, route="r", model="small", models_tried=("small",), latency_s=0.5,
                       cost_usd=Decimal("1"))
    fell_back = Outcome(1, 1.0, 10, 10, route="r", model="large", models_tried=("small", "large"), latency_s=0.5,
                        cost_usd=Decimal("1"))
    failed = Outcome(2, 2.0, 10, 10, route="r", status="failed", reason="timeout", models_tried=("small", "large"),
                     cost_usd=Decimal("1"))
    summary = summarize(ReplayResult(_two_models(1, 5), 0, [answered, fell_back, failed]))
    assert (summary.served, summary.failed, summary.cost_usd) == (2, {"timeout": 1}, Decimal("3"))
    assert summary.cost_per_request_usd == Decimal("1.5")
    assert summary.fallbacks == 1


def test_the_per_minute_cost_is_every_request_s_and_its_latency_the_answered_ones():
    """The chart's minutes: cost of every request arriving in the minute (a failed one's attempts included),
    p95 latency of the answered ones, and a minute with no arrivals shown empty."""
    answered = Outcome(0, 0.0, 10, 10, route="r", model="small", models_tried=("small",), latency_s=0.5,
                       cost_usd=Decimal("1"))
    failed = Outcome(1, 30.0, 10, 10, route="r", status="failed", reason="timeout", models_tried=("small",),
                     cost_usd=Decimal("2"))
    later = Outcome(2, 150.0, 10, 10, route="r", model="small", models_tried=("small",), latency_s=0.25,
                    cost_usd=Decimal("4"))
    summary = summarize(ReplayResult(_two_models(1, 5), 0, [answered, failed, later]))
    assert summary.per_minute == (Minute(0, 2, Decimal("3"), 500.0), Minute(1, 0, Decimal(0), None),
                                  Minute(2, 1, Decimal("4"), 250.0))


def _with_latency_sla(p95_latency_ms: float, source: str) -> Policy:
    """`_two_models` with a latency limit on its route."""
    policy = _two_models(small_concurrency=1, first_byte_s=5)
    route = dataclasses.replace(policy.routes[0], sla=Sla(p95_latency_ms=p95_latency_ms))
    return dataclasses.replace(policy, routes=(route,), source=source)


def test_the_sla_table_gives_new_minus_baseline_attainment():
    """Per route, the last column is NEW's attainment minus BASELINE's: a 0.436 s answer misses a 100 ms limit
    and meets a 1,000 ms one, so a looser NEW gains 100 points."""
    requests = [ReplayRequest(0.0, 10, 100)]
    baseline = replay(_with_latency_sla(100, "strict"), requests, jitter_sigma=0.0)
    new = replay(_with_latency_sla(1000, "loose"), requests, jitter_sigma=0.0)
    assert "| r | latency ≤ 100 ms | latency ≤ 1000 ms | 0 / 1 (0.0%) | 1 / 1 (100.0%) | +100.0 pp |" in \
        render_markdown(compare(new, baseline))


def test_a_comparison_with_no_changed_request_shows_no_empty_tables():
    """When every request is answered by the same model under both policies, the report says so in one line and
    draws no empty transition or sample table."""
    result = replay(_two_models(small_concurrency=1, first_byte_s=5), [ReplayRequest(0.0, 10, 100)])
    changes = render_markdown(compare(result, result)).split("## Requests whose model changed")[1]
    assert changes.strip() == "**0** of 1 requests are answered by a different model (or rejected differently) " \
                              "under NEW."


@pytest.mark.parametrize(("value", "ceiling"), [(0.0, 1.0), (0.7, 1.0), (1.5, 2.0), (2.2, 2.5), (2.5, 2.5),
                                                 (3.0, 5.0), (7.0, 10.0), (120.0, 200.0)])
def test_the_chart_axis_ends_at_the_next_1_2_2_5_or_5_step(value, ceiling):
    """A panel's y axis runs to the smallest 1, 2, 2.5 or 5 × 10^k at or above its highest value."""
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_the_latency_line_breaks_at_a_minute_with_no_answer():
    """A minute with no answered request has no p95 latency: the chart's latency line stops there and starts
    again, while the cost line (0 USD that minute) runs through."""
    first = Outcome(0, 0.0, 10, 10, route="r", model="small", models_tried=("small",), latency_s=0.5,
                    cost_usd=Decimal("1"))
    third = Outcome(1, 150.0, 10, 10, route="r", model="small", models_tried=("small",), latency_s=0.25,
                    cost_usd=Decimal("4"))
    svg = ElementTree.fromstring(render_chart(summarize(ReplayResult(_two_models(1, 5), 0, [first, third]))))
    lines = [line.get("points").split() for line in svg.findall("{http://www.w3.org/2000/svg}polyline")]
    assert [len(points) for points in lines] == [3, 1, 1]


def test_the_model_changes_are_listed_most_frequent_first():
    """The transitions table starts with the change most requests made, whatever request showed it first."""
    def answered(index: int, model: str) -> Outcome:
        return Outcome(index, float(index), 10, 10, route="r", model=model, models_tried=(model,), latency_s=0.5)

    rejected = [Outcome(i, float(i), 10, 10, status="rejected", reason="no_route") for i in (1, 2)]
    policy = _two_models(1, 5)
    comparison = compare(ReplayResult(policy, 0, [answered(0, "large"), *rejected]),
                         ReplayResult(policy, 0, [answered(i, "small") for i in range(3)]))
    assert list(comparison.transitions.items()) == [("small -> rejected:no_route", 2), ("small -> large", 1)]
