"""Stored entries as bytes, the in-memory LRU, and the Redis cache against a real server."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
import zlib
from decimal import Decimal

import orjson
import pytest

from gateway.cache.entry import (DEFAULT_MAX_ENTRY_BYTES, FORMAT_PLAIN, FORMAT_ZLIB, CacheEntry, decode_entry,
                                 encode_entry, entry_from_response)
from gateway.cache.memory import ENTRY_OVERHEAD_BYTES, MemoryCache
from gateway.cache.redis_store import RedisCache
from tests.support.fakes import FakeClock
from tests.support.redis_counting import counting


def chat_body(content: str, finish_reason: str | None = "stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000,
            "model": "sim-small-1b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def test_only_complete_answers_become_entries() -> None:
    """stop and length are stored; tool calls, content_filter, a missing reason or an error are not."""
    assert entry_from_response("chat", chat_body("hi", "stop")) is not None
    assert entry_from_response("chat", chat_body("hi", "length")) is not None
    assert entry_from_response("chat", chat_body("hi", "tool_calls")) is None
    assert entry_from_response("chat", chat_body("hi", "function_call")) is None
    assert entry_from_response("chat", chat_body("hi", "content_filter")) is None
    assert entry_from_response("chat", chat_body("hi", None)) is None
    assert entry_from_response("chat", {"error": {"message": "x"}}) is None
    assert entry_from_response("chat", {"choices": []}) is None
    embeddings = {"object": "list", "data": [{"embedding": [0.1], "index": 0}], "model": "e"}
    assert entry_from_response("embeddings", embeddings) is not None


def test_a_legacy_function_call_or_any_unfinished_choice_is_not_an_entry() -> None:
    """A message carrying a legacy function_call is a tool step whatever its finish reason, and an answer is
    complete only when every choice is."""
    body = chat_body("hi", "stop")
    body["choices"][0]["message"]["function_call"] = {"name": "f", "arguments": "{}"}
    assert entry_from_response("chat", body) is None
    two = chat_body("hi", "stop")
    two["choices"].append({**chat_body("cut", "content_filter")["choices"][0], "index": 1})
    assert entry_from_response("chat", two) is None


def test_an_answer_that_carries_an_error_is_never_an_entry() -> None:
    """A body with an `error` beside its choices or data (a provider's partial failure) is not cached, even when
    its choices look finished."""
    failed_chat = {**chat_body("hi", "stop"), "error": {"message": "upstream hiccup"}}
    assert entry_from_response("chat", failed_chat) is None
    failed_embeddings = {"object": "list", "data": [], "model": "e", "error": {"message": "quota"}}
    assert entry_from_response("embeddings", failed_embeddings) is None


@pytest.mark.parametrize("content, flag", [("short", FORMAT_PLAIN), ("x" * 5000, FORMAT_ZLIB)])
def test_encode_decode_round_trip(content: str, flag: int) -> None:
    """Small entries are stored plain, large ones compressed, and both decode to the same entry."""
    entry = CacheEntry("chat", chat_body(content), 1700000001.5)
    data = encode_entry(entry)
    assert data is not None and data[0] == flag
    assert decode_entry(data) == entry
    if flag == FORMAT_ZLIB:
        assert len(data) < 1000


def test_an_entry_keeps_its_cost_and_the_model_that_answered() -> None:
    """What the answer cost (what each hit saves), the model that gave it and the upstream model that model
    called survive the bytes, plain or compressed."""
    for content in ("short", "x" * 5000):
        entry = CacheEntry("chat", chat_body(content), 1700000001.5, cost_usd=Decimal("0.000123"), model="small",
                           upstream_model="llama-3.1-8b")
        decoded = decode_entry(encode_entry(entry))
        assert decoded == entry and decoded.upstream_model == "llama-3.1-8b"


def test_a_free_answer_keeps_its_zero_cost() -> None:
    """An answer that cost nothing (a local model) decodes with its cost of 0: it is still a hit, not a miss."""
    entry = CacheEntry("chat", chat_body("short"), 1700000001.5, cost_usd=Decimal("0"), model="local")
    assert decode_entry(encode_entry(entry)) == entry


def test_a_stored_model_that_is_no_name_is_read_as_none() -> None:
    """An entry whose stored model is not a string (another build's, a hand-written one) keeps its answer but no
    model: a list or a number never reaches the check of which models may serve the hit."""
    body = chat_body("short")
    for stored_model in (["small"], 5, {"name": "small"}):
        stored = {"e": "chat", "b": body, "t": 1.0, "m": stored_model, "u": stored_model}
        entry = decode_entry(bytes([FORMAT_PLAIN]) + orjson.dumps(stored))
        assert entry is not None and entry.model is None and entry.upstream_model is None, stored_model


def test_an_entry_stored_before_entries_named_their_upstream_model_reads_without_one() -> None:
    """An entry an earlier build stored (its model, no upstream model) is still read, its upstream model None:
    the hit check then goes by the model's name alone."""
    stored = {"e": "chat", "b": chat_body("short"), "t": 1.0, "m": "small"}
    entry = decode_entry(bytes([FORMAT_PLAIN]) + orjson.dumps(stored))
    assert entry is not None and entry.model == "small" and entry.upstream_model is None


def test_size_cap_skips_storing() -> None:
    """An entry whose encoded bytes exceed max_entry_bytes is not encoded for storage."""
    entry = CacheEntry("chat", chat_body("short"))
    assert encode_entry(entry, max_entry_bytes=50) is None
    assert encode_entry(entry, max_entry_bytes=10_000) is not None


@pytest.mark.parametrize("content", ["short", "x" * 5000])
def test_the_size_cap_counts_every_stored_byte(content: str) -> None:
    """An entry exactly max_entry_bytes long is stored; one byte over is not, plain or compressed (the format
    byte and what zlib flushes at the end count too)."""
    entry = CacheEntry("chat", chat_body(content))
    data = encode_entry(entry)
    assert data is not None
    assert encode_entry(entry, max_entry_bytes=len(data)) == data
    assert encode_entry(entry, max_entry_bytes=len(data) - 1) is None


def test_unreadable_bytes_are_a_miss() -> None:
    """Garbage, an unknown format byte or truncated zlib data decode to None, not an exception."""
    compressed = encode_entry(CacheEntry("chat", chat_body("y" * 5000)))
    assert compressed is not None
    for data in (b"", b"\x07{}", b"\x00not json", b"\x00{}", compressed[:20]):
        assert decode_entry(data) is None


@pytest.mark.parametrize("stored", [
    {"e": "chat", "b": [1, 2], "t": 1.0},                                           # a body that is no object
    {"e": "chat", "b": {"choices": "nope"}, "t": 1.0},                              # choices that are no list
    {"e": "chat", "b": {"choices": [5]}, "t": 1.0},                                 # a choice that is no object
    {"e": "chat", "b": {"choices": [{"index": 0, "message": "x", "finish_reason": "stop"}]}, "t": 1.0},
    {"e": "embeddings", "b": {"data": "x"}, "t": 1.0},
    {"e": "images", "b": {"data": []}, "t": 1.0},                                   # no endpoint the gateway serves
    {"e": "chat", "b": {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]},
     "t": 1.0, "c": "NaN"},                                                         # a cost that is no amount
    {"e": "chat", "b": {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]},
     "t": 1.0, "c": "-1"},
    {"e": "chat", "b": {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]},
     "t": "yesterday"},
    {"e": "responses", "b": {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]},
     "t": 1.0},                                                                     # a chat answer, another endpoint
])
def test_an_entry_of_a_shape_the_gateway_never_stores_is_a_miss(stored: dict) -> None:
    """An entry that decodes but could not have been written by the gateway (another build sharing the prefix, a
    hand-written key) is a miss: served, it was a 200 "hit" whose body the SDK could not read, or an empty stream."""
    assert decode_entry(bytes([FORMAT_PLAIN]) + orjson.dumps(stored)) is None


