"""An in-process LRU cache bounded by total bytes, each entry with its own TTL.

The embedded default when no Redis is configured: one process, no sharing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: what one entry costs beyond its key and value bytes, measured with tracemalloc on CPython 3.11
#: (tests/test_cache_memory_bound.py): the str and bytes headers (49 + 33), the slot and its float
#: (48 + 24), and the OrderedDict's table entry, index and list node (70 to 90, with the table's fill)
ENTRY_OVERHEAD_BYTES = 240


@dataclass(frozen=True, slots=True)
class _Slot:
    value: bytes
    expires_s: float        # on the cache's monotonic clock


class MemoryCache:
    """LRU by bytes (key + value + a fixed overhead per entry), with per-entry expiry.

    Expired entries are dropped when a `get` meets them or when eviction reaches
    them at the LRU head; a write never scans the whole cache.
    """

    remote = False

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._clock = clock
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired; a hit becomes most recently used."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.expires_s <= self._clock():
            self._remove(key)
            return None
        self._slots.move_to_end(key)
        return slot.value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store `value`, evicting least recently used entries until it fits."""
        self.put(key, value, ttl_s)

    def put(self, key: str, value: bytes, ttl_s: int) -> None:
        """`set`, done at once: the cache stage writes in-process answers without a task."""
        self._remove(key)
        size_bytes = entry_bytes(key, value)
        if ttl_s <= 0 or size_bytes > self.max_bytes:
            return
        self._evict_until_free(size_bytes)
        self._slots[key] = _Slot(value, self._clock() + ttl_s)
        self.used_bytes += size_bytes

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        self._remove(key)

    async def close(self) -> None:
        """Drop everything."""
        self._slots.clear()
        self.used_bytes = 0

    def _evict_until_free(self, needed_bytes: int) -> None:
        """Drop entries from the LRU head, expired or not, until `needed_bytes` fit."""
        while self._slots and self.used_bytes + needed_bytes > self.max_bytes:
            key, slot = self._slots.popitem(last=False)
            self.used_bytes -= entry_bytes(key, slot.value)

    def _remove(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self.used_bytes -= entry_bytes(key, slot.value)


def entry_bytes(key: str, value: bytes) -> int:
    """What one entry counts against the bound: its key (ASCII) and value, and the fixed overhead."""
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES
