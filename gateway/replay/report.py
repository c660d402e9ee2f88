"""The replay report as Markdown and as JSON: one policy, or NEW beside BASELINE."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from gateway.replay.compare import Comparison
from gateway.replay.summary import Summary

Value = int | float | Decimal | None
#: (label, how to read it from a Summary, format): the rows of the summary table
METRICS: tuple[tuple[str, Callable[[Summary], Value], str], ...] = (
    ("requests", lambda s: s.requests, "int"),
    ("answered", lambda s: s.served, "int"),
    ("rejected", lambda s: sum(s.rejected.values()), "int"),
    ("failed", lambda s: sum(s.failed.values()), "int"),
    ("cache hits in the trace, answered at no cost", lambda s: s.cache_hits, "int"),
    ("refused before routing in the trace, not replayed", lambda s: s.refused_in_trace, "int"),
    ("calls that failed in the trace, replayed with their route's median output", lambda s: s.estimated_output,
     "int"),
    ("routed by their recorded route (header-matched routes)", lambda s: s.routed_by_recorded_route, "int"),
    ("matched without headers (header-matched routes not simulated)", lambda s: s.matched_without_headers, "int"),
    ("fallbacks", lambda s: s.fallbacks, "int"),
    ("best-effort decisions", lambda s: s.best_effort, "int"),
    ("queued for a slot", lambda s: s.queued, "int"),
    ("cost total (USD)", lambda s: s.cost_usd, "usd4"),
    ("cost per answered request (USD)", lambda s: s.cost_per_request_usd, "usd8"),
    ("cost per 1k tokens (USD)", lambda s: s.cost_per_1k_tokens_usd, "usd6"),
    ("latency p50 (ms)", lambda s: s.latency and s.latency.p50_ms, "ms"),
    ("latency p95 (ms)", lambda s: s.latency and s.latency.p95_ms, "ms"),
    ("latency p99 (ms)", lambda s: s.latency and s.latency.p99_ms, "ms"),
    ("TTFT p50 (ms)", lambda s: s.ttft and s.ttft.p50_ms, "ms"),
    ("TTFT p95 (ms)", lambda s: s.ttft and s.ttft.p95_ms, "ms"),
    ("TTFT p99 (ms)", lambda s: s.ttft and s.ttft.p99_ms, "ms"),
    ("predicted energy total (J)", lambda s: s.energy_j, "j"),
    ("predicted energy per request (J)", lambda s: s.energy_per_request_j, "j"),
)
NOTE = ("The real router (route matching, SLA planning, latency estimates, circuit breakers) decides each "
        "request at its trace arrival time, on a virtual clock. Each model is simulated from its latency_prior "
        "(TTFT + (output - 1) x TPOT, with seeded lognormal jitter) and max_concurrency (a FIFO queue beyond "
        "it; waiting adds to TTFT and latency); answers feed back into the estimates. An attempt whose first "
        "token would come after the model's first_byte_s (a whole answer: its end after total_s) times out and "
        "falls back. A best-effort decision is one where the router predicted that no candidate meets the "
        "route's SLA.")
#: rows left out of the Markdown table when they are 0 under every policy (most traffic has none)
SHOWN_IF_ANY = frozenset({"cache hits in the trace, answered at no cost",
                          "refused before routing in the trace, not replayed",
                          "calls that failed in the trace, replayed with their route's median output",
                          "routed by their recorded route (header-matched routes)",
                          "matched without headers (header-matched routes not simulated)"})
#: the fewest significant digits a money cell shows
MONEY_DIGITS = 4
FORMATS = {"int": "{:,}", "usd4": "{:,.4f}", "usd8": "{:.8f}", "usd6": "{:.6f}", "ms": "{:,.1f}", "j": "{:,.1f}"}


def render_markdown(report: Comparison | Summary, *, meta: Mapping[str, str] | None = None,
                    chart: str | None = None) -> str:
    """The report as Markdown; `meta` rows go in the header, `chart` is an image path to link."""
    if isinstance(report, Comparison):
        summaries = {"baseline": report.baseline, "new": report.new}
    else:
        summaries = {"new": report}
    lines = ["# Replay report", ""]
    lines += [f"- **{key}**: {value}" for key, value in (meta or {}).items()]
    lines += [f"- **{role} policy**: `{s.policy}`" for role, s in summaries.items()]
    lines += ["", NOTE, "", "## Summary", "", *_summary_table(summaries)]
    lines += ["", "## Requests per model", "", *_model_table(summaries)]
    lines += ["", "## SLA attainment per route", "",
              "Share of a route's requests whose simulated latency and TTFT are within the route's "
              "p95 limits; rejected and failed requests count as missed.", "", *_sla_table(summaries)]
    lines += ["", "## Rejections and failures", "", *_reason_table(summaries)]
    if isinstance(report, Comparison):
        lines += ["", "## Requests whose model changed", "", *_changes(report)]
    if chart:
        lines += ["", "## Cost and p95 latency per minute", "", f"![cost and p95 latency per minute]({chart})"]
    return "\n".join(lines) + "\n"


def render_json(report: Comparison | Summary, *, meta: Mapping[str, str] | None = None) -> str:
    """The report as JSON: money as decimal strings, times in ms."""
    document: dict[str, Any] = {"meta": dict(meta or {})}
    if isinstance(report, Comparison):
        document["policies"] = {"baseline": _plain(report.baseline), "new": _plain(report.new)}
        document["comparison"] = {
            "deltas": _plain({label: _delta(read(report.baseline), read(report.new)) for label, read, _ in METRICS}),
            "requests_model_changed": report.changed, "transitions": report.transitions,
            "sample": _plain(list(report.sample))}
    else:
        document["policies"] = {"new": _plain(report)}
    return json.dumps(document, indent=2, default=str) + "\n"


def _summary_table(summaries: dict[str, Summary]) -> list[str]:
    """Metric | one column per policy | NEW - BASELINE."""
    both = len(summaries) == 2
    rows = [_header(["metric", *summaries, *(["new − baseline"] if both else [])])]
    for label, read, kind in METRICS:
        values = [read(s) for s in summaries.values()]
        if label in SHOWN_IF_ANY and not any(values):
            continue
        cells = [_format(v, kind) for v in values]
        if both:
            cells.append(_format(_delta(*values), kind, signed=True))
        rows.append(_row([label, *cells]))
    return rows


def _model_table(summaries: dict[str, Summary]) -> list[str]:
    """Answered requests per model."""
    models = sorted({m for s in summaries.values() for m in s.per_model})
    both = len(summaries) == 2
    rows = [_header(["model", *summaries, *(["new − baseline"] if both else [])])]
    for model in models:
        counts = [s.per_model.get(model, 0) for s in summaries.values()]
        rows.append(_row([model, *(f"{c:,}" for c in counts), *([f"{counts[1] - counts[0]:+,}"] if both else [])]))
    return rows


def _sla_table(summaries: dict[str, Summary]) -> list[str]:
    """Per route: its limits and each policy's attainment."""
    both = len(summaries) == 2
    rows = [_header(["route", *(f"{role}: SLA" for role in summaries),
                     *(f"{role}: met / requests" for role in summaries), *(["new − baseline"] if both else [])])]
    routes = dict.fromkeys(r.route for s in summaries.values() for r in s.sla)
    for route in routes:
        found = [next((r for r in s.sla if r.route == route), None) for s in summaries.values()]
        limits = [_limits(r) if r else "—" for r in found]
        shares = [f"{r.met:,} / {r.requests:,} ({r.share:.1%})" if r and r.requests else "—" for r in found]
        if both:
            known = [r.share for r in found if r and r.requests]
            shares.append(f"{(known[1] - known[0]) * 100:+.1f} pp" if len(known) == 2 else "n/a")
        rows.append(_row([route, *limits, *shares]))
    return rows


