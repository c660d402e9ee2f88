"""Render the Grafana dashboards to PNG from real data, without Grafana.

    python -m deploy.render.render_dashboards [--minutes 3] [--out docs/dashboards]

Starts simulated models, the gateway and Prometheus, drives a few minutes of
traffic shaped like the Azure LLM trace, then runs every panel's own PromQL
through Prometheus's HTTP API and draws it with matplotlib on the dashboard's
grid. `--prometheus URL` skips the stack and renders the last `--minutes` of an
existing Prometheus instead (for example the Compose stack's).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from deploy.render import stack as render_stack
from deploy.render.dashboard import Dashboard, builtin_values, load_dashboard, variable_values
from deploy.render.prom import PanelResult, PrometheusApi, Window, evaluate_panel
from deploy.render.traffic import TRACE, drive, load_arrivals

DASHBOARDS = Path(__file__).resolve().parents[1] / "compose" / "grafana" / "dashboards"
NAMES = ("executive", "operator")
POINTS = 300                    # about how many points a time series gets, like Grafana's max data points
SETTLE_S = 3.0                  # after the traffic: let Prometheus scrape the last counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.render.render_dashboards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic (or window) length (default 3)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"), help="where the PNGs go")
    parser.add_argument("--speed", type=float, default=3.0, help="trace replay speed-up (default 3)")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Azure LLM trace CSV (arrivals and lengths)")
    parser.add_argument("--dashboards", type=Path, default=DASHBOARDS, help="folder of the dashboard JSON files")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval becomes (default 30s)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="override a dashboard variable (repeatable)")
    parser.add_argument("--prometheus", help="render from this Prometheus instead of running the stack")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (the optional `render` extra; checked before minutes of traffic)
    except ImportError:
        parser.error("matplotlib is not installed: pip install 'inference-gateway[render]'")
    overrides = dict(item.split("=", 1) for item in args.var)
    if args.prometheus:
        end_s = time.time()
        window = make_window(end_s - args.minutes * 60, end_s)
        source = f"Prometheus at {args.prometheus}, last {args.minutes:g} min"
        return render_all(PrometheusApi(args.prometheus), window, args, overrides, source)
    with tempfile.TemporaryDirectory(prefix="render-dashboards-") as workdir:
        budget_usd = render_stack.daily_budget_usd(args.minutes)
        running = render_stack.Stack(Path(workdir), budget_usd=budget_usd).start()
        try:
            return run_and_render(running, args, overrides)
        finally:
            running.stop()


def run_and_render(running: render_stack.Stack, args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Drive the traffic through the running stack, then render from its Prometheus."""
    arrivals = load_arrivals(args.trace, args.minutes * 60, args.speed)
    print(f"driving {len(arrivals)} tasks from {args.trace.name} at x{args.speed:g} for {args.minutes:g} min ...")
    started_s = time.time()
    tally = asyncio.run(drive(running.gateway_url, render_stack.TENANT_KEYS, arrivals))
    time.sleep(SETTLE_S)
    window = make_window(started_s, time.time())
    print(f"calls {tally.calls}, failed {tally.failed_calls} {dict(tally.errors)}, outcomes {dict(tally.outcomes)}")
    source = (f"a real gateway (gateway run; 3 tenants with a ${running.budget_usd} daily budget each, 3 routes) "
              f"in front of simulated models (gateway simulate-backend; errors: small 5%, large 2%; medium: 3% 429s, "
              f"0.5% hangs), driven through the openai SDK "
              f"by {args.trace.name} arrivals at x{args.speed:g}; {tally.calls} calls, "
              f"{sum(tally.outcomes.values())} task outcomes; Prometheus scraping /metrics every "
              f"{render_stack.SCRAPE_INTERVAL_S} s")
    return render_all(PrometheusApi(running.prometheus_url), window, args, overrides, source)


def make_window(start_s: float, end_s: float) -> Window:
    return Window(start_s, end_s, max(1.0, round((end_s - start_s) / POINTS)))


def render_all(api: PrometheusApi, window: Window, args: argparse.Namespace, overrides: dict[str, str],
               source: str) -> int:
    """Render each dashboard; print which panels have data and why the others do not."""
    known = api.metric_names()
    for name in NAMES:
        path = args.dashboards / f"{name}.json"
        dashboard = load_dashboard(path)
        values = {**variable_values(dashboard, overrides),
                  **builtin_values(range_s=window.range_s, step_s=window.step_s, rate_interval=args.rate_interval)}
        results = [evaluate_panel(api, panel, values, window, known) for panel in dashboard.panels]
        target = args.out / f"{name}.png"
        from deploy.render.draw import render      # imports matplotlib
        render(dashboard, results, window, subtitle(dashboard, path, values, window, source, results), target)
        print(summary(name, results, target))
    return 0


def subtitle(dashboard: Dashboard, path: Path, values: dict[str, str], window: Window, source: str,
             results: list[PanelResult]) -> list[str]:
    """The lines under the title that say plainly what this picture is."""
    shown = [f"{v['name']}={'All' if values[v['name']] == '.*' else values[v['name']]}" for v in dashboard.variables]
    start, end = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s)) for s in (window.start_s, window.end_s))
    panels = [r for r in results if r.panel.type != "row"]
    return [
        f"Not a Grafana screenshot (Grafana cannot run here): every panel is the PromQL of {path.name}, run through "
        "Prometheus's HTTP API and drawn with matplotlib (deploy/render).",
        f"Data: {source}.",
        f"Window {start} to {end[11:]} UTC ({window.range_s / 60:.1f} min, step {window.step_s:g} s). Variables: "
        f"{' · '.join(shown)} · $__range={values['__range']} · $__rate_interval={values['__rate_interval']}. "
        f"Panels with data: {sum(r.has_data for r in panels)} of {len(panels)}.",
    ]


def summary(name: str, results: list[PanelResult], target: Path) -> str:
    """A few lines: panel counts, and each empty panel with its reason."""
    panels = [r for r in results if r.panel.type != "row"]
    empty = [r for r in panels if not r.has_data]
    lines = [f"{target}: {len(panels) - len(empty)} of {len(panels)} panels with data"]
    lines += [f"  no data: {r.panel.title}: {r.no_data_reason}" for r in empty]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
