"""8. Replay of real arrival times and lengths (Azure LLM trace) through the gateway to a simulated model."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.replay.traffic import read_traffic, sped_up

from bench.client import auth, chat_body, run_async, session, timed_post
from bench.measure import check_answers
from bench.options import Options
from bench.report import Row, SectionResult, percentile
from bench.stack import API_KEYS, Stack

TITLE = "8. Trace replay"
NEEDS = ("gateway",)
KEYS = ("replay.offered_rps", "replay.achieved_rps", "replay.success", "replay.direct_p50", "replay.added_p50",
        "replay.added_p99")
#: prompts longer than this are cut, so one giant prompt cannot dominate a short replay
MAX_PROMPT_TOKENS = 16000


@dataclass(frozen=True)
class Arrival:
    """One trace request: when it comes (wall seconds from the start) and its sizes."""

    at_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Replayed:
    """One contender's pass over the arrivals."""

    latencies_s: list[float]            # per arrival, NaN when it failed
    wall_s: float

    @property
    def ok(self) -> int:
        return sum(not math.isnan(x) for x in self.latencies_s)


def read_arrivals(path: Path, window_s: float, speed: float) -> list[Arrival]:
    """The arrivals in the trace's first `window_s × speed` seconds, replayed `speed` times faster."""
    return [Arrival(at_s, min(request.input_tokens, MAX_PROMPT_TOKENS), max(1, request.output_tokens))
            for at_s, request in sped_up(read_traffic(path, "azure"), window_s, speed)]


def run(stack: Stack, options: Options) -> SectionResult:
    if not options.trace.exists():
        rows = [Row(key, key, math.nan, "", note=f"trace {options.trace} not found") for key in KEYS]
        return SectionResult(TITLE, rows)
    check_answers(stack.url("gateway"), model="bench-replay")
    arrivals = read_arrivals(options.trace, options.replay_s, options.replay_speed)
    direct = run_async(_replay(stack.sim_url("sim-replay"), "sim-replay", arrivals))
    through = run_async(_replay(stack.url("gateway"), "bench-replay", arrivals))
    added = [(g - d) * 1000 for g, d in zip(through.latencies_s, direct.latencies_s)
             if not (math.isnan(g) or math.isnan(d))]
    offered = len(arrivals) / options.replay_s
    rows = [
        Row("replay.offered_rps", "offered load (trace arrivals, sped up)", offered, "req/s"),
        Row("replay.achieved_rps", "gateway: completed requests/s (ref: offered)", through.ok / through.wall_s,
            "req/s", reference=offered),
        Row("replay.success", "gateway: share answered 200", through.ok / max(len(arrivals), 1) * 100, "%"),
        Row("replay.direct_p50", "direct to the simulated model, latency p50",
            percentile([x * 1000 for x in direct.latencies_s if not math.isnan(x)], 50), "ms"),
        Row("replay.added_p50", "gateway added latency p50 (per request: gateway − direct)",
            percentile(added, 50), "ms"),
        Row("replay.added_p99", "gateway added latency p99", percentile(added, 99), "ms"),
    ]
    prompts = sorted(a.prompt_tokens for a in arrivals) or [0]
    details = (f"{options.trace.name}: the first {options.replay_s * options.replay_speed:.0f} s of the trace "
               f"({len(arrivals):,} requests, prompt tokens p50 {prompts[len(prompts) // 2]:,}, max {prompts[-1]:,}) "
               f"replayed open-loop at {options.replay_speed:g}× speed over {options.replay_s:g} s, once direct to "
               "the simulated model (TTFT 5 ms, TPOT 0.2 ms, max_tokens = the trace's generated tokens) and once "
               "through the gateway, non-streaming; the gateway counts every prompt with tiktoken.")
    return SectionResult(TITLE, rows, details)


async def _replay(url: str, model: str, arrivals: list[Arrival]) -> Replayed:
    """Send each arrival at its time without waiting for earlier answers (open loop)."""
    latencies = [math.nan] * len(arrivals)
    async with session() as client:
        started = time.perf_counter()
        tasks = []
        for index, arrival in enumerate(arrivals):
            delay_s = arrival.at_s - (time.perf_counter() - started)
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(_one(client, url, model, index, arrival, latencies)))
        await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - started
    return Replayed(latencies, wall_s)


async def _one(client: aiohttp.ClientSession, url: str, model: str, index: int, arrival: Arrival,
               latencies: list[float]) -> None:
    prompt = f"replay {index}:" + " hello" * arrival.prompt_tokens
    body = chat_body(model, prompt, stream=False, max_tokens=arrival.output_tokens)
    try:
        status, seconds = await timed_post(client, url, body, auth(API_KEYS[index % len(API_KEYS)]))
    except aiohttp.ClientError:
        return
    if status == 200:
        latencies[index] = seconds
