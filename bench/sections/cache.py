"""4. Cache hits: latency through a gateway whose cache is a real redis-server on loopback."""

from __future__ import annotations

import time
from collections import Counter

from bench.measure import UNIQUE_CHAT, check_answers, errors_note, interleaved, wrk_on
from bench.options import Options
from bench.report import Row, SectionResult, median, value_below
from bench.stack import API_KEYS, Stack
from bench.wrk import Load, WrkResult

TITLE = "4. Cache hits (Redis)"
NEEDS = ("gateway-redis", "gateway-redis-notel")
GATEWAY = "gateway-redis"
#: the same gateway and Redis with OTEL_SDK_DISABLED=true: how much of a hit is telemetry
NO_TELEMETRY = "gateway-redis-notel"
KEYS = ("cache.hit_p50", "cache.hit_p99", "cache.hit_notel_p50", "cache.miss_redis_p50", "cache.miss_redis_p99")
#: the same body every time, one key: every request after the first is a hit
SAME_CHAT = Load(model="gpt-4o-mini", keys=API_KEYS[:1], mode="same")
LOADS = {"hit": SAME_CHAT, "miss": UNIQUE_CHAT}
#: what each kind of run measures: (gateway, load)
RUNS = {"hit": (GATEWAY, SAME_CHAT), "miss": (GATEWAY, UNIQUE_CHAT), "hit-notel": (NO_TELEMETRY, SAME_CHAT)}


def run(stack: Stack, options: Options) -> SectionResult:
    for name in (GATEWAY, NO_TELEMETRY):
        check_answers(stack.url(name))
    time.sleep(0.3)                      # the cache write runs in the background
    seen = check_answers(stack.url(GATEWAY)).get("x-gateway-cache", "?")
    commands: dict[str, Counter] = {kind: Counter() for kind in LOADS}
    requests: Counter = Counter()

    def measure(kind: str) -> WrkResult:
        name, load = RUNS[kind]
        before = stack.redis_commands()
        result = wrk_on(stack, name, load, 1, options.duration_s)
        time.sleep(0.2)                  # let the background writes of the last requests land
        after = stack.redis_commands()
        if kind in commands:
            commands[kind].update({command: after[command] - before.get(command, 0) for command in after})
            requests[kind] += result.requests
        return result

    results = interleaved(tuple(RUNS), options.runs, measure)

    def ms(kind: str, pct: str) -> float:
        return median(getattr(r, pct) / 1000 for r in results[kind])

    # the measured requests themselves: a hit writes nothing, so cache writes during hit runs mean misses
    writes = commands["hit"]["set"] / max(requests["hit"], 1)
    hit_note = "; ".join(filter(None, [
        errors_note(results["hit"]),
        "" if seen == "hit" else f"sanity repeat was a {seen}, not a hit!",
        f"{writes:.1%} of the hit runs' requests wrote to the cache: not all were hits!" if writes > 0.01 else ""]))
    rows = [
        Row("cache.hit_p50", "cache hit, p50 (ref: miss with Redis)", ms("hit", "p50_us"), "ms",
            reference=ms("miss", "p50_us"), target=value_below(1.0, "ms"), note=hit_note),
        Row("cache.hit_p99", "cache hit, p99 (ref: miss with Redis)", ms("hit", "p99_us"), "ms",
            reference=ms("miss", "p99_us")),
        Row("cache.hit_notel_p50", "cache hit, p50, telemetry off (OTEL_SDK_DISABLED)", ms("hit-notel", "p50_us"),
            "ms", note=errors_note(results["hit-notel"])),
        Row("cache.miss_redis_p50", "miss with Redis (limits, lookup, single-flight lock, write), p50",
            ms("miss", "p50_us"), "ms", note=errors_note(results["miss"])),
        Row("cache.miss_redis_p99", "miss with Redis, p99", ms("miss", "p99_us"), "ms"),
    ]
    per_request = {kind: ", ".join(f"{name} {count / max(requests[kind], 1):.1f}"
                                   for name, count in commands[kind].most_common()
                                   if count / max(requests[kind], 1) >= 0.05)
                   for kind in LOADS}
    details = (f"wrk -t1 -c1, {options.runs} × {options.duration_s} s each, hit and miss runs interleaved; "
               "redis-server on the load core, GATEWAY_REDIS_URL set. Miss latency includes the upstream (nginx, "
               "about 0.05 ms). Redis commands per request (INFO commandstats; commands run inside Lua scripts count "
               "too, EVALSHA is one round trip each): "
               f"hit: {per_request['hit'] or 'none'}; miss: {per_request['miss'] or 'none'}.")
    return SectionResult(TITLE, rows, details)
