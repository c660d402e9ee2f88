"""deploy/ as a platform team runs it: many gateway pods behind one dashboard, an autoscaled Deployment, the
Compose simulators serving what the policy promises."""

from __future__ import annotations

import json
import shutil
import subprocess
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
    spec = {"evaluation_interval": f"{STEP_MIN}m",
            "tests": [{"interval": f"{STEP_MIN}m", "input_series": replica_series(), "promql_expr_test": checks}]}
    path = tmp_path / "replicas.test.yaml"
    path.write_text(yaml.safe_dump(spec, width=1 << 16))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
