"""deploy/ as a platform team runs it: many gateway pods behind one dashboard, an autoscaled Deployment, the
Compose simulators serving what the policy promises."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.context import Decision
from gateway.errors import UpstreamError
from gateway.outcomes import Task
from gateway.policy.load import load_policy
from gateway.simulator.cli import build_parser, configs_from_args
from gateway.telemetry import Telemetry, TelemetryConfig
from tests.test_deploy import (COMPOSE_DIR, COMPOSE_FILE, DASHBOARDS, DCGM_FIXTURE, ROUTE, SMALL, by_kind, manifests,
                               panels, record_cache_hit, record_fallback_request, request_context)

#: the policy-declared gauges: every replica exports the same value, so a dashboard counts each one once
DECLARED_GAUGES = frozenset({"gateway_model_max_concurrency", "gateway_budget_limit_USD", "target_info"})
#: panel targets that are per replica by design: each pod has its own max_concurrency call slots
PER_REPLICA_TARGETS = frozenset({("operator.json", "Saturation per model: in-flight share of max_concurrency, "
                                                   "and throttled attempts", "A")})
#: Grafana's built-in intervals as the replica check evaluates them (a point every 2 minutes)
INTERVALS = {"$__rate_interval": "10m", "$__interval": "2m", "$__range": "1h"}
STEP_MIN = 2
HISTORY_MIN = 15 * 24 * 60          # the week-over-week panels read 14 days back
#: gateway_in_flight of the one-replica layout (the two-replica layout has half on each pod)
IN_FLIGHT = 4.0


# ---------------------------------------------------------------- Kubernetes


def test_autoscaled_deployment_leaves_the_replica_count_to_the_autoscaler():
    """The Deployment an HPA scales sets no spec.replicas, so `kubectl apply -k` after a policy edit keeps the
    autoscaled pod count instead of resetting it."""
    deployment = by_kind("Deployment")
    targets = [doc["spec"]["scaleTargetRef"]["name"] for doc in manifests()
               if doc["kind"] == "HorizontalPodAutoscaler"]
    assert deployment["metadata"]["name"] in targets
    assert "replicas" not in deployment["spec"]


# ---------------------------------------------------------------- Compose


def test_compose_simulators_accept_the_context_window_the_policy_routes_by():
    """Each Compose simulator takes prompts as long as its policy model's context_window, so a long prompt the
    router sends to the medium or large model is served rather than refused as too long."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    too_small = {}
    for name, model in load_policy(COMPOSE_DIR / "policy" / "policy.yaml").models.items():
        command = services[urlsplit(model.endpoint).hostname]["command"]
        assert command[0] == "simulate-backend"
        [simulator] = configs_from_args(build_parser().parse_args(command[1:]))
        if simulator.context_window < model.context_window:
            too_small[name] = (simulator.context_window, model.context_window)
    assert too_small == {}


# ---------------------------------------------------------------- dashboards over several replicas


def record_failed_request(telemetry: Telemetry) -> None:
    """A request every model failed: an error outcome for the error-rate panel."""
    ctx = request_context(decision=Decision(route=ROUTE, plan=(SMALL,), sla_met=True))
    telemetry.start_request(ctx, {})
    ctx.status, ctx.error = 502, UpstreamError("every model failed")
    telemetry.finish_request(ctx)