def _reason_table(summaries: dict[str, Summary]) -> list[str]:
    """Rejected and failed requests by reason."""
    reasons = sorted({f"{kind}: {reason}" for s in summaries.values()
                      for kind, found in (("rejected", s.rejected), ("failed", s.failed)) for reason in found})
    if not reasons:
        return ["None: every request was answered."]
    rows = [_header(["outcome", *summaries])]
    for reason in reasons:
        kind, name = reason.split(": ", 1)
        rows.append(_row([reason, *(f"{getattr(s, kind).get(name, 0):,}" for s in summaries.values())]))
    return rows


def _changes(report: Comparison) -> list[str]:
    """The count, the transitions, and a sample of changed requests."""
    lines = [f"**{report.changed:,}** of {report.new.requests:,} requests are answered by a different model "
             f"(or rejected differently) under NEW.", ""]
    if not report.changed:
        return lines
    lines += [_header(["baseline -> new", "requests"])]
    lines += [_row([move, f"{count:,}"]) for move, count in report.transitions.items()]
    lines += ["", _header(["request", "arrival (s)", "input tok", "output tok", "baseline", "new",
                           "baseline latency (ms)", "new latency (ms)", "cost Δ (USD)"])]
    for c in report.sample:
        lines.append(_row([str(c.index), f"{c.arrival_s:.3f}", str(c.input_tokens), str(c.output_tokens),
                           c.baseline, c.new, _format(c.baseline_latency_ms, "ms"), _format(c.new_latency_ms, "ms"),
                           f"{c.cost_delta_usd:+.8f}"]))
    return lines


def _limits(route_sla) -> str:
    """'latency ≤ 2000 ms, TTFT ≤ 500 ms', or 'none'."""
    parts = []
    if route_sla.p95_latency_ms is not None:
        parts.append(f"latency ≤ {route_sla.p95_latency_ms:g} ms")
    if route_sla.p95_ttft_ms is not None:
        parts.append(f"TTFT ≤ {route_sla.p95_ttft_ms:g} ms")
    return ", ".join(parts) or "none"


def _delta(old: Value, new: Value) -> Value:
    """new - old, or None when either is unknown."""
    return None if old is None or new is None else new - old


def _format(value: Value, kind: str, signed: bool = False) -> str:
    """A table cell; n/a for an unknown value."""
    if value is None:
        return "n/a"
    spec = FORMATS[kind]
    if kind.startswith("usd") and value:     # at least MONEY_DIGITS significant digits: a small cost is not 0
        places = max(int(spec[spec.index(".") + 1:-2]), MONEY_DIGITS - 1 - Decimal(value).adjusted())
        spec = f"{{:,.{places}f}}"
    return (spec.replace("{:", "{:+") if signed else spec).format(value)


def _header(cells: list[str]) -> str:
    """A Markdown table header and its rule."""
    return _row(cells) + "\n" + _row(["---"] * len(cells))


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _plain(value: Any) -> Any:
    """Dataclasses and containers as JSON-ready values; floats rounded to a microsecond-ish 6 places."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value
