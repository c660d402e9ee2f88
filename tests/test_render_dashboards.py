"""The dashboard renderer: Grafana variable interpolation, and panels drawn from a real Prometheus."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

from bench.machine import free_port
from deploy.render.dashboard import builtin_values, interpolate, load_dashboard, variable_values
from deploy.render.prom import PrometheusApi, Window, evaluate_panel, metric_names_in
from deploy.render.stack import PROMETHEUS, prometheus_command, wait_http
from deploy.render.units import format_value

DASHBOARDS = Path(__file__).resolve().parents[1] / "deploy" / "compose" / "grafana" / "dashboards"

#: a small dashboard in Grafana's JSON shape: a row, a time series, a stat, and a GPU panel
MINI = {
    "uid": "mini", "title": "Mini",
    "templating": {"list": [
        {"name": "job", "type": "custom", "current": {"text": "gateway", "value": "gateway"}},
        {"name": "handler", "type": "query", "allValue": ".*", "current": {"text": ["All"], "value": ["$__all"]}},
    ]},
    "panels": [
        {"type": "row", "title": "Load", "gridPos": {"x": 0, "y": 0, "w": 24, "h": 1}},
        {"type": "timeseries", "title": "Requests per second", "gridPos": {"x": 0, "y": 1, "w": 12, "h": 8},
         "fieldConfig": {"defaults": {"unit": "reqps"}},
         "targets": [{"refId": "A", "legendFormat": "{{job}}", "expr":
                      'sum by (job) (rate(prometheus_http_requests_total{job=~"$job", handler=~"$handler"}'
                      "[$__rate_interval]))"}]},
        {"type": "stat", "title": "Scraped series", "gridPos": {"x": 12, "y": 1, "w": 6, "h": 8},
         "targets": [{"refId": "A", "instant": True, "expr": 'sum(scrape_samples_scraped{job=~"$job"})'}]},
        {"type": "timeseries", "title": "GPU power", "gridPos": {"x": 18, "y": 1, "w": 6, "h": 8},
         "fieldConfig": {"defaults": {"unit": "watt"}},
         "targets": [{"refId": "A", "expr": "sum by (gpu) (DCGM_FI_DEV_POWER_USAGE)"}]},
    ],
}


def test_operator_dashboard_queries_interpolate_to_the_defaults():
    """The operator dashboard's variables take their saved defaults and every `$` in its PromQL is replaced."""
    dashboard = load_dashboard(DASHBOARDS / "operator.json")
    values = {**variable_values(dashboard), **builtin_values(range_s=180, step_s=1, rate_interval="30s")}
    assert values["job"] == "gateway" and values["tenant"] == ".*"
    exprs = [interpolate(target.expr, values) for panel in dashboard.panels for target in panel.targets]
    assert exprs and not [expr for expr in exprs if "$" in expr]
    assert any('job=~"gateway"' in expr and "[30s]" in expr for expr in exprs)


def test_metric_names_and_units_read_like_grafana():
    """Metric names are told from functions and labels, and values are formatted in the panel's unit."""
    expr = 'sum by (gpu) (rate(DCGM_X{job="a"}[5m] offset 1w)) / scalar(sum(up_total))'
    assert metric_names_in(expr) == {"DCGM_X", "up_total"}
    assert [format_value(v, unit) for v, unit in ((0.0123, "currencyUSD"), (0.25, "percentunit"),
                                                  (0.0042, "s"), (1500, "joule"))] == \
        ["$0.0123", "25.0%", "4.20 ms", "1.50 kJ"]


@pytest.fixture
def prometheus(tmp_path):
    """The OS `prometheus` binary scraping itself every second as job `gateway`."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("the `prometheus` OS package is not installed")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(prometheus_command(tmp_path, f"127.0.0.1:{port}", port), stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", process)
        yield PrometheusApi(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_panels_render_from_a_real_prometheus(prometheus, tmp_path):
    """Panels run their PromQL against a real Prometheus; a GPU panel says why it is empty; the PNG is 1600 px wide."""
    pytest.importorskip("matplotlib")
    from deploy.render.draw import render

    path = tmp_path / "mini.json"
    path.write_text(json.dumps(MINI))
    dashboard = load_dashboard(path)
    deadline = time.monotonic() + 15
    while True:
        end_s = time.time()
        window = Window(end_s - 20, end_s, 1)
        values = {**variable_values(dashboard), **builtin_values(range_s=20, step_s=1, rate_interval="3s")}
        results = [evaluate_panel(prometheus, p, values, window, prometheus.metric_names()) for p in dashboard.panels]
        if all(r.has_data for r in results[1:3]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [r.has_data for r in results] == [False, True, True, False]
    assert "DCGM_FI_DEV_POWER_USAGE" in results[3].no_data_reason and "no GPU" in results[3].no_data_reason
    png = tmp_path / "mini.png"
    render(dashboard, results, window, ["test"], png)
    width, _height = struct.unpack(">II", png.read_bytes()[16:24])
    assert width == 1600
