"""Running a panel's PromQL through Prometheus's HTTP API, and saying why a panel has no data."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from deploy.render.dashboard import Panel, Target, interpolate

KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                      "and", "or", "unless", "inf", "nan"})
OFFSET = re.compile(r"\boffset\s+(\w+)")
#: why a metric can be missing on a machine without GPUs
MISSING_HINTS = (
    ("DCGM_", "needs NVIDIA's DCGM exporter on GPU hosts; no GPU here"),
    ("gateway_energy_joules", "energy is attributed only where GPUs are sampled; no GPU here"),
)


class PrometheusError(RuntimeError):
    """Prometheus could not be reached, or refused a query."""


@dataclass(frozen=True)
class Series:
    """One result series: its labels and (time, value) points; an instant query has one point."""

    labels: dict[str, str]
    times_s: tuple[float, ...]
    values: tuple[float, ...]

    @property
    def finite(self) -> bool:
        return any(math.isfinite(v) for v in self.values)


@dataclass
class TargetResult:
    target: Target
    expr: str                                   # after interpolation
    series: list[Series] = field(default_factory=list)
    error: str | None = None

    @property
    def has_data(self) -> bool:
        return any(s.finite for s in self.series)


@dataclass
class PanelResult:
    panel: Panel
    targets: list[TargetResult]
    no_data_reason: str | None = None

    @property
    def has_data(self) -> bool:
        return any(t.has_data for t in self.targets)


class PrometheusApi:
    """The few endpoints of Prometheus's HTTP API the renderer needs."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Mapping[str, str]) -> dict:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise PrometheusError(_error_text(exc)) from exc
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"{url}: {exc}") from exc
        if answer.get("status") != "success":
            raise PrometheusError(answer.get("error", "query failed"))
        return answer["data"]

    def query(self, expr: str, at_s: float) -> list[Series]:
        """An instant query at `at_s` (Unix seconds)."""
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at_s:.3f}"})
        return _series(data)

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[Series]:
        """A range query from `start_s` to `end_s` every `step_s` seconds."""
        data = self._get("/api/v1/query_range", {"query": expr, "start": f"{start_s:.3f}",
                                                 "end": f"{end_s:.3f}", "step": f"{step_s:g}"})
        return _series(data)

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus holds."""
        return set(self._get("/api/v1/label/__name__/values", {}))


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return json.loads(exc.read()).get("error", str(exc))
    except ValueError:
        return str(exc)


def _series(data: dict) -> list[Series]:
    kind, result = data["resultType"], data["result"]
    if kind == "scalar":
        return [Series({}, (float(result[0]),), (float(result[1]),))]
    if kind == "vector":
        return [Series(item["metric"], (float(item["value"][0]),), (float(item["value"][1]),)) for item in result]
    return [Series(item["metric"], tuple(float(t) for t, _ in item["values"]),
                   tuple(float(v) for _, v in item["values"])) for item in result]


@dataclass(frozen=True)
class Window:
    """The time window drawn: Unix seconds, and the step of range queries."""

    start_s: float
    end_s: float
    step_s: float

    @property
    def range_s(self) -> float:
        return self.end_s - self.start_s


def evaluate_panel(api: PrometheusApi, panel: Panel, values: Mapping[str, str], window: Window,
                   known_metrics: set[str]) -> PanelResult:
    """Run every target of `panel`: an instant query at the window's end, or a range query over it."""
    results = []
    for target in panel.targets:
        expr = interpolate(target.expr, values)
        result = TargetResult(target, expr)
        try:
            if panel.instant:
                result.series = api.query(expr, window.end_s)
            else:
                result.series = api.query_range(expr, window.start_s, window.end_s, window.step_s)
        except PrometheusError as exc:
            result.error = str(exc)
        results.append(result)
    evaluated = PanelResult(panel, results)
    if not evaluated.has_data and panel.targets:
        evaluated.no_data_reason = no_data_reason(results, known_metrics, window)
    return evaluated


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, keywords or label names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    # PromQL's keywords are case-insensitive: `BY (tenant)` groups as `by (tenant)` does
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.IGNORECASE)
    names = re.findall(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in KEYWORDS}


def no_data_reason(results: list[TargetResult], known_metrics: set[str], window: Window) -> str:
    """Why a panel's queries returned nothing, as plainly as the data allows."""
    errors = [r.error for r in results if r.error]
    if errors:
        return f"query error: {errors[0]}"
    exprs = " ".join(r.expr for r in results)
    missing = sorted(metric_names_in(exprs) - known_metrics)
    for prefix, hint in MISSING_HINTS:
        if any(name.startswith(prefix) for name in missing):
            return f"no series {', '.join(missing)}: {hint}"
    if missing:
        return f"no series {', '.join(missing)} in Prometheus"
    offsets = OFFSET.findall(exprs)
    if offsets:
        return (f"needs history from {offsets[0]} earlier; this run's data spans "
                f"{window.range_s / 60:.0f} min")
    if any(r.series for r in results):
        return "the query returned only NaN (0/0) in this window"
    return "the query returned no series in this window"
