"""A two-panel SVG line chart: cost per minute and p95 latency per minute, one line per policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from xml.sax.saxutils import escape

from gateway.replay.compare import Comparison
from gateway.replay.summary import Minute, Summary

WIDTH, PANEL_HEIGHT, TOP, GAP = 900, 230, 70, 60
LEFT, RIGHT, BOTTOM = 90, 30, 40
STYLES = {"baseline": 'stroke="#888888" stroke-dasharray="6 4"', "new": 'stroke="#1f6fb4"'}
Series = list[float | None]


def render_chart(report: Comparison | Summary) -> str:
    """The SVG document for a comparison (two lines per panel) or one policy."""
    summaries = {"baseline": report.baseline, "new": report.new} if isinstance(report, Comparison) \
        else {"new": report}
    panels = (("cost per minute (USD)", lambda m: float(m.cost_usd)),
              ("p95 latency per minute (ms)", lambda m: m.p95_latency_ms))
    height = TOP + len(panels) * (PANEL_HEIGHT + GAP)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{height}" fill="white"/>', *_legend(summaries)]
    for number, (title, read) in enumerate(panels):
        top = TOP + number * (PANEL_HEIGHT + GAP)
        parts += _panel(title, top, {role: _series(s.per_minute, read) for role, s in summaries.items()})
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _series(minutes: Sequence[Minute], read: Callable[[Minute], float | None]) -> Series:
    """One value per minute; None where there is none."""
    return [read(m) for m in minutes]


def _legend(summaries: dict[str, Summary]) -> list[str]:
    """A line sample and the policy's name for each role."""
    parts = []
    for i, (role, summary) in enumerate(summaries.items()):
        y = 18 + i * 16
        parts.append(f'<line x1="{LEFT}" y1="{y - 4}" x2="{LEFT + 30}" y2="{y - 4}" {STYLES[role]} '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{LEFT + 38}" y="{y}">{role}: {escape(summary.policy)}</text>')
    return parts


def _panel(title: str, top: float, series: dict[str, Series]) -> list[str]:
    """Axes, ticks and one polyline per series."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, PANEL_HEIGHT - BOTTOM
    length = max((len(s) for s in series.values()), default=0)
    y_max = nice_ceiling(max((v for s in series.values() for v in s if v is not None), default=0.0))

    def x_of(minute: int) -> float:
        return LEFT + (plot_w * minute / (length - 1) if length > 1 else 0.0)

    def y_of(value: float) -> float:
        return top + plot_h - plot_h * value / y_max

    parts = [f'<text x="{LEFT}" y="{top - 8}" font-weight="bold">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#cccccc"/>']
    for k in range(5):
        value = y_max * k / 4
        y = y_of(value)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#eeeeee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(value)}</text>')
    step = 10 if length > 20 else 1
    for minute in range(0, length, step):
        x = x_of(minute)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{minute}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle">'
                 'minute of the traffic</text>')
    for role, values in series.items():
        for segment in _segments(values):
            points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in segment)
            parts.append(f'<polyline fill="none" stroke-width="2" {STYLES[role]} points="{points}"/>')
    return parts


def _segments(values: Series) -> list[list[tuple[int, float]]]:
    """Runs of known values, so a minute with no data breaks the line."""
    runs: list[list[tuple[int, float]]] = [[]]
    for i, value in enumerate(values):
        if value is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((i, value))
    return [run for run in runs if run]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (1 for zero or less)."""
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 2.5, 5, 10) if step * scale >= value)


def _tick(value: float) -> str:
    """An axis label: no more digits than it needs."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.4g}"