def gateway_samples() -> list[tuple[str, str, dict[str, str], float]]:
    """(series name, family type, labels, value) of every sample the gateway's /metrics serves after a few
    requests: the series a dashboard really queries."""
    telemetry = Telemetry(TelemetryConfig(prometheus=True))
    try:
        policy = load_policy(Path(__file__).parent / "policies" / "full.yaml")    # budgets, max_concurrency
        telemetry.observe_policy(lambda: policy)
        record_fallback_request(telemetry)
        record_cache_hit(telemetry)
        record_failed_request(telemetry)
        telemetry.record_outcome(Task(route="chat-default", tenant="acme", workflow="support",
                                      cost_usd=Decimal("0.002"), requests=2, outcome="success"))
        text = telemetry.prometheus_text().decode()
    finally:
        telemetry.shutdown(timeout_s=2)
    return [(sample.name, family.type, {k: v for k, v in sample.labels.items() if v}, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def series_line(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    """One `input_series` entry of a promtool test: the series in PromQL notation and its values."""
    selector = ",".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{selector}}}", "values": values}


def replica_series() -> list[dict[str, str]]:
    """The same traffic twice: job `one` is one gateway pod, job `two` is two pods sharing it (counters and
    in-flight split between them, the policy's gauges exported by each); plus the DCGM exporter's series."""
    points = HISTORY_MIN // STEP_MIN
    series = []
    for name, kind, labels, value in gateway_samples():
        if name in DECLARED_GAUGES:
            layouts = {"one": [value], "two": [value, value]}
        elif name == "gateway_in_flight":
            layouts = {"one": [IN_FLIGHT], "two": [IN_FLIGHT / 2, IN_FLIGHT / 2]}
        else:
            assert kind in ("counter", "histogram"), f"{name}: a {kind} the replica check does not lay out"
            layouts = {"one": [value], "two": [value / 2, value / 2]}
        for job, per_pod in layouts.items():
            for pod, amount in enumerate(per_pod):
                grows = kind != "gauge"
                values = f"0+{amount}x{points}" if grows else f"{amount}x{points}"
                series.append(series_line(name, {**labels, "job": job, "instance": f"pod-{pod}"}, values))
    dcgm = "\n".join(line for line in DCGM_FIXTURE.read_text().splitlines() if not line.startswith("#"))
    for family in text_string_to_metric_families(dcgm):
        for sample in family.samples:
            series.append(series_line(sample.name, {**sample.labels, "job": "dcgm"},
                                      f"{sample.value}+{sample.value}x{points}"))
    return series


def dashboard_targets() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, PromQL with `$job` left in and every other variable filled in)."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v.get("allValue") if v.get("includeAll") else v["current"]["value"]
                     for v in dashboard["templating"]["list"] if v["name"] != "job"}
        for panel in panels(dashboard):
            for target in panel["targets"]:
                expr = target["expr"]
                for name, duration in INTERVALS.items():
                    expr = expr.replace(name, duration)
                for name in sorted(variables, key=len, reverse=True):
                    expr = expr.replace("${%s}" % name, variables[name]).replace("$" + name, variables[name])
                found.append((path.name, panel["title"], target["refId"], expr))
    return found


def replica_checks(expr: str) -> list[tuple[str, float]]:
    """(PromQL, expected value) that hold when `expr` answers the same for one pod as for two."""
    one, two = (f"({expr.replace('$job', job).replace('${job}', job)})" for job in ("one", "two"))
    return [
        (f"count({one}) > bool 0", 1),                           # the data reaches this panel at all
        (f"(count({one}) or vector(0)) - (count({two} - {one}) or vector(0))", 0),   # same series ...
        (f"(count({two}) or vector(0)) - (count({two} - {one}) or vector(0))", 0),
        (f"count(abs({two} - {one}) > 1e-9 * (abs({one}) + 1)) or vector(0)", 0),   # ... and same values
    ]


def promtool_test(path: Path, series: list, checks: list[dict]) -> None:
    """Have promtool evaluate `checks` (promql_expr_test entries) over `series` at STEP_MIN-minute steps, from a
    test file written to `path`; fail with its report when any check differs."""
    spec = {"evaluation_interval": f"{STEP_MIN}m",
            "tests": [{"interval": f"{STEP_MIN}m", "input_series": series, "promql_expr_test": checks}]}
    path.write_text(yaml.safe_dump(spec, width=1 << 16))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboards_answer_the_same_for_one_pod_or_two(tmp_path):
    """Every dashboard query gives the same answer whether one gateway pod or two share the traffic: the
    policy's per-tenant budgets are counted once, not once per pod (Prometheus evaluates each query)."""
    checks = []
    for board, title, ref_id, expr in dashboard_targets():
        if (board, title, ref_id) in PER_REPLICA_TARGETS:
            continue
        checks += [{"expr": check, "eval_time": f"{HISTORY_MIN}m", "exp_samples": [{"labels": "{}", "value": value}]}
                   for check, value in replica_checks(expr)]
    assert len(checks) > 4 * 40
    promtool_test(tmp_path / "replicas.test.yaml", replica_series(), checks)


# ---------------------------------------------------------------- dashboards compute what their titles say

#: the day a known traffic doubles: the week-over-week panels compare 7 days at one rate with 7 at twice it
DOUBLED_AT_MIN = 8 * 24 * 60
#: the labels every per-request series of the known traffic carries (one tenant, route and model, one pod)
REQUEST_LABELS = {"gateway_tenant": "acme", "gateway_route": "chat-default", "gateway_model_selected": "small"}
GPU_LABELS = {"gpu": "0", "Hostname": "gpu-node"}


