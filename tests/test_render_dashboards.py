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
    # PromQL's keywords in any case: the labels grouped or matched on are no metric names
    assert metric_names_in("SUM BY (gpu) (a) / On(job) Group_Left(tenant) b") == {"a", "b"}
    assert [format_value(v, unit) for v, unit in ((0.0123, "currencyUSD"), (0.25, "percentunit"),
                                                  (0.0042, "s"), (1500, "joule"))] == \
        ["$0.0123", "25.0%", "4.20 ms", "1.50 kJ"]



def test_collapsed_rows_keep_their_panels(tmp_path):
    """A collapsed row's panels (nested in the row, as Grafana saves them) are rendered; an expanded row's
    panels, saved beside it, are rendered once."""
    board = {**MINI, "panels": [
        {**MINI["panels"][0], "collapsed": True, "panels": [MINI["panels"][1]]},
        {"type": "row", "title": "Shown", "collapsed": False, "panels": [],
         "gridPos": {"x": 0, "y": 9, "w": 24, "h": 1}},
        *MINI["panels"][2:],
    ]}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(board))
    titles = [panel.title for panel in load_dashboard(path).panels]
    assert titles == ["Load", "Requests per second", "Scraped series", "GPU power", "Shown"]


def test_a_panel_with_one_instant_target_is_queried_at_one_instant(tmp_path):
    """A time-series panel is queried over the window unless one of its targets asks for an instant; a stat is
    always instant."""
    series, stat = MINI["panels"][1], MINI["panels"][2]
    board = {**MINI, "panels": [
        series, {**series, "title": "Mixed", "targets": [*series["targets"], {**stat["targets"][0], "refId": "B"}]},
        stat]}
    path = tmp_path / "instant.json"
    path.write_text(json.dumps(board))
    assert [(panel.title, panel.instant) for panel in load_dashboard(path).panels] == \
        [("Requests per second", False), ("Mixed", True), ("Scraped series", True)]


def test_builtin_range_variables_are_in_seconds_and_milliseconds():
    """$__range is the window in seconds (a duration PromQL reads), $__range_ms and $__interval_ms in ms."""
    values = builtin_values(range_s=3600, step_s=15, rate_interval="1m")
    assert (values["__range"], values["__range_s"], values["__range_ms"]) == ("3600s", "3600", "3600000")
    assert (values["__interval"], values["__interval_ms"], values["__rate_interval"]) == ("15s", "15000", "1m")
    assert interpolate("increase(x[$__range])", values) == "increase(x[3600s])"


def test_promql_keywords_are_not_taken_for_metric_names():
    """Keywords and the NaN/Inf literals in any case are not reported as metric names a panel lacks."""
    assert metric_names_in("sum(up) > bool NaN or vector(Inf) unless down") == {"up", "down"}


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
