"""1. Added latency at concurrency 1, non-streaming: contender − direct-to-nginx, p50 and p99."""

from __future__ import annotations

from bench.measure import UNIQUE_CHAT, check_answers, errors_note, interleaved, wrk_on
from bench.options import Options
from bench.report import Row, SectionResult, median, ratio_at_most
from bench.stack import Stack

TITLE = "1. Added latency, concurrency 1, non-streaming"
NEEDS = ("gateway", "baseline")
KEYS = ("latency.direct_p50", "latency.direct_p99", "latency.baseline_added_p50", "latency.baseline_added_p99",
        "latency.gateway_added_p50", "latency.gateway_added_p99")
CONTENDERS = ("direct", "baseline", "gateway")


def run(stack: Stack, options: Options) -> SectionResult:
    for name in CONTENDERS:
        check_answers(stack.url(name))
    results = interleaved(CONTENDERS, options.runs,
                          lambda name: wrk_on(stack, name, UNIQUE_CHAT, connections=1, duration_s=options.duration_s))
    direct = results["direct"]

    def added(name: str, pct: str) -> float:
        return median((getattr(r, pct) - getattr(d, pct)) / 1000 for r, d in zip(results[name], direct))

    def absolute(name: str, pct: str) -> float:
        return median(getattr(r, pct) / 1000 for r in results[name])

    baseline_p50, baseline_p99 = added("baseline", "p50_us"), added("baseline", "p99_us")
    rows = [
        Row("latency.direct_p50", "direct to nginx, p50", absolute("direct", "p50_us"), "ms"),
        Row("latency.direct_p99", "direct to nginx, p99", absolute("direct", "p99_us"), "ms"),
        Row("latency.baseline_added_p50", "baseline proxy, added p50", baseline_p50, "ms",
            note=errors_note(results["baseline"])),
        Row("latency.baseline_added_p99", "baseline proxy, added p99", baseline_p99, "ms"),
        Row("latency.gateway_added_p50", "gateway, added p50 (ref: baseline added p50)", added("gateway", "p50_us"),
            "ms", reference=baseline_p50, target=ratio_at_most(1.5), note=errors_note(results["gateway"])),
        Row("latency.gateway_added_p99", "gateway, added p99 (ref: baseline added p99)", added("gateway", "p99_us"),
            "ms", reference=baseline_p99),
    ]
    runs = ", ".join(f"{r.p50_us / 1000:.2f}" for r in results["gateway"])
    return SectionResult(TITLE, rows, f"wrk -t1 -c1, {options.runs} × {options.duration_s} s per contender, "
                                      f"interleaved; gateway p50 per run (ms): {runs}.")
