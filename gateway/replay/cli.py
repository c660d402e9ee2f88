"""`gateway replay`: replay recorded traffic against a policy (and a baseline) in virtual time."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

from gateway.errors import PolicyError
from gateway.policy.load import load_policy
from gateway.replay.chart import render_chart
from gateway.replay.compare import compare
from gateway.replay.report import render_json, render_markdown
from gateway.replay.simulate import ReplayResult, replay
from gateway.replay.summary import summarize
from gateway.replay.traffic import FORMATS, ReplayRequest, TrafficError, read_traffic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway replay", description="What-if replay of real traffic against routing policies, in "
                                           "virtual time: the real router, simulated models.")
    parser.add_argument("--policy", required=True, type=Path, help="the NEW policy YAML")
    parser.add_argument("--baseline", type=Path, help="the BASELINE policy YAML to compare against")
    parser.add_argument("--traffic", required=True, type=Path,
                        help="Azure trace CSV, gateway ledger JSONL, or JSONL of {timestamp, input_tokens, ...}; "
                             "UTF-8, plain or gzipped")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="traffic format (default: auto)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, metavar="X", help="real-time replay at X times speed (not supported yet)")
    pace.add_argument("--virtual-time", action="store_true", help="simulate in virtual time (the default)")
    parser.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests by arrival")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latency jitter and exploration")
    parser.add_argument("--power-w", action="append", default=[], metavar="MODEL=WATTS", type=_power,
                        help="assumed power of a model's GPUs when serving, for predicted energy: a request is charged "
                             "WATTS x its service time / max_concurrency (repeatable)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (default: stdout)")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    parser.add_argument("--chart", type=Path, help="write the SVG chart here")
    return parser


def main(argv: list[str]) -> int:
    """Run `gateway replay`; 0 on success, 1 on a bad policy, traffic file or output path, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    if args.speed is not None:
        print("gateway replay: --speed (real-time replay) is not supported yet; "
              "replay runs in virtual time (--virtual-time, the default)", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("gateway replay: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        return _replay(args, argv)
    except (PolicyError, TrafficError) as exc:
        print(f"gateway replay: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"gateway replay: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _replay(args: argparse.Namespace, argv: list[str]) -> int:
    """Load, replay, compare, and write the report files."""
    started_s = time.perf_counter()
    _check_writable(args.out, args.json, args.chart)
    new_policy = load_policy(args.policy)
    baseline_policy = load_policy(args.baseline) if args.baseline else None
    requests = read_traffic(args.traffic, args.format, args.limit)
    if not requests:
        raise TrafficError(f"{args.traffic}: no requests to replay: the file is empty or has only a header")
    power_w = dict(args.power_w)
    unknown = sorted(set(power_w) - set(new_policy.models) - set(baseline_policy.models if baseline_policy else ()))
    if unknown:
        print(f"gateway replay: --power-w names unknown models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    new, new_s = _timed_replay(new_policy, requests, args.seed, power_w)
    baseline, baseline_s = (_timed_replay(baseline_policy, requests, args.seed, power_w)
                            if baseline_policy else (None, 0.0))
    _warn_header_routes_not_simulated(new, baseline)
    uncached = _cache_not_simulated(requests, new, baseline)
    report = compare(new, baseline) if baseline else summarize(new)
    elapsed_s = time.perf_counter() - started_s
    meta = _meta(args, argv, requests, new_s, baseline_s if baseline else None, elapsed_s, power_w)
    if uncached:
        meta["cache"] = uncached
    chart_link = None
    if args.chart:
        args.chart.write_text(render_chart(report), encoding="utf-8")
        chart_link = os.path.relpath(args.chart, args.out.parent) if args.out else str(args.chart)
    markdown = render_markdown(report, meta=meta, chart=chart_link)
    if args.out:
        args.out.write_text(markdown, encoding="utf-8")
    else:
        sys.stdout.write(markdown)
    if args.json:
        args.json.write_text(render_json(report, meta=meta), encoding="utf-8")
    print(f"gateway replay: {len(requests)} requests replayed in {elapsed_s:.2f} s", file=sys.stderr)
    return 0


def _check_writable(*paths: Path | None) -> None:
    """Raise the OSError writing a report file would raise, before the replay rather than after it (a trace of a
    million requests would be replayed for nothing): each path given is opened to append, and removed again when
    this made it."""
    for path in filter(None, paths):
        existed = os.path.lexists(path)
        with path.open("a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()


def _timed_replay(policy, requests: list[ReplayRequest], seed: int,
                  power_w: dict[str, float]) -> tuple[ReplayResult, float]:
    """A replay and the wall seconds it took."""
    started_s = time.perf_counter()
    result = replay(policy, requests, seed=seed, power_w=power_w)
    return result, time.perf_counter() - started_s


def _warn_header_routes_not_simulated(*results: ReplayResult | None) -> None:
    """One warning line when a header-matched route could have taken requests whose traffic line names no route
    they could take: those were matched without headers."""
    unmatched = max(result.matched_without_headers for result in results if result is not None)
    if unmatched:
        print(f"gateway replay: warning: header-matched routes are not simulated for {unmatched:,} requests: the "
              f"traffic has no headers and names no route they could take, so they were matched without headers",
              file=sys.stderr)


def _cache_not_simulated(requests: list[ReplayRequest], *results: ReplayResult | None) -> str | None:
    """When the traffic records no cache hit (an Azure CSV never does) but a policy caches a route that took
    requests: one warning line, and the report's note, that the cache's savings are not simulated."""
    if any(request.recorded_answer == "cache_hit" for request in requests):
        return None
    cached = sorted({route.name for result in results if result is not None for route in result.policy.routes
                     if route.cache.enabled and any(o.route == route.name for o in result.outcomes)})
    if not cached:
        return None
    note = (f"not simulated: the traffic records no cache hits (only a ledger's can be replayed), so routes that "
            f"cache ({', '.join(cached)}) are priced as if every request missed")
    print(f"gateway replay: warning: cache {note}", file=sys.stderr)
    return note


def _meta(args: argparse.Namespace, argv: list[str], requests: list[ReplayRequest], new_s: float,
          baseline_s: float | None, elapsed_s: float, power_w: dict[str, float]) -> dict[str, str]:
    """The report header: how it was made and how long it took."""
    span_s = requests[-1].arrival_s if requests else 0.0
    timing = f"{new_s:.2f} s (new)" + (f" + {baseline_s:.2f} s (baseline)" if baseline_s is not None else "")
    return {
        "command": f"`gateway replay {shlex.join(argv)}`",
        "traffic": f"`{args.traffic}` ({len(requests):,} requests over {span_s / 60:.1f} min of arrivals)",
        "mode": f"virtual time, seed {args.seed}",
        "replay time": f"{timing}; {elapsed_s:.2f} s in all, reading and reporting included",
        "energy assumption": ", ".join(f"{m} {w:g} W" for m, w in power_w.items()) or
        "none given (--power-w MODEL=WATTS), so energy is n/a",
    }


def _power(text: str) -> tuple[str, float]:
    """MODEL=WATTS as (model, watts)."""
    model, sep, watts = text.partition("=")
    try:
        value = float(watts)
    except ValueError:
        value = -1.0
    if not sep or not model or not 0 < value < math.inf:       # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"expected MODEL=WATTS with finite WATTS > 0, got {text!r}")
    return model, value
