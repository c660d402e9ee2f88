"""The response cache: tenant-scoped keys, stored entries, replay, single-flight.

    key.py           cache_key, is_cacheable, cache_control
    entry.py         CacheEntry, entry_from_response / entry_from_stream, encode / decode
    assemble.py      streamed chunks -> the equivalent non-stream response
    replay.py        replay_response (JSON) and replay_sse (an OpenAI SSE stream)
    store.py         CacheStore: the byte-store interface
    memory.py        MemoryCache: in-process LRU by bytes, with TTLs
    redis_store.py   RedisCache (never fails a request), RedisLock
    singleflight.py  SingleFlight, FlightAbandoned
"""

from gateway.cache.entry import (CacheEntry, decode_entry, encode_entry, entry_from_response,
                                 entry_from_stream)
from gateway.cache.key import cache_control, cache_key, is_cacheable
from gateway.cache.memory import MemoryCache
from gateway.cache.redis_store import RedisCache, RedisLock
from gateway.cache.replay import replay_response, replay_sse
from gateway.cache.singleflight import FlightAbandoned, SingleFlight
from gateway.cache.store import CacheStore

__all__ = [
    "CacheEntry", "CacheStore", "FlightAbandoned", "MemoryCache", "RedisCache", "RedisLock",
    "SingleFlight", "cache_control", "cache_key", "decode_entry", "encode_entry",
    "entry_from_response", "entry_from_stream", "is_cacheable", "replay_response", "replay_sse",
]
