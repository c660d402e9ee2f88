"""Drawing evaluated panels with matplotlib, laid out on Grafana's 24-column grid in its dark theme.

Time series become line charts (stacked where the panel stacks), stat panels
one big number, bar gauges horizontal bars; a panel whose queries returned
nothing says "No data" and why, exactly as Grafana would leave it empty.
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from matplotlib import dates as mdates
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from deploy.render.dashboard import Dashboard, Panel
from deploy.render.prom import PanelResult, Series, Window
from deploy.render.units import format_value

WIDTH_PX, DPI = 1600, 100
MARGIN_PX, FOOTER_PX, ROW_PX, GAP_PX = 12, 14, 34, 8
TITLE_PX, LINE_PX, LINE_CHARS = 40, 15, 235
BACKGROUND, PANEL, BORDER, TEXT, MUTED, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9a", "#25282d"
STAT_COLOR = "#73bf69"
STAT_CHAR_EM = 0.66             # width of a bold digit, in em
#: Grafana's classic palette, in order
PALETTE = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0",
           "#508642", "#cca300", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477")
LEGEND_TOKEN = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TRAILING_ZEROS = re.compile(r"(\d+)\.(\d*?)0+(?!\d)")


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels from the figure's top-left corner."""

    left: float
    top: float
    width: float
    height: float


class Canvas:
    """One figure sized for a dashboard, with pixel-to-figure conversions."""

    def __init__(self, grid_rows: int, header_px: float) -> None:
        self.header_px = header_px
        self.height_px = header_px + grid_rows * ROW_PX + FOOTER_PX
        self.figure = Figure(figsize=(WIDTH_PX / DPI, self.height_px / DPI), dpi=DPI, facecolor=BACKGROUND)
        self.column_px = (WIDTH_PX - 2 * MARGIN_PX) / 24

    def panel_box(self, panel: Panel) -> Box:
        """The pixel rectangle of a panel, inside the gaps between panels."""
        grid = panel.grid
        return Box(MARGIN_PX + grid.x * self.column_px + GAP_PX / 2, self.header_px + grid.y * ROW_PX + GAP_PX / 2,
                   grid.w * self.column_px - GAP_PX, grid.h * ROW_PX - GAP_PX)

    def rect(self, box: Box) -> tuple[float, float, float, float]:
        """A pixel box as matplotlib's (left, bottom, width, height) figure fractions."""
        return (box.left / WIDTH_PX, 1 - (box.top + box.height) / self.height_px,
                box.width / WIDTH_PX, box.height / self.height_px)

    def text(self, left_px: float, top_px: float, text: str, **style) -> None:
        style = {"color": TEXT, "fontsize": 9, "va": "top", "ha": "left", **style}
        self.figure.text(left_px / WIDTH_PX, 1 - top_px / self.height_px, text, **style)


def legend_name(legend: str, labels: dict[str, str]) -> str:
    """A series' name from the target's legendFormat, as Grafana fills `{{label}}`."""
    if legend:
        return LEGEND_TOKEN.sub(lambda found: labels.get(found[1], ""), legend).strip()
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items() if k != "__name__")
    return f"{labels.get('__name__', '')}{{{inner}}}" if inner else labels.get("__name__", "value")


def tick_label(value: float, unit: str) -> str:
    """An axis label: the value in its unit, without trailing zeros ($0.6, not $0.600)."""
    return TRAILING_ZEROS.sub(lambda found: found[1] + (f".{found[2]}" if found[2] else ""),
                              format_value(value, unit), count=1)


def last_finite(values: tuple[float, ...]) -> float:
    """The last value that is a number (Grafana's lastNotNull), or NaN."""
    return next((v for v in reversed(values) if math.isfinite(v)), math.nan)


def render(dashboard: Dashboard, results: list[PanelResult], window: Window, subtitle: list[str],
           path: Path) -> None:
    """Draw every panel of `dashboard` from `results` and write a PNG to `path`."""
    with rc_context({"text.parse_math": False, "font.family": "DejaVu Sans"}):
        _render(dashboard, results, window, subtitle, path)


