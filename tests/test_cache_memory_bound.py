"""The in-memory LRU at scale: what a write into a full cache costs, and what its byte bound counts."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from gateway.cache.memory import ENTRY_OVERHEAD_BYTES, MemoryCache, entry_bytes
from gateway.stages.relay import StreamState

KEY_PREFIX = "gw:c:v1:"


def cache_key(i: int) -> str:
    """A key shaped like the gateway's: a prefix and 64 hex-wide digits."""
    return f"{KEY_PREFIX}{i:064d}"


async def full_cache(entries: int, value: bytes) -> MemoryCache:
    """A cache filled to its bound with `entries` entries."""
    cache = MemoryCache(max_bytes=entries * entry_bytes(cache_key(0), value))
    for i in range(entries):
        await cache.set(cache_key(i), value, ttl_s=3600)
    assert len(cache) == entries and cache.used_bytes == cache.max_bytes
    return cache


async def seconds_per_write(cache: MemoryCache, value: bytes, *, first: int) -> float:
    """The fastest of five batches of writes of new keys into the full cache, per write."""
    batches = []
    for batch in range(5):
        started = time.perf_counter()
        for i in range(first + batch * 200, first + (batch + 1) * 200):
            await cache.set(cache_key(i), value, ttl_s=3600)
        batches.append((time.perf_counter() - started) / 200)
    return min(batches)


async def test_a_write_into_a_full_cache_costs_the_same_at_any_size() -> None:
    """A write into a full cache of 200,000 entries costs about what one into 1,000 does: no full scan."""
    value = b"v" * 100
    small, large = await full_cache(1_000, value), await full_cache(200_000, value)
    small_s = await seconds_per_write(small, value, first=1_000)
    large_s = await seconds_per_write(large, value, first=200_000)
    assert large_s < 10 * small_s, (large_s, small_s)
    assert len(large) == 200_000 and await large.get(cache_key(0)) is None     # the oldest went first


@pytest.mark.parametrize("value_bytes", [32, 2048])
async def test_the_bound_counts_the_memory_the_entries_take(value_bytes: int) -> None:
    """What the cache counts against its bound is, within 20%, the memory tracemalloc sees it take."""
    cache = MemoryCache(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            await cache.set(cache_key(i), i.to_bytes(8, "big") * (value_bytes // 8), ttl_s=3600)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.8 < traced / cache.used_bytes < 1.2, (traced, cache.used_bytes)


async def test_each_entry_counts_its_key_value_and_overhead() -> None:
    """An entry counts its key and value bytes and the fixed overhead; removing it gives them all back."""
    cache = MemoryCache(max_bytes=10_000)
    await cache.set("k", b"value", ttl_s=60)
    assert cache.used_bytes == len("k") + len(b"value") + ENTRY_OVERHEAD_BYTES
    await cache.delete("k")
    assert cache.used_bytes == 0


def test_a_stream_with_top_logprobs_is_given_up_before_it_holds_tens_of_megabytes() -> None:
    """A cacheable stream asking for `top_logprobs: 20` carries about 8 KB of logprobs a token beside one token of
    text: the assembler (which folds a stream the cache may store) counts them against its limit, so a 4,000
    token answer is given up (it could not be stored anyway) instead of holding about 31 MB until its end."""
    alternatives = [{"token": f"t{i}", "logprob": -1.0 - i, "bytes": [116, 48 + i % 10]} for i in range(20)]
    state = StreamState(assemble_for="chat")
    tracemalloc.start()
    try:
        for i in range(4000):
            token = {"token": f" w{i}", "logprob": -0.5, "bytes": [32, 119], "top_logprobs": list(alternatives)}
            state.absorb({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": {"content": f" w{i}"},
                                       "logprobs": {"content": [dict(token)]}, "finish_reason": None}]})
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert state.assembled is None and "characters" in state.unassembled
    assert held < 8 * 1024 * 1024, f"the stream's state holds {held / 1e6:.1f} MB"
    short = StreamState(assemble_for="chat")        # a short one is still assembled, its logprobs whole
    for i in range(20):
        short.absorb({"choices": [{"index": 0, "delta": {"content": "x"},
                                   "logprobs": {"content": [{"token": "x", "logprob": -0.1, "bytes": [120],
                                                             "top_logprobs": list(alternatives)}]}}]})
    assert len(short.assembled.body()["choices"][0]["logprobs"]["content"]) == 20