def counter(per_step: float, *, doubles: bool = False) -> str:
    """A counter growing by `per_step` every step (twice that from DOUBLED_AT_MIN on, where `doubles`)."""
    points = HISTORY_MIN // STEP_MIN
    if not doubles:
        return f"0+{per_step}x{points}"
    knee = DOUBLED_AT_MIN // STEP_MIN
    return f"0+{per_step}x{knee} {per_step * knee + 2 * per_step}+{2 * per_step}x{points - knee - 1}"


def buckets(name: str, labels: dict[str, str], cumulative: dict[str, float]) -> list[dict[str, str]]:
    """A histogram's `_bucket` series: `cumulative` maps each `le` to the observations at or under it per step."""
    return [series_line(f"{name}_bucket", {**labels, "le": le}, counter(count)) for le, count in cumulative.items()]


def known_traffic() -> list[dict[str, str]]:
    """One pod's series (job `gateway`) with round numbers per 2-minute step, so each panel's answer is known:
    10 requests costing $0.05 (half both before day 8), 2,500 tokens, $0.01 saved by the cache, 200 J of
    attributed energy while the GPU drew 600 J, 2 successful tasks and 1 failed one costing $0.06 together."""
    pod = {"job": "gateway", "instance": "pod-0"}
    who = {**REQUEST_LABELS, **pod}
    task = {"gateway_tenant": "acme", "gateway_route": "chat-default", "gateway_workflow": "support", **pod}
    points = HISTORY_MIN // STEP_MIN
    series = [
        series_line("gateway_requests_total", who, counter(5, doubles=True)),
        series_line("gateway_cost_USD_total", who, counter(0.025, doubles=True)),
        series_line("gateway_cache_saved_USD_total", who, counter(0.01)),
        series_line("gateway_energy_joules_total", who, counter(200)),
        series_line("gen_ai_client_token_usage_sum", {**who, "gen_ai_token_type": "input"}, counter(1000)),
        series_line("gen_ai_client_token_usage_sum", {**who, "gen_ai_token_type": "output"}, counter(1500)),
        series_line("gateway_task_cost_USD_total", {**task, "gateway_task_outcome": "success"}, counter(0.04)),
        series_line("gateway_task_cost_USD_total", {**task, "gateway_task_outcome": "failure"}, counter(0.02)),
        series_line("gateway_task_outcomes_total", {**task, "gateway_task_outcome": "success"}, counter(2)),
        series_line("gateway_task_outcomes_total", {**task, "gateway_task_outcome": "failure"}, counter(1)),
        series_line("gateway_budget_limit_USD", {"gateway_tenant": "acme", "gateway_budget_period": "day", **pod},
                    f"100x{points}"),
        series_line("gateway_budget_limit_USD", {"gateway_tenant": "acme", "gateway_budget_period": "month", **pod},
                    f"1000x{points}"),
        series_line("gateway_in_flight", {"gateway_model_selected": "small", **pod}, f"3x{points}"),
        series_line("gateway_model_max_concurrency", {"gateway_model_selected": "small", **pod}, f"12x{points}"),
        series_line("gen_ai_client_operation_duration_seconds_count", {**who, "error_type": "timeout"}, counter(2)),
        series_line("gateway_fallbacks_total", {**who, "gateway_fallback_reason": "timeout"}, counter(1)),
        series_line("gateway_telemetry_dropped_total",
                    {"gateway_telemetry_signal": "spans", "gateway_telemetry_reason": "queue_full", **pod}, counter(1)),
        series_line("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", {**GPU_LABELS, "job": "dcgm"}, counter(600_000)),  # mJ
        series_line("DCGM_FI_DEV_POWER_USAGE", {**GPU_LABELS, "job": "dcgm"}, f"250x{points}"),
        series_line("DCGM_FI_DEV_GPU_UTIL", {**GPU_LABELS, "job": "dcgm"}, f"40x{points}"),
    ]
    for name, label, counts in (("gateway_cache_lookups_total", "gateway_cache_status", {"hit": 3, "miss": 6,
                                                                                          "stored": 1}),
                                ("gateway_sla_total", "gateway_sla_status", {"met": 9, "missed": 1}),
                                ("gateway_outcomes_total", "gateway_outcome", {"success": 7, "cache_hit": 2,
                                                                                "upstream_error": 1})):
        series += [series_line(name, {**who, label: value}, counter(count)) for value, count in counts.items()]
    series += buckets("gen_ai_client_operation_duration_seconds", who, {"0.1": 50, "0.5": 90, "1": 100, "+Inf": 100})
    series += buckets("gen_ai_client_operation_time_to_first_chunk_seconds", who,
                      {"0.05": 50, "0.1": 90, "0.5": 100, "+Inf": 100})
    series += buckets("gateway_routing_duration_seconds", {"gateway_tenant": "acme", "gateway_route": "chat-default",
                                                           **pod}, {"0.001": 90, "0.005": 100, "+Inf": 100})
    queue = {"gateway_tenant": "acme", "gateway_model_selected": "small", **pod}
    series += buckets("gateway_queue_wait_seconds", {**queue, "gateway_queue_result": "granted"},
                      {"0.01": 50, "0.05": 100, "0.25": 100, "+Inf": 100})
    series += buckets("gateway_queue_wait_seconds", {**queue, "gateway_queue_result": "timeout"},
                      {"0.01": 0, "0.05": 0, "0.25": 10, "+Inf": 10})
    return series