def test_an_answer_far_past_the_size_cap_is_given_up_after_compressing_a_little_of_it(monkeypatch) -> None:
    """A 20 MB answer (a batch of embeddings) that could never fit a 1 MiB entry stops being compressed once the
    output passes the cap: the event loop pays for a few MB, not for all of it (seconds, before)."""
    fed = []
    real_compressobj, real_compress = zlib.compressobj, zlib.compress

    class Counting:
        def __init__(self) -> None:
            self.inner = real_compressobj()

        def compress(self, data) -> bytes:
            fed.append(len(data))
            return self.inner.compress(data)

        def flush(self) -> bytes:
            return self.inner.flush()

    def compress(data, *args):
        fed.append(len(data))
        return real_compress(data, *args)

    monkeypatch.setattr(zlib, "compressobj", Counting)
    monkeypatch.setattr(zlib, "compress", compress)
    noise = random.Random(7)
    body = {"object": "list", "model": "e", "data": [
        {"object": "embedding", "index": i, "embedding": [noise.uniform(-1, 1) for _ in range(1536)]}
        for i in range(600)]}
    assert encode_entry(CacheEntry("embeddings", body)) is None
    assert 0 < sum(fed) <= 8 * DEFAULT_MAX_ENTRY_BYTES < len(orjson.dumps(body)) / 2
    monkeypatch.undo()
    small = CacheEntry("embeddings", {**body, "data": body["data"][:20]})
    assert decode_entry(encode_entry(small)) == small      # one that fits is stored as before


