"""Reading a gateway cProfile: CPU per request by pipeline stage, telemetry hooks, and hotspots.

The profile is taken with `time.thread_time` as the timer, so it holds the
event loop thread's CPU time (uvloop's own C work shows up under its
`run_forever`). Coroutines are resumed many times; cProfile counts each
resumption as a call, so per-request figures divide by requests, not calls.
"""

from __future__ import annotations

import pstats
from dataclasses import dataclass
from pathlib import Path

#: pipeline stage -> module under gateway/stages/, in pipeline order (`cache` holds both cache stages, the
#: lookup before admission and the answer after it)
STAGE_MODULES = {"observe": "observe", "identify": "identify", "parse": "parse", "count": "count",
                 "route": "route", "admit": "admit", "cache": "cache", "account": "account", "call": "call"}
STAGE_METHODS = ("handle", "finish")
TELEMETRY_HOOKS = ("start_request", "route_span", "cache_span", "start_attempt", "end_attempt", "finish_request")
#: things counted per request: label -> (file suffix, function names)
COUNTED = {    # the gateway's own telemetry (it drafts spans and sums metrics itself, not through the SDK's calls)
    "spans drafted (server and children)": ("gateway/telemetry/spans.py", ("server", "child")),
    "spans handed to the exporter": ("gateway/telemetry/spans.py", ("_readable",)),
    "counter additions": ("gateway/telemetry/sums.py", ("add",)),
    "histogram records": ("gateway/telemetry/histograms.py", ("record",)),
}

Key = tuple[str, int, str]


@dataclass(frozen=True)
class Hotspot:
    """One function's CPU per request."""

    where: str
    self_us: float
    cumulative_us: float


@dataclass(frozen=True)
class StageProfile:
    """CPU µs per request (as profiled) by stage, and the totals around them."""

    total_us: float
    stages_us: dict[str, float]
    pipeline_us: float
    telemetry_us: float
    counts: dict[str, float]            # calls per request of the COUNTED functions
    hotspots: list[Hotspot]
    gateway_hotspots: list[Hotspot]


def load_profile(path: Path, requests: int, top: int = 15) -> StageProfile:
    """Attribute the profile at `path`, taken over `requests` requests."""
    stats = pstats.Stats(str(path)).stats      # {(file, line, func): (cc, nc, tt, ct, callers)}
    per = 1e6 / max(requests, 1)

    def cumulative(match) -> float:
        return sum(ct for key, (_, _, _, ct, _) in stats.items() if match(key)) * per

    stages = {name: cumulative(lambda k, m=module: _in(k, f"gateway/stages/{m}.py") and k[2] in STAGE_METHODS)
              for name, module in STAGE_MODULES.items()}
    pipeline = cumulative(lambda k: _in(k, "gateway/pipeline.py") and k[2] == "run")
    telemetry = cumulative(lambda k: _in(k, "gateway/telemetry/tracing.py") and k[2] in TELEMETRY_HOOKS)
    total = sum(tt for _, _, tt, _, _ in stats.values()) * per
    counts = {label: sum(nc for key, (_, nc, _, _, _) in stats.items() if _in(key, suffix) and key[2] in names)
              / max(requests, 1) for label, (suffix, names) in COUNTED.items()}
    hotspots = [Hotspot(_where(k), tt * per, ct * per) for k, (_, _, tt, ct, _) in stats.items()]
    by_self = sorted(hotspots, key=lambda h: h.self_us, reverse=True)[:top]
    ours = [h for h in hotspots if h.where.startswith("gateway/") and not h.where.startswith("gateway/stages/")
            and "pipeline.py" not in h.where]
    by_cumulative = sorted(ours, key=lambda h: h.cumulative_us, reverse=True)[:top]
    return StageProfile(total, stages, pipeline, telemetry, counts, by_self, by_cumulative)


def _in(key: Key, suffix: str) -> bool:
    return key[0].replace("\\", "/").endswith(suffix)


def _where(key: Key) -> str:
    """`package/module.py:line function`, shortened to the part after site-packages or the repo."""
    file, line, func = key
    if file == "~":
        return func                                      # a builtin, e.g. <method 'run_forever' ...>
    path = file.replace("\\", "/")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        for root in ("gateway/", "bench/"):
            if f"/{root}" in path:
                path = root + path.split(f"/{root}", 1)[1]
                break
    return f"{path}:{line} {func}"


def hotspot_table(hotspots: list[Hotspot], scale: float) -> str:
    """A Markdown table of hotspots, profiled and scaled to unprofiled CPU."""
    lines = ["| function | self µs/req | cumulative µs/req | self, scaled µs/req |", "| --- | --- | --- | --- |"]
    for spot in hotspots:
        lines.append(f"| `{spot.where}` | {spot.self_us:.1f} | {spot.cumulative_us:.1f} | "
                     f"{spot.self_us * scale:.1f} |")
    return "\n".join(lines)