STEP_S = STEP_MIN * 60
BY_MODEL, BY_ROUTE = '{gateway_model_selected="small"}', '{gateway_route="chat-default"}'
#: (dashboard, panel title start, refId) -> {result labels: value} over the known traffic, evaluated on day 15
KNOWN_ANSWERS = {
    ("executive.json", "Cost per request", "A"): {"{}": 0.005},
    ("executive.json", "Cost per 1k tokens", "A"): {"{}": 0.02},                     # $0.05 / 2.5k tokens
    ("executive.json", "Cost per successful task", "A"): {"{}": 0.03},               # $0.06 / 2 successes
    ("executive.json", "Cost per successful task by workflow", "A"): {'{gateway_workflow="support"}': 0.03},
    ("executive.json", "Cache savings", "A"): {"{}": 0.3},                            # $0.01 x 30 steps
    ("executive.json", "Cache savings per hour", "A"): {BY_ROUTE: 0.3},
    ("executive.json", "GPU idle-to-active energy", "A"): {"{}": 2.0},               # (600 J - 200 J) / 200 J
    ("executive.json", "GPU idle-to-active energy ratio", "A"): {"{}": 2.0},
    ("executive.json", "Energy per request", "A"): {"{}": 20.0},
    ("executive.json", "Energy per request by model", "A"): {BY_MODEL: 20.0},
    ("executive.json", "Spend by tenant", "A"): {'{gateway_tenant="acme"}': 36.0},  # 720 steps a day x $0.05
    ("executive.json", "Spend by tenant", "B"): {'{gateway_tenant="acme"}': 100.0},
    ("executive.json", "Spend by route", "B"): {"{}": 100.0},
    ("executive.json", "Daily budget used by tenant", "A"): {'{gateway_tenant="acme"}': 0.36},
    ("executive.json", "Spend by model", "A"): {BY_MODEL: 1.5},
    ("executive.json", "Cost per request by model", "A"): {BY_MODEL: 0.005},
    ("executive.json", "Spend per day: this week vs last week", "A"): {"{}": 36.0},
    ("executive.json", "Spend per day: this week vs last week", "B"): {"{}": 18.0},
    ("executive.json", "Spend, last 7 days vs the 7 before", "A"): {"{}": 1.0},
    ("executive.json", "Requests, last 7 days vs the 7 before", "A"): {"{}": 1.0},
    ("executive.json", "Requests per day: this week vs last week", "B"): {"{}": 3600.0},
    ("operator.json", "Upstream latency by model", "A"): {BY_MODEL: 0.1},
    ("operator.json", "Upstream latency by model", "B"): {BY_MODEL: 0.75},
    ("operator.json", "Upstream latency by model", "C"): {BY_MODEL: 0.95},
    ("operator.json", "Upstream latency by route", "B"): {BY_ROUTE: 0.75},
    ("operator.json", "Time to first token by model", "B"): {BY_MODEL: 0.3},
    ("operator.json", "Time to first token by route", "C"): {BY_ROUTE: 0.46},
    ("operator.json", "Throughput: requests per second", "A"): {BY_MODEL: 10 / STEP_S},
    ("operator.json", "Throughput: tokens per second", "A"): {'{gen_ai_token_type="input"}': 1000 / STEP_S,
                                                             '{gen_ai_token_type="output"}': 1500 / STEP_S},
    ("operator.json", "In-flight upstream attempts", "A"): {BY_MODEL: 3.0},
    ("operator.json", "Saturation per model", "A"): {BY_MODEL: 0.25},
    ("operator.json", "Saturation per model", "B"): {BY_MODEL: 2 / STEP_S},
    ("operator.json", "Routing decision time", "A"): {BY_ROUTE: 0.0046},
    ("operator.json", "Call-slot wait by model", "A"): {BY_MODEL: 0.046},
    ("operator.json", "Fallback rate by reason", "A"): {'{gateway_fallback_reason="timeout"}': 0.1},
    ("operator.json", "Cache hit rate by route", "A"): {BY_ROUTE: 0.3},
    ("operator.json", "SLA attainment by route", "A"): {BY_ROUTE: 0.9},
    ("operator.json", "Error rate by outcome", "A"): {'{gateway_outcome="upstream_error"}': 0.1},
    ("operator.json", "Upstream attempt errors", "A"): {'{error_type="timeout", gateway_model_selected="small"}':
                                                        2 / STEP_S},
    ("operator.json", "GPU power", "A"): {'{Hostname="gpu-node", gpu="0"}': 250.0},
    ("operator.json", "GPU utilization", "A"): {'{Hostname="gpu-node", gpu="0"}': 0.4},
}


