"""3. Streaming: time to first byte added by the proxy, and chunk relay delay against a known TPOT."""

from __future__ import annotations

import math

from bench.client import auth, chat_body, run_async, session, stream_event_times
from bench.measure import check_answers
from bench.options import Options
from bench.report import Row, SectionResult, median, percentile
from bench.stack import API_KEYS, RELAY_TPOT_S, Stack

TITLE = "3. Streaming"
NEEDS = ("gateway", "baseline")
KEYS = ("stream.direct_ttfb_p50", "stream.baseline_ttfb_added_p50", "stream.gateway_ttfb_added_p50",
        "stream.gateway_ttfb_added_p99", "stream.relay_ttfb_added_p50", "stream.relay_lateness_added_p50",
        "stream.relay_lateness_added_p99")
CONTENDERS = ("direct", "baseline", "gateway")
RELAY_TOKENS = 20


def run(stack: Stack, options: Options) -> SectionResult:
    check_answers(stack.url("gateway"), model="bench-stream", stream=True)
    ttfb = {name: [] for name in CONTENDERS}
    per_round = max(1, options.stream_requests // max(1, options.runs))
    for round_index in range(options.runs):
        for name in CONTENDERS:
            ttfb[name].append(run_async(_ttfbs(stack, name, per_round, round_index)))
    relay_count = max(3, options.stream_requests // 10)
    relay = {name: run_async(_relay(stack, name, relay_count)) for name in ("direct", "gateway")}

    def added_ttfb(name: str, pct: float) -> float:
        return median((percentile(r, pct) - percentile(d, pct)) * 1000 for r, d in zip(ttfb[name], ttfb["direct"]))

    def relay_added(index: int, pct: float) -> float:
        return (percentile(relay["gateway"][index], pct) - percentile(relay["direct"][index], pct)) * 1000

    baseline_p50 = added_ttfb("baseline", 50)
    rows = [
        Row("stream.direct_ttfb_p50", "nginx canned stream, direct TTFB p50",
            median(percentile(r, 50) * 1000 for r in ttfb["direct"]), "ms"),
        Row("stream.baseline_ttfb_added_p50", "baseline proxy, TTFB added p50", baseline_p50, "ms"),
        Row("stream.gateway_ttfb_added_p50", "gateway, TTFB added p50 (ref: baseline)", added_ttfb("gateway", 50),
            "ms", reference=baseline_p50),
        Row("stream.gateway_ttfb_added_p99", "gateway, TTFB added p99 (ref: baseline)", added_ttfb("gateway", 99),
            "ms", reference=added_ttfb("baseline", 99)),
        Row("stream.relay_ttfb_added_p50", "simulated model, TTFB added p50", relay_added(0, 50), "ms"),
        Row("stream.relay_lateness_added_p50", "chunk timing jitter added p50 (lateness vs TPOT schedule, "
            "after the first chunk)", relay_added(1, 50), "ms"),
        Row("stream.relay_lateness_added_p99", "chunk timing jitter added p99", relay_added(1, 99), "ms"),
    ]
    details = (f"TTFB: {options.runs} rounds × {per_round} sequential streams per contender (aiohttp client, "
               f"keep-alive), the canned nginx SSE body. Chunk relay: {relay_count} streams of {RELAY_TOKENS} "
               f"tokens from the simulated model (TTFT 20 ms, TPOT {RELAY_TPOT_S * 1000:.0f} ms), direct vs "
               "through the gateway; a chunk's lateness is its arrival after the first token minus its "
               "scheduled offset (k × TPOT): it shows the jitter the relay adds between chunks, not a delay "
               "common to every chunk (that cancels out; the TTFB rows show it), and it is measured in one "
               "pass per contender, not interleaved. TTFB: each round's session first sends one warm-up "
               "stream, so no sample includes the TCP connect. "
               f"Direct lateness p50/p99: {percentile(relay['direct'][1], 50) * 1000:.2f} / "
               f"{percentile(relay['direct'][1], 99) * 1000:.2f} ms.")
    return SectionResult(TITLE, rows, details)


async def _ttfbs(stack: Stack, name: str, count: int, round_index: int) -> list[float]:
    url = stack.stream_url(name)
    model = "gpt-4o-mini" if name != "gateway" else "bench-stream"
    async with session(1) as client:
        out = []
        warm_up = chat_body(model, f"stream {round_index}: warm-up", stream=True)
        await stream_event_times(client, url, warm_up, auth(API_KEYS[0]))     # the connect is no TTFB sample
        for i in range(count):
            body = chat_body(model, f"stream {round_index}-{i}: tell me about the weather", stream=True)
            first_byte_s, _ = await stream_event_times(client, url, body, auth(API_KEYS[i % len(API_KEYS)]))
            out.append(first_byte_s)
    return [t for t in out if not math.isnan(t)]


async def _relay(stack: Stack, name: str, count: int) -> tuple[list[float], list[float]]:
    """(TTFBs, per-chunk lateness) of `count` sequential streams from the simulated relay model."""
    url = stack.sim_url("sim-relay") if name == "direct" else stack.url("gateway")
    model = "sim-relay" if name == "direct" else "bench-relay"
    ttfbs: list[float] = []
    lateness: list[float] = []
    async with session(1) as client:
        for i in range(count):
            body = chat_body(model, f"relay {i}: count slowly", stream=True, max_tokens=RELAY_TOKENS)
            first_byte_s, times = await stream_event_times(client, url, body, auth(API_KEYS[0]))
            ttfbs.append(first_byte_s)
            tokens = times[1:RELAY_TOKENS + 1]          # after the role chunk: one event per token
            lateness += [(t - tokens[0]) - k * RELAY_TPOT_S for k, t in enumerate(tokens)][1:]
    return ttfbs, lateness
