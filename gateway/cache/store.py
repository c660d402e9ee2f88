"""The byte store interface that both cache backends implement."""

from __future__ import annotations

from typing import Protocol


class CacheStore(Protocol):
    """Bytes by key, with a TTL; a store never raises on get/set/delete."""

    #: a read is a network round trip (worth starting early, beside other waits), not an in-process lookup;
    #: a store that is not remote also offers `put`, `set` done at once (the cache stage writes without a task)
    remote: bool

    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss (or when the store is unavailable)."""

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Store `value` for `ttl_s` seconds; a no-op when it cannot."""

    async def delete(self, key: str) -> None:
        """Forget `key`."""

    async def close(self) -> None:
        """Release connections."""