def known_answer_target(board: str, title_start: str, ref_id: str) -> str:
    """The PromQL, for job `gateway`, of target `ref_id` of the panel whose title starts with `title_start`, the
    shortest such title where several do ("Cache savings" is not "Cache savings per hour")."""
    found = [(title, expr) for name, title, ref, expr in dashboard_targets()
             if name == board and ref == ref_id and title.startswith(title_start)]
    assert found, f"{board}: no panel starting {title_start!r} with target {ref_id}"
    _, expr = min(found, key=lambda item: len(item[0]))
    return expr.replace("${job}", "gateway").replace("$job", "gateway")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_panels_compute_what_their_titles_say(tmp_path):
    """Over traffic with known round numbers, each panel gives the figure its title names: cost per request and
    per successful task, p50/p95/p99 latency, cache savings, the GPU's idle-to-active energy, rates and shares,
    week over week (a division inverted, a quantile, a window, an offset or a label matcher wrong shows here)."""
    checks = []
    for (board, title_start, ref_id), answers in KNOWN_ANSWERS.items():
        expr = known_answer_target(board, title_start, ref_id)
        checks.append({"expr": f"round({expr}, 0.000001)", "eval_time": f"{HISTORY_MIN}m",
                       "exp_samples": [{"labels": labels, "value": round(value, 6)}
                                       for labels, value in answers.items()]})
    promtool_test(tmp_path / "known.test.yaml", known_traffic(), checks)


def test_kubernetes_policy_admits_only_callers_with_an_api_key():
    """The production policy sends traffic to a paid API on the organisation's key: with no tenants the gateway
    runs open (README: 'none = the gateway runs open'), so every pod in the cluster could spend that key without
    limit or budget, as the Service is reachable cluster-wide and no NetworkPolicy narrows it."""
    policy = load_policy(Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "policy.yaml")
    paid = [name for name, model in policy.models.items() if model.api_key_env]
    assert paid, "the check assumes the policy reaches a paid API"
    assert policy.tenants, f"no tenants: anyone who reaches the Service spends {', '.join(paid)}'s API key"
    assert all(tenant.keys_sha256 for tenant in policy.tenants.values())


SILENT_REDIS_POLICY = """\
version: 1
models:
  m:
    endpoint: http://127.0.0.1:9/v1
    upstream_model: m
    price: {input_per_mtok: 1, output_per_mtok: 1}
routes:
  - name: r
    candidates: [m]
"""


def test_gateway_run_stops_on_a_sigterm_sent_while_its_event_loop_starts_its_stores(tmp_path):
    """`gateway run` catches SIGTERM from its first line so that a stop during start-up is not dropped: one that
    comes while the event loop is already running start-up (connecting to Redis here) stops it too, exit 0,
    instead of uvloop logging the handler's exception as 'Exception in callback' and the gateway going on to
    serve until its SIGKILL."""
    silent = socket.socket()            # a Redis that accepts and never answers: start-up waits on it
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent.settimeout(20)
    policy = tmp_path / "policy.yaml"
    policy.write_text(SILENT_REDIS_POLICY)
    env = dict(os.environ, GATEWAY_REDIS_URL=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
               OTEL_SDK_DISABLED="true")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--port", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        connection, _ = silent.accept()      # the gateway's loop is running its start-up
        time.sleep(0.3)                     # and waits for Redis' answer (its warm-up waits up to 2 s)
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"still running 5 s after a SIGTERM during start-up:\n{output.decode()[-2000:]}")
        assert process.returncode == 0, output.decode()
        assert b"listening" not in output
        connection.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        silent.close()
