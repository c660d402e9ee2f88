"""2. Throughput at saturation, one worker: requests/s at concurrency 32 and 256, and CPU per request."""

from __future__ import annotations

from bench.measure import UNIQUE_CHAT, errors_note, interleaved, wrk_on, wrk_with_cpu
from bench.options import Options
from bench.report import Row, SectionResult, median, ratio_at_least
from bench.stack import Stack

TITLE = "2. Throughput at saturation, one worker"
NEEDS = ("gateway", "baseline")
KEYS = ("throughput.direct_c32", "throughput.baseline_c32", "throughput.gateway_c32", "throughput.gateway_c256",
        "throughput.gateway_cpu_us", "throughput.gateway_loop_cpu_us")
CONTENDERS = ("baseline", "gateway")


def run(stack: Stack, options: Options) -> SectionResult:
    figures = {}
    for connections, contenders in ((32, ("direct", *CONTENDERS)), (256, CONTENDERS)):
        figures[connections] = interleaved(contenders, options.runs,
                                           lambda name: _measure(stack, name, connections, options.duration_s))
    c32, c256 = figures[32], figures[256]

    def rps(results, name: str) -> float:
        return median(r.rps for r, _, _ in results[name])

    def cpu(name: str, index: int) -> float:
        return median(m[index] for m in c32[name])

    def errors(results, name: str) -> str:
        return errors_note([r for r, _, _ in results[name]])

    rows = [
        Row("throughput.direct_c32", "direct to nginx, c32 (wrk-bound)", rps(c32, "direct"), "req/s"),
        Row("throughput.baseline_c32", "baseline proxy, c32", rps(c32, "baseline"), "req/s",
            note=errors(c32, "baseline")),
        Row("throughput.gateway_c32", "gateway, c32 (ref: baseline c32)", rps(c32, "gateway"), "req/s",
            reference=rps(c32, "baseline"), target=ratio_at_least(0.7), note=errors(c32, "gateway")),
        Row("throughput.gateway_c256", "gateway, c256 (ref: baseline c256)", rps(c256, "gateway"), "req/s",
            reference=rps(c256, "baseline"), note=errors(c256, "gateway")),
        Row("throughput.gateway_cpu_us", "gateway CPU per request, all threads (ref: baseline)", cpu("gateway", 1),
            "µs", reference=cpu("baseline", 1)),
        Row("throughput.gateway_loop_cpu_us", "gateway CPU per request, event loop thread only",
            cpu("gateway", 2), "µs", reference=cpu("baseline", 2)),
    ]
    details = (f"wrk -t1 on the load core, {options.runs} × {options.duration_s} s per contender and concurrency; "
               f"the server under test alone on its core, so requests/s at c32 is one core's saturation. "
               f"Baseline c256: {rps(c256, 'baseline'):,.0f} req/s. "
               "CPU per request is read from /proc (utime + stime) over the c32 runs; the gateway's "
               "non-loop threads are the OTLP exporters.")
    return SectionResult(TITLE, rows, details)


def _measure(stack: Stack, name: str, connections: int, duration_s: int):
    if name == "direct":
        return wrk_on(stack, name, UNIQUE_CHAT, connections, duration_s), float("nan"), float("nan")
    return wrk_with_cpu(stack, name, UNIQUE_CHAT, connections, duration_s)
