"""The bench's own HTTP client measurements (aiohttp on uvloop): stream timings and timed requests."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a measurement coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def chat_body(model: str, content: str, *, stream: bool, max_tokens: int = 16) -> dict:
    """An OpenAI chat request; temperature 0 so the gateway may cache it."""
    return {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": content}]}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def session(connections: int = 0) -> aiohttp.ClientSession:
    """A pooled client session with no connection limit (0) or the given one."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=120))


async def stream_event_times(client: aiohttp.ClientSession, url: str, body: dict,
                             headers: dict[str, str]) -> tuple[float, list[float]]:
    """(time to first body byte, arrival time of each `data:` event), seconds from sending."""
    started = time.perf_counter()
    first_byte_s = float("nan")
    times: list[float] = []
    async with client.post(url, json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {(await response.text())[:200]}")
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter() - started
            if math.isnan(first_byte_s):
                first_byte_s = now
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data:"):
                    times.append(now)
    return first_byte_s, times


async def timed_post(client: aiohttp.ClientSession, url: str, body: dict,
                     headers: dict[str, str]) -> tuple[int, float]:
    """(status, seconds) of one non-streamed request, its body read whole."""
    started = time.perf_counter()
    async with client.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.status, time.perf_counter() - started
