"""5. Memory: RSS at idle and with many concurrent open streams, gateway against the baseline proxy."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

from bench.client import auth, chat_body, run_async, session, stream_event_times
from bench.measure import check_answers
from bench.options import Options
from bench.procs import rss_bytes
from bench.report import Row, SectionResult, value_below
from bench.stack import API_KEYS, Stack

TITLE = "5. Memory"
#: the main gateway (this section runs first, so it has served nothing but the warm-up), and a baseline
#: proxy in front of the same slow simulated model
NEEDS = ("gateway", "baseline-slow")
KEYS = ("memory.idle_mb", "memory.streams_mb", "memory.per_stream_kb", "memory.after_mb")
MODELS = {"gateway": "bench-slow", "baseline-slow": "sim-slow"}
#: streams are opened this many at a time, each wave once the last has its first chunks (no SYN storm)
WAVE = 100
WAVE_TIMEOUT_S = 30.0
MB = 1_000_000             # megabytes as the target states them (300 MB), not MiB


@dataclass(frozen=True)
class Footprint:
    """One process's RSS: idle, with the streams open, after they closed."""

    idle: int
    peak: int
    after: int
    opened: int
    failures: Counter
    open_s: float

    @property
    def per_stream_kb(self) -> float:
        return (self.peak - self.idle) / max(self.opened, 1) / 1000


def run(stack: Stack, options: Options) -> SectionResult:
    check_answers(stack.url("gateway"))
    settle_s = 1.0 if options.streams >= 100 else 0.2
    gateway, baseline = (_footprint(stack, name, options.streams, settle_s) for name in NEEDS)
    problems = stream_problems(gateway, options.streams)
    judged = options.streams >= 1000 and not problems     # a verdict only on 1,000 streams all open
    rows = [
        Row("memory.idle_mb", "RSS at idle, after a short warm-up (ref: baseline proxy)", gateway.idle / MB, "MB",
            reference=baseline.idle / MB),
        Row("memory.streams_mb", f"RSS with {options.streams:,} concurrent open streams (ref: baseline proxy)",
            gateway.peak / MB, "MB", reference=baseline.peak / MB,
            target=value_below(300, "MB") if judged else None,
            note="; ".join(problems) + ": not judged" if problems
            else ("" if judged else "fewer than 1,000 streams: not judged")),
        Row("memory.per_stream_kb", "RSS per open stream (ref: baseline proxy)", gateway.per_stream_kb, "KB",
            reference=baseline.per_stream_kb),
        Row("memory.after_mb", "RSS after the streams closed (ref: baseline proxy)", gateway.after / MB, "MB",
            reference=baseline.after / MB),
    ]
    details = (f"Streams to a simulated model sending one token a second, opened {WAVE} at a time from one aiohttp "
               f"client: gateway {gateway.opened:,} in {gateway.open_s:.1f} s, baseline proxy {baseline.opened:,} "
               f"in {baseline.open_s:.1f} s. RSS is VmRSS, the highest of three samples once every stream had "
               "its first chunk. The gateway has telemetry on and in-memory stores; its idle RSS includes the "
               "tiktoken encodings it loads at start-up.")
    return SectionResult(TITLE, rows, details)


def stream_problems(footprint: Footprint, asked: int) -> list[str]:
    """Why the RSS with streams open is no verdict on `asked` streams: fewer opened, or some failed (either way the
    process held less than the target is about)."""
    problems = [f"only {footprint.opened} of {asked} streams opened"] if footprint.opened < asked else []
    return problems + [f"{count} × {what}" for what, count in footprint.failures.items()]


def _footprint(stack: Stack, name: str, streams: int, settle_s: float) -> Footprint:
    pid, url, model = stack.pid(name), stack.url(name), MODELS[name]
    run_async(_warm_up(url, model))
    time.sleep(settle_s)
    idle = rss_bytes(pid)
    opened, peak, failures, open_s = run_async(_hold_streams(url, model, streams, pid))
    time.sleep(settle_s)
    return Footprint(idle, peak, rss_bytes(pid), opened, failures, open_s)


async def _warm_up(url: str, model: str) -> None:
    """A few one-token streams, so pools, caches and lazy imports are in place before the idle sample."""
    async with session() as client:
        for i in range(20):
            await stream_event_times(client, url, chat_body(model, f"warm-up {i}", stream=True, max_tokens=1),
                                     auth(API_KEYS[i % len(API_KEYS)]))


async def _hold_streams(url: str, model: str, count: int, pid: int) -> tuple[int, int, Counter, float]:
    """Open `count` slow streams in waves; (opened, peak RSS, failures by kind, seconds to open them all)."""
    started = time.perf_counter()
    failures: Counter = Counter()
    tasks: list[asyncio.Task] = []
    opened = 0
    async with session() as client:
        try:
            for first in range(0, count, WAVE):
                wave = [asyncio.get_running_loop().create_future() for _ in range(first, min(first + WAVE, count))]
                tasks += [asyncio.create_task(_one_stream(client, url, model, first + i, ready, failures))
                          for i, ready in enumerate(wave)]
                done, _ = await asyncio.wait(wave, timeout=WAVE_TIMEOUT_S)
                opened += sum(1 for f in done if f.result())
            open_s = time.perf_counter() - started
            peak = 0
            for _ in range(3):
                await asyncio.sleep(0.3)
                peak = max(peak, rss_bytes(pid))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return opened, peak, failures, open_s


async def _one_stream(client: aiohttp.ClientSession, url: str, model: str, index: int, ready: asyncio.Future,
                      failures: Counter) -> None:
    """Hold one stream open until cancelled; `ready` says whether its first chunk came."""
    body = chat_body(model, f"stream {index}: write a very long story", stream=True, max_tokens=600)
    try:
        async with client.post(url, json=body, headers=auth(API_KEYS[index % len(API_KEYS)])) as response:
            if response.status != 200:
                failures[f"HTTP {response.status}"] += 1
                return
            await response.content.readuntil(b"\n\n")
            ready.set_result(True)
            async for _ in response.content.iter_any():
                pass
    except aiohttp.ClientError as exc:
        failures[type(exc).__name__] += 1
    finally:
        if not ready.done():
            ready.set_result(False)
