"""7. Cost of each feature: CPU µs per request by pipeline stage from profiles, and telemetry on/off.

Two gateways run under cProfile: one with telemetry off, whose stage figures
are each feature's own cost, and one with telemetry on, which shows where the
OpenTelemetry SDK spends. The main gateway against one with
OTEL_SDK_DISABLED=true, unprofiled, gives telemetry's whole cost (exporter
threads included) and the CPU figures that scale the profiles.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from bench.measure import UNIQUE_CHAT, check_answers, errors_note, interleaved, wrk_on, wrk_with_cpu
from bench.options import Options
from bench.procs import BenchSetupError
from bench.profile_stats import STAGE_MODULES, StageProfile, hotspot_table, load_profile
from bench.report import Row, SectionResult, median
from bench.stack import Stack

TITLE = "7. Cost of each feature"
PROFILED = {"on": "gateway-profiled", "off": "gateway-profiled-notel"}
AB = {"on": "gateway", "off": "gateway-notel", "sampled": "gateway-sampled"}
NEEDS = (*PROFILED.values(), *AB.values())
KEYS = ("features.loop_cpu_us", *(f"features.stage.{name}" for name in STAGE_MODULES), "features.pipeline_other",
        "features.outside_pipeline", "features.telemetry_hooks", "features.telemetry_cpu_us",
        "features.telemetry_loop_cpu_us", "features.telemetry_added_p50", "features.telemetry_c32_rps",
        "features.sampled_cpu_us", "features.sampled_c32_rps")
CONNECTIONS = 32


def run(stack: Stack, options: Options) -> SectionResult:
    for name in NEEDS:
        check_answers(stack.url(name))
    profiles = {mode: _profile(stack, name, options) for mode, name in PROFILED.items()}
    contenders = tuple(AB.values())
    latency = interleaved(contenders, options.runs, lambda name: wrk_on(stack, name, UNIQUE_CHAT, 1, options.duration_s))
    loaded = interleaved(contenders, options.runs,
                         lambda name: wrk_with_cpu(stack, name, UNIQUE_CHAT, CONNECTIONS, options.duration_s))

    def cpu(mode: str, index: int) -> float:
        return median(m[index] for m in loaded[AB[mode]])

    def rps(mode: str) -> float:
        return median(m[0].rps for m in loaded[AB[mode]])

    scales = {mode: cpu(mode, 2) / profile.total_us if profile.total_us else float("nan")
              for mode, (profile, _) in profiles.items()}
    added_p50 = median((on.p50_us - off.p50_us) / 1000 for on, off in zip(latency[AB["on"]], latency[AB["off"]]))
    on, off = profiles["on"][0], profiles["off"][0]
    rows = _stage_rows(off, scales["off"], cpu("off", 2)) + [
        Row("features.telemetry_hooks", "telemetry hooks on the event loop (from the telemetry-on profile)",
            on.telemetry_us * scales["on"], "µs", note="profiled µs × scale; exporter threads not included"),
        Row("features.telemetry_cpu_us", "telemetry on: CPU per request, all threads (ref: OTEL_SDK_DISABLED)",
            cpu("on", 1), "µs", reference=cpu("off", 1), note=errors_note([m[0] for m in loaded[AB["on"]]])),
        Row("features.telemetry_loop_cpu_us", "telemetry on: CPU per request, event loop thread (ref: off)",
            cpu("on", 2), "µs", reference=cpu("off", 2)),
        Row("features.telemetry_added_p50", "telemetry on − off: latency p50 at c1", added_p50, "ms"),
        Row("features.telemetry_c32_rps", "telemetry on: throughput c32 (ref: off)", rps("on"), "req/s",
            reference=rps("off")),
        Row("features.sampled_cpu_us", "traces sampled at 10% (parentbased_traceidratio), metrics in full: "
            "CPU per request, all threads (ref: off)", cpu("sampled", 1), "µs", reference=cpu("off", 1)),
        Row("features.sampled_c32_rps", "traces sampled at 10%: throughput c32 (ref: off)", rps("sampled"), "req/s",
            reference=rps("off")),
    ]
    exported = stack.sink_stats()
    details = "\n".join([
        f"Profiles: two gateways run under cProfile (timer: the event loop thread's CPU time), wrk -c{CONNECTIONS} "
        f"for {options.duration_s} s each ({profiles['off'][1]:,} requests with telemetry off, "
        f"{profiles['on'][1]:,} on). cProfile inflates Python calls, so figures are scaled by the unprofiled twin's "
        f"event-loop CPU per request at c{CONNECTIONS} ÷ the profiled one: {scales['off']:.2f} with telemetry "
        f"off, {scales['on']:.2f} on; functions with many tiny calls are over-weighted. Stage rows come from the "
        "telemetry-off profile, so each is the feature's own cost; they are cumulative (a stage includes what "
        "it calls). The telemetry A/B runs the main gateway against one with OTEL_SDK_DISABLED=true, "
        "interleaved, exporter threads included.",
        "", "Per request with telemetry on: " + "; ".join(f"{label}: {count:.1f}" for label, count in on.counts.items())
        + f". The OTLP sink received {exported['traces']['requests']:,} trace exports "
        f"({exported['traces']['bytes'] / 1e6:.1f} MB) and {exported['metrics']['requests']:,} metric exports.",
        "", "Telemetry on, hotspots by self time:", "", hotspot_table(on.hotspots, scales["on"]),
        "", "Telemetry off, hotspots by self time:", "", hotspot_table(off.hotspots, scales["off"]),
        "", "Telemetry off, gateway functions by cumulative time (stage methods and the pipeline left out):", "",
        hotspot_table(off.gateway_hotspots, scales["off"]),
    ])
    return SectionResult(TITLE, rows, details)


def _profile(stack: Stack, name: str, options: Options) -> tuple[StageProfile, int]:
    """Profile one gateway over one wrk run; (its attribution, requests served)."""
    if options.duration_s >= 3:
        wrk_on(stack, name, UNIQUE_CHAT, CONNECTIONS, 1)                  # warm-up
    path = stack.profile_path(name)
    stack.send_signal(name, signal.SIGUSR1)
    profiled = wrk_on(stack, name, UNIQUE_CHAT, CONNECTIONS, options.duration_s)
    stack.send_signal(name, signal.SIGUSR2)
    _wait_for(path.with_name(path.name + ".done"))
    return load_profile(path, profiled.requests), profiled.requests


def _stage_rows(profile: StageProfile, scale: float, loop_us: float) -> list[Row]:
    note = "telemetry off; profiled µs × scale"
    rows = [Row("features.loop_cpu_us", f"event loop CPU per request, telemetry off, unprofiled, c{CONNECTIONS}",
                loop_us, "µs", note=f"profiled: {profile.total_us:.0f} µs (scale {scale:.2f})")]
    rows += [Row(f"features.stage.{name}", f"stage `{name}` (handle + finish)", us * scale, "µs", note=note)
             for name, us in profile.stages_us.items()]
    stages_total = sum(profile.stages_us.values())
    return rows + [
        Row("features.pipeline_other", "pipeline loop itself (run − stages)",
            (profile.pipeline_us - stages_total) * scale, "µs", note=note),
        Row("features.outside_pipeline", "outside the pipeline: aiohttp server and client protocol, "
            "uvloop I/O, background tasks", (profile.total_us - profile.pipeline_us) * scale, "µs", note=note),
    ]


def _wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchSetupError(f"the profiled gateway wrote no profile to {path}")
        time.sleep(0.1)