def _render(dashboard: Dashboard, results: list[PanelResult], window: Window, subtitle: list[str],
            path: Path) -> None:
    lines = [wrapped for line in subtitle for wrapped in textwrap.wrap(line, LINE_CHARS)]
    canvas = Canvas(dashboard.grid_rows, TITLE_PX + LINE_PX * len(lines) + 10)
    canvas.text(MARGIN_PX, 12, dashboard.title, fontsize=17, weight="bold", color="#e6e6ee")
    for index, line in enumerate(lines):
        canvas.text(MARGIN_PX, TITLE_PX + index * LINE_PX, line, fontsize=9, color=MUTED)
    for result in results:
        draw_panel(canvas, result, window)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.figure.savefig(path, facecolor=BACKGROUND)


def draw_panel(canvas: Canvas, result: PanelResult, window: Window) -> None:
    """One panel: a row header, or a framed panel with its title and content."""
    panel, box = result.panel, canvas.panel_box(result.panel)
    if panel.type == "row":
        canvas.text(box.left, box.top + 6, panel.title, fontsize=12, weight="bold", color="#e6e6ee")
        return
    frame = canvas.figure.add_axes(canvas.rect(box), facecolor=PANEL, zorder=0)
    frame.set_xticks([])
    frame.set_yticks([])
    for spine in frame.spines.values():
        spine.set_color(BORDER)
    canvas.text(box.left + 8, box.top + 6, _fit(panel.title, box.width, 6.6), fontsize=10, weight="bold")
    if not result.has_data:
        draw_no_data(canvas, box, result.no_data_reason or "the panel has no PromQL target")
    elif panel.type == "stat":
        draw_stat(canvas, box, result)
    elif panel.type == "bargauge":
        draw_bars(canvas, box, result)
    else:
        draw_timeseries(canvas, box, result, window)


def _fit(text: str, width_px: float, char_px: float) -> str:
    limit = int((width_px - 16) / char_px)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draw_no_data(canvas: Canvas, box: Box, reason: str) -> None:
    """Grafana's empty panel, and the reason it is empty."""
    middle = box.top + box.height / 2
    canvas.text(box.left + box.width / 2, middle - 4, "No data", fontsize=13, color=MUTED, ha="center", va="bottom")
    size_pt = 8.5 if box.width > 400 else 7.5
    wrapped = textwrap.fill(reason, width=int((box.width - 20) / (size_pt * 0.8)), break_long_words=False)
    canvas.text(box.left + box.width / 2, middle + 2, wrapped, fontsize=size_pt, color=MUTED, ha="center",
                style="italic", linespacing=1.3)


def _named_series(result: PanelResult) -> list[tuple[str, Series]]:
    return [(legend_name(target.target.legend, series.labels), series)
            for target in result.targets for series in target.series if series.finite]


def draw_stat(canvas: Canvas, box: Box, result: PanelResult) -> None:
    """Each series' last value, big and centred; names shown when there are several."""
    named = _named_series(result)
    slot = box.width / len(named)
    for index, (name, series) in enumerate(named):
        text = format_value(last_finite(series.values), result.panel.unit, result.panel.decimals)
        size_pt = min(box.height * 0.2, (slot - 24) / (len(text) * STAT_CHAR_EM * DPI / 72))
        centre = box.left + slot * (index + 0.5)
        canvas.text(centre, box.top + box.height * 0.56, text, ha="center", va="center", weight="bold",
                    fontsize=size_pt, color=STAT_COLOR)
        if len(named) > 1:
            canvas.text(centre, box.top + box.height * 0.82, name, ha="center", fontsize=8.5, color=MUTED)


def draw_bars(canvas: Canvas, box: Box, result: PanelResult) -> None:
    """A horizontal bar per series, its name left and its value right, scaled to min..max."""
    named = sorted(_named_series(result), key=lambda item: item[0])
    values = [last_finite(series.values) for _, series in named]
    unit, decimals = result.panel.unit, result.panel.decimals
    top = result.panel.max_value if result.panel.max_value is not None else max(max(values), 1e-12)
    inner = Box(box.left + 110, box.top + 34, box.width - 110 - 100, box.height - 46)
    axes = canvas.figure.add_axes(canvas.rect(inner), facecolor=PANEL, zorder=1)
    axes.axis("off")
    axes.set_xlim(result.panel.min_value or 0, top)
    axes.set_ylim(len(named) - 0.5, -0.5)
    axes.barh(range(len(named)), [top] * len(named), height=0.62, color="#22252b")
    for index, value in enumerate(values):
        color = PALETTE[index % len(PALETTE)]
        axes.barh(index, min(value, top), height=0.62, color=color, alpha=0.9)
        row_px = inner.top + inner.height * (index + 0.5) / len(named)
        canvas.text(box.left + 10, row_px, _fit(named[index][0], 110, 6.2), va="center", fontsize=9)
        canvas.text(box.left + box.width - 10, row_px, format_value(value, unit, decimals), va="center",
                    ha="right", fontsize=11, weight="bold", color=color)


