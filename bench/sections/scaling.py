"""6. Scaling: throughput of `gateway run --workers 1` against `--workers 2` on the same cores."""

from __future__ import annotations

from bench.measure import UNIQUE_CHAT, check_answers, errors_note, interleaved, wrk_on
from bench.options import Options
from bench.report import Row, SectionResult, median, ratio_at_least
from bench.stack import Stack

TITLE = "6. Scaling with worker processes"
#: one worker is the main gateway, on its own server core; two workers get the scaling cores
NEEDS = ("gateway", "gateway-w2")
#: cores needed for a fair judgement: two for the workers, others for wrk, nginx and the sink
FAIR_CORES = 4
KEYS = ("scaling.w1_rps", "scaling.w2_rps")
CONNECTIONS = 64


def run(stack: Stack, options: Options) -> SectionResult:
    cores = stack.cores
    for name in NEEDS:
        check_answers(stack.url(name))
    results = interleaved(NEEDS, options.runs,
                          lambda name: wrk_on(stack, name, UNIQUE_CHAT, CONNECTIONS, options.duration_s))
    w1, w2 = (median(r.rps for r in results[name]) for name in NEEDS)
    fair = len(cores.every) >= FAIR_CORES
    note = "" if fair else (f"not judged: {len(cores.every)} cores, so the two workers share them with wrk, "
                            "nginx and the sink")
    rows = [
        Row("scaling.w1_rps", "1 worker (its own core), c64", w1, "req/s", note=errors_note(results["gateway"])),
        Row("scaling.w2_rps", "2 workers, c64 (ref: 1 worker)", w2, "req/s", reference=w1,
            target=ratio_at_least(1.7) if fair else None,
            note="; ".join(filter(None, [note, errors_note(results["gateway-w2"])]))),
    ]
    where = ",".join(map(str, cores.scaling)) or "any"
    details = (f"One worker on CPU {','.join(map(str, cores.server)) or 'any'}, two workers on CPU {where}; wrk -t1 -c{CONNECTIONS} on CPU "
               f"{','.join(map(str, cores.load)) or 'any'}, {options.runs} × {options.duration_s} s each, "
               "interleaved. Two workers can only approach 2× when each has a core of its own and the load "
               "generator and upstream have others: on fewer than 4 cores the ratio measures the machine and is "
               "not judged. Both gateways keep their stores in memory, per process.")
    return SectionResult(TITLE, rows, details)
