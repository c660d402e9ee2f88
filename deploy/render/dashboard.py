"""A Grafana dashboard JSON as plain data: panels, their grid positions, units and PromQL targets.

Also Grafana's template-variable interpolation for a Prometheus data source:
dashboard variables at their saved defaults (or overrides), and the built-ins
`$__range`, `$__rate_interval` and `$__interval` for the rendered window.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: panel types Grafana queries at one instant (the others get a range query)
INSTANT_TYPES = frozenset({"stat", "gauge", "bargauge", "table", "piechart"})
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


@dataclass(frozen=True)
class GridPos:
    """Where a panel sits: Grafana's 24-column grid, `h` in grid rows."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Target:
    ref_id: str
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    id: int
    type: str
    title: str
    grid: GridPos
    unit: str = "short"
    decimals: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    stacked: bool = False
    targets: tuple[Target, ...] = ()

    @property
    def instant(self) -> bool:
        """Whether Grafana evaluates this panel at one instant (stat, gauge, bar gauge, table)."""
        return self.type in INSTANT_TYPES or any(target.instant for target in self.targets)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    variables: tuple[dict, ...]

    @property
    def grid_rows(self) -> int:
        """How many grid rows the dashboard is tall."""
        return max((p.grid.y + p.grid.h for p in self.panels), default=0)


def load_dashboard(path: Path) -> Dashboard:
    """Read a dashboard JSON file, rows' nested panels included, in grid order."""
    raw = json.loads(Path(path).read_text())
    panels = []
    for item in raw.get("panels", []):
        panels.append(_panel(item))
        panels.extend(_panel(nested) for nested in item.get("panels", []) if item.get("collapsed"))
    panels.sort(key=lambda p: (p.grid.y, p.grid.x))
    return Dashboard(uid=raw.get("uid", Path(path).stem), title=raw.get("title", Path(path).stem),
                     panels=tuple(panels), variables=tuple(raw.get("templating", {}).get("list", [])))


def _panel(raw: dict) -> Panel:
    defaults = raw.get("fieldConfig", {}).get("defaults", {})
    grid = raw.get("gridPos", {})
    targets = tuple(Target(ref_id=t.get("refId", ""), expr=t["expr"], legend=t.get("legendFormat", ""),
                           instant=bool(t.get("instant")) and not t.get("range"))
                    for t in raw.get("targets", []) if t.get("expr") and not t.get("hide"))
    return Panel(id=raw.get("id", 0), type=raw.get("type", "timeseries"), title=raw.get("title", ""),
                 grid=GridPos(grid.get("x", 0), grid.get("y", 0), grid.get("w", 12), grid.get("h", 8)),
                 unit=defaults.get("unit", "short"), decimals=defaults.get("decimals"),
                 min_value=defaults.get("min"), max_value=defaults.get("max"),
                 stacked=defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal", targets=targets)


def variable_values(dashboard: Dashboard, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each dashboard variable as Grafana would interpolate it into PromQL, at its saved default."""
    values = {}
    for variable in dashboard.variables:
        name = variable["name"]
        values[name] = overrides[name] if overrides and name in overrides else _default(variable)
    return values


def _default(variable: dict) -> str:
    """A variable's saved current value; `All` becomes its allValue (or every option, as a regex)."""
    current = variable.get("current", {}).get("value", variable.get("query", ""))
    chosen = current if isinstance(current, list) else [current]
    if "$__all" in chosen:
        if variable.get("allValue"):
            return variable["allValue"]
        chosen = [o["value"] for o in variable.get("options", []) if o.get("value") != "$__all"]
    if len(chosen) == 1:
        return str(chosen[0])
    return "(" + "|".join(re.escape(str(value)) for value in chosen) + ")"


def builtin_values(*, range_s: float, step_s: float, rate_interval: str) -> dict[str, str]:
    """Grafana's built-in variables for a window of `range_s` seconds drawn every `step_s`."""
    return {"__range": f"{round(range_s)}s", "__range_s": str(round(range_s)),
            "__range_ms": str(round(range_s * 1000)), "__interval": f"{max(1, round(step_s))}s",
            "__interval_ms": str(max(1000, round(step_s * 1000))), "__rate_interval": rate_interval}


def interpolate(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with `$name`, `${name}` and `[[name]]` replaced; unknown names are left as they are."""
    def replace(found: re.Match) -> str:
        name = found[1] or found[2] or found[3]
        return values.get(name, found[0])
    return VARIABLE.sub(replace, expr)
