"""Results as rows, targets judged honestly, and the Markdown written to bench/results/."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.machine import Cores, Machine


@dataclass(frozen=True)
class Target:
    """A goal beside a figure: its text, and the test of the row's value (or ratio)."""

    text: str
    met: Callable[[Row], bool]


@dataclass(frozen=True)
class Row:
    """One figure: the gateway's value, the reference it is compared with, and its target."""

    key: str
    measurement: str
    value: float
    unit: str
    reference: float | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value ÷ reference; None when either is missing or not positive (noise can make a difference negative)."""
        if self.reference is None or math.isnan(self.reference) or math.isnan(self.value):
            return None
        if self.reference <= 0 or self.value < 0:
            return None
        return self.value / self.reference

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if math.isnan(self.value):
            return "n/a"
        return "PASS" if self.target.met(self) else "MISS"


@dataclass
class SectionResult:
    """What one section measured: rows for the table, Markdown details below it."""

    title: str
    rows: list[Row] = field(default_factory=list)
    details: str = ""


def ratio_at_most(limit: float) -> Target:
    return Target(f"≤ {limit:g}× reference", lambda row: row.ratio is not None and row.ratio <= limit)


def ratio_at_least(limit: float) -> Target:
    return Target(f"≥ {limit:.0%} of reference" if limit < 1 else f"≥ {limit:g}× reference",
                  lambda row: row.ratio is not None and row.ratio >= limit)


def value_below(limit: float, unit: str) -> Target:
    return Target(f"< {limit:g} {unit}", lambda row: row.value < limit)


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers; NaN when there are none."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def percentile(values: list[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def fmt(value: float | None, unit: str = "") -> str:
    """A figure with 3 significant digits (and its unit)."""
    if value is None:
        return ""
    if math.isnan(value):
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def title_number(title: str) -> int:
    """The number a section title starts with ("5. Memory" -> 5); 0 when none."""
    head = title.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def in_numbered_order(sections: list[SectionResult]) -> list[SectionResult]:
    """Sections by their title's number, whatever order they ran in."""
    return sorted(sections, key=lambda section: title_number(section.title))


def table(sections: list[SectionResult]) -> str:
    """The Markdown results table, one row per figure, grouped by section."""
    lines = ["| id | measurement | gateway | reference | ratio | target | result | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for section in sections:
        lines.append(f"| | **{section.title}** | | | | | | |")
        for row in section.rows:
            ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
            cells = [f"`{row.key}`", row.measurement, fmt(row.value, row.unit), fmt(row.reference, row.unit),
                     ratio, row.target.text if row.target else "", row.verdict, row.note]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def summary(sections: list[SectionResult]) -> str:
    """A few lines for the README: every targeted figure and its verdict."""
    targeted = [row for section in sections for row in section.rows if row.target is not None]
    if not targeted:
        return "No targeted figures in this run."
    passed = sum(row.verdict == "PASS" for row in targeted)
    lines = [f"{passed} of {len(targeted)} targets met:"]
    for row in targeted:
        ratio = f" ({row.ratio:.2f}× reference)" if row.ratio is not None else ""
        lines.append(f"- {row.measurement}: {fmt(row.value, row.unit)}{ratio}, target {row.target.text}: "
                     f"**{row.verdict}**")
    return "\n".join(lines)


def document(sections: list[SectionResult], machine: Machine, cores: Cores, command: str,
             started: datetime) -> str:
    """The whole results page: header, summary, table, then each section's details."""
    sections = in_numbered_order(sections)
    parts = [
        "# Gateway performance",
        "",
        f"- when: {started:%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine.label()}",
        f"- pinning: {cores.describe()}",
        f"- command: `{command}`",
        "- reference: the bare aiohttp pass-through proxy (`bench/baseline_proxy.py`) in the same run, "
        "unless the measurement names another; added latency = contender − direct-to-upstream.",
        "- absolute figures are specific to this machine (and noisy on a shared one); ratios to the "
        "baseline measured in the same run are what to compare.",
        "",
        "## Summary",
        "",
        summary(sections),
        "",
        "## Results",
        "",
        table(sections),
    ]
    for section in sections:
        if section.details:
            parts += ["", f"## {section.title}", "", section.details.rstrip()]
    return "\n".join(parts) + "\n"


def write_results(text: str, out_dir: Path, started: datetime, dated_copy: bool) -> list[Path]:
    """Write latest.md (and a dated copy); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latest.md"]
    if dated_copy:
        paths.append(out_dir / f"{started:%Y-%m-%d-%H%M}.md")
    for path in paths:
        path.write_text(text, encoding="utf-8")
    return paths


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