def draw_timeseries(canvas: Canvas, box: Box, result: PanelResult, window: Window) -> None:
    """Lines over the window (stacked when the panel stacks), a legend with max and last, notes for empty targets."""
    named = _named_series(result)
    columns = max(1, int(box.width // 300))
    legend_rows = math.ceil(len(named) / columns)
    inner = Box(box.left + 62, box.top + 30, box.width - 76, box.height - 30 - 24 - legend_rows * 15 - 8)
    axes = canvas.figure.add_axes(canvas.rect(inner), facecolor=PANEL, zorder=1)
    _style_axes(axes, result.panel, window)
    stack: dict[float, float] = {}
    for index, (name, series) in enumerate(named):
        times = [datetime.fromtimestamp(t, tz=UTC) for t in series.times_s]
        base = [stack.get(t, 0.0) for t in series.times_s] if result.panel.stacked else [0.0] * len(times)
        tops = [b + (v if math.isfinite(v) else 0.0) for b, v in zip(base, series.values)] \
            if result.panel.stacked else list(series.values)
        if result.panel.stacked:
            stack.update(zip(series.times_s, tops))
        color = PALETTE[index % len(PALETTE)]
        axes.plot(times, tops, color=color, linewidth=1.3, label=_legend_label(name, series, result.panel))
        axes.fill_between(times, base, tops, color=color, alpha=0.10, linewidth=0)
    drawn = [v for _, series in named for v in series.values if math.isfinite(v)]
    _finish_axes(axes, result.panel, min(drawn), max(drawn))
    _legend(canvas, axes, inner, columns)
    empty = [t.target.legend or t.target.ref_id for t in result.targets if not t.has_data]
    if empty:
        canvas.text(box.left + box.width - 10, box.top + 8, "no data: " + ", ".join(empty), ha="right",
                    fontsize=8, color=MUTED, style="italic")


def _legend_label(name: str, series: Series, panel: Panel) -> str:
    finite = [v for v in series.values if math.isfinite(v)]
    peak, last = format_value(max(finite), panel.unit, panel.decimals), \
        format_value(last_finite(series.values), panel.unit, panel.decimals)
    return f"{_fit(name, 170, 6.2)}   max {peak}   last {last}"


def _style_axes(axes, panel: Panel, window: Window) -> None:
    axes.set_xlim(datetime.fromtimestamp(window.start_s, tz=UTC), datetime.fromtimestamp(window.end_s, tz=UTC))
    axes.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=4, maxticks=8, tz=UTC))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if window.range_s < 3600 else "%H:%M", tz=UTC))
    axes.yaxis.set_major_locator(MaxNLocator(4))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: tick_label(value, panel.unit)))
    axes.tick_params(colors=MUTED, labelsize=8, length=0)
    axes.grid(True, color=GRID, linewidth=0.8)
    for spine in axes.spines.values():
        spine.set_visible(False)


def _finish_axes(axes, panel: Panel, lowest: float, highest: float) -> None:
    """Y from the panel's min/max, else from 0 (or the lowest value, when negative) to a little above the top."""
    low = panel.min_value if panel.min_value is not None else min(0.0, lowest)
    high = panel.max_value if panel.max_value is not None else axes.get_ylim()[1]
    if highest <= low or high <= low:
        high = low + 1
    axes.set_ylim(low, high)


def _legend(canvas: Canvas, axes, inner: Box, columns: int) -> None:
    left, top = canvas.rect(Box(inner.left - 54, inner.top + inner.height + 20, 0, 0))[:2]
    axes.legend(loc="upper left", bbox_to_anchor=(left, top), bbox_transform=canvas.figure.transFigure,
                ncol=columns, fontsize=8, frameon=False, labelcolor=TEXT, handlelength=1.4,
                handletextpad=0.5, columnspacing=2.0, borderaxespad=0, labelspacing=0.35)