async def test_memory_lru_evicts_by_bytes() -> None:
    """When the byte budget is full the least recently used entry goes first."""
    entry_bytes = 100 + ENTRY_OVERHEAD_BYTES                  # a one-letter key and 99 bytes
    cache = MemoryCache(max_bytes=3 * entry_bytes)
    await cache.set("a", b"1" * 99, ttl_s=60)
    await cache.set("b", b"2" * 99, ttl_s=60)
    await cache.set("c", b"3" * 99, ttl_s=60)
    assert cache.used_bytes == 3 * entry_bytes
    assert await cache.get("a") == b"1" * 99      # a is now the most recently used
    await cache.set("d", b"4" * 99, ttl_s=60)
    assert await cache.get("b") is None
    assert [await cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert cache.used_bytes == 3 * entry_bytes


async def test_memory_rejects_oversized_and_replaces_values() -> None:
    """A value larger than the whole budget is not stored; a second set replaces the first."""
    cache = MemoryCache(max_bytes=100 + ENTRY_OVERHEAD_BYTES)
    await cache.set("big", b"x" * 200, ttl_s=60)
    assert await cache.get("big") is None
    await cache.set("k", b"old", ttl_s=60)
    await cache.set("k", b"newer", ttl_s=60)
    assert await cache.get("k") == b"newer"
    assert cache.used_bytes == len("k") + len(b"newer") + ENTRY_OVERHEAD_BYTES
    await cache.delete("k")
    assert (await cache.get("k"), cache.used_bytes, len(cache)) == (None, 0, 0)


async def test_memory_a_replacement_too_large_to_keep_drops_the_old_value() -> None:
    """A write too large (or of ttl 0) to keep still forgets the key's old value: the stale answer is never served."""
    cache = MemoryCache(max_bytes=100 + ENTRY_OVERHEAD_BYTES)
    await cache.set("k", b"old", ttl_s=60)
    await cache.set("k", b"x" * 200, ttl_s=60)
    assert (await cache.get("k"), cache.used_bytes, len(cache)) == (None, 0, 0)
    await cache.set("k", b"old", ttl_s=60)
    await cache.set("k", b"new", ttl_s=0)
    assert (await cache.get("k"), cache.used_bytes, len(cache)) == (None, 0, 0)


async def test_memory_close_forgets_every_entry_and_its_bytes() -> None:
    """A closed cache holds nothing and counts no bytes, so a write after it is not evicting ghosts."""
    entry_bytes = 2 + ENTRY_OVERHEAD_BYTES
    cache = MemoryCache(max_bytes=2 * entry_bytes)
    await cache.set("a", b"1", ttl_s=60)
    await cache.set("b", b"2", ttl_s=60)
    await cache.close()
    assert (len(cache), cache.used_bytes) == (0, 0)
    await cache.set("c", b"3", ttl_s=60)
    await cache.set("d", b"4", ttl_s=60)
    assert [await cache.get(k) for k in "cd"] == [b"3", b"4"]


async def test_memory_an_entry_the_size_of_the_whole_budget_is_kept() -> None:
    """The bound is inclusive: an entry counting exactly `max_bytes` is stored, one byte more is not."""
    cache = MemoryCache(max_bytes=1 + 100 + ENTRY_OVERHEAD_BYTES)
    await cache.set("k", b"x" * 100, ttl_s=60)
    assert await cache.get("k") == b"x" * 100
    await cache.set("k", b"x" * 101, ttl_s=60)
    assert (await cache.get("k"), cache.used_bytes) == (None, 0)


async def test_memory_rewriting_a_key_in_a_roomy_cache_counts_its_bytes_once() -> None:
    """A key written again replaces its old bytes in the count, even when nothing needs evicting: rewrites never
    leak budget until the cache evicts live entries for room it has."""
    cache = MemoryCache(max_bytes=100 * (1 + 3 + ENTRY_OVERHEAD_BYTES))
    for _ in range(5):
        await cache.set("k", b"old", ttl_s=60)
    assert (len(cache), cache.used_bytes) == (1, 1 + 3 + ENTRY_OVERHEAD_BYTES)


async def test_memory_ttl_expiry() -> None:
    """Each entry expires after its own TTL and frees its bytes."""
    clock = FakeClock()
    cache = MemoryCache(max_bytes=1000 + 2 * ENTRY_OVERHEAD_BYTES, clock=clock)
    await cache.set("short", b"s", ttl_s=5)
    await cache.set("long", b"l", ttl_s=50)
    clock.now_s += 10
    assert await cache.get("short") is None
    assert await cache.get("long") == b"l"
    assert cache.used_bytes == len("long") + 1 + ENTRY_OVERHEAD_BYTES


async def test_memory_an_entry_is_gone_at_its_ttl_and_a_zero_ttl_keeps_nothing() -> None:
    """An entry answers until its TTL, not at it; one written with ttl_s 0 takes no room at all."""
    clock = FakeClock()
    cache = MemoryCache(max_bytes=1000 + ENTRY_OVERHEAD_BYTES, clock=clock)
    await cache.set("k", b"v", ttl_s=5)
    clock.now_s += 4
    assert await cache.get("k") == b"v"
    clock.now_s += 1
    assert await cache.get("k") is None
    await cache.set("z", b"v", ttl_s=0)
    assert (len(cache), cache.used_bytes) == (0, 0)
    assert await cache.get("z") is None


async def test_memory_a_full_cache_makes_room_from_the_lru_head() -> None:
    """A write into a full cache drops the least recently used entry, expired or not, and keeps the others."""
    clock = FakeClock()
    entry_bytes = 2 + ENTRY_OVERHEAD_BYTES                     # a one-letter key and one byte
    cache = MemoryCache(max_bytes=3 * entry_bytes, clock=clock)
    await cache.set("a", b"1", ttl_s=5)
    await cache.set("b", b"2", ttl_s=50)
    await cache.set("c", b"3", ttl_s=50)
    clock.now_s += 10                                           # a has expired, at the LRU head
    await cache.set("d", b"4", ttl_s=50)
    assert [await cache.get(k) for k in "abcd"] == [None, b"2", b"3", b"4"]
    await cache.set("e", b"5", ttl_s=50)                        # then b, the least recently used
    assert [await cache.get(k) for k in "bcde"] == [None, b"3", b"4", b"5"]
    assert (len(cache), cache.used_bytes) == (3, 3 * entry_bytes)


async def test_redis_get_set_and_ttl(redis_server) -> None:
    """Values round-trip through a real redis-server and expire after their TTL."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        await cache.set("gw:c:v1:a", b"\x00value", ttl_s=1)
        await cache.set("gw:c:v1:b", b"kept", ttl_s=60)
        assert await cache.get("gw:c:v1:a") == b"\x00value"
        assert 0 < await cache.client.pttl("gw:c:v1:a") <= 1000
        await asyncio.sleep(1.1)
        assert await cache.get("gw:c:v1:a") is None
        await cache.delete("gw:c:v1:b")
        assert await cache.get("gw:c:v1:b") is None
        assert (cache.errors, cache.healthy) == (0, True)
    finally:
        await cache.close()


async def test_redis_outage_is_a_fast_miss_then_recovers(redis_server, caplog) -> None:
    """With Redis killed, reads are fast misses and writes no-ops; after a restart it works again."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.2, backoff_s=0.3)
    try:
        await cache.set("k", b"v", ttl_s=60)
        assert await cache.get("k") == b"v"
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.cache.redis_store"):
            started_s = time.perf_counter()
            assert await cache.get("k") is None             # the first failure: bounded by the timeout
            assert time.perf_counter() - started_s < 0.5
            assert (cache.healthy, cache.errors) == (False, 1)
            sent = counting(cache.client)
            for _ in range(20):                             # during back-off Redis is not touched
                assert await cache.get("k") is None
                await cache.set("k", b"v2", ttl_s=60)
            assert sent == []
            await asyncio.sleep(0.35)
            assert await cache.get("k") is None             # back-off over: still down, one more error
        assert cache.errors == 1 + 40 + 1                   # every call answered without Redis counts
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        redis_server.start()
        await asyncio.sleep(0.35)
        with caplog.at_level(logging.WARNING, logger="gateway.cache.redis_store"):
            await cache.set("k", b"back", ttl_s=60)
        assert await cache.get("k") == b"back"
        assert cache.healthy
        assert "redis cache reachable again after 42 calls answered without it" in caplog.text
    finally:
        await cache.close()


async def test_redis_hang_is_bounded_by_the_timeout(redis_server) -> None:
    """A Redis that stops answering costs one timeout, then answers correctly once it resumes."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.1, backoff_s=0.2)
    try:
        await cache.set("a", b"1", ttl_s=60)
        await cache.set("b", b"2", ttl_s=60)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started_s = time.perf_counter()
            assert await cache.get("a") is None
            assert 0.09 < time.perf_counter() - started_s < 0.4
            assert not cache.healthy
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.25)
        assert [await cache.get("b"), await cache.get("a")] == [b"2", b"1"]
        assert cache.healthy
    finally:
        await cache.close()
