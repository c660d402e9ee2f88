"""Single-flight: identical concurrent requests make one upstream call.

In one process the first caller for a key leads and the others await its
future. Across replicas an optional `RedisLock` elects one leader per key;
a replica that loses the election polls for the leader's cached answer.
The lock is short (`lock_ttl_s`) and its leader keeps extending it while it
works, so a lock whose holder died (or whose acquisition timed out and landed
late in a slow Redis) blocks other replicas for at most `lock_ttl_s`.
A follower never hangs: on timeout, on leader failure or when the leader
had nothing to share it gets `FlightAbandoned` and calls upstream itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.cache.redis_store import RedisLock

T = TypeVar("T")


class FlightAbandoned(Exception):
    """No shared result for this follower: call upstream directly.

    `reason` is `timeout`, `leader_failed` or `no_result` (the leader returned None).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"single-flight abandoned: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class _Outcome(Generic[T]):
    """What a leader left for its followers; never an exception, so none goes unretrieved."""

    result: T | None = None
    failed: bool = False


class SingleFlight:
    """One in-flight leader per key; followers share its result (treat it as read-only)."""

    def __init__(self, *, lock: RedisLock | None = None, poll_interval_s: float = 0.05,
                 lock_ttl_s: float = 3.0) -> None:
        self._lock = lock
        self._poll_interval_s = poll_interval_s
        self._lock_ttl_ms = max(1, int(lock_ttl_s * 1000))
        self._flights: dict[str, asyncio.Future[_Outcome[Any]]] = {}
        #: per key whose leader here waits for the cross-replica lock: where a request that took it hands it over
        self._handed: dict[str, asyncio.Future[str]] = {}

    def __len__(self) -> int:
        """Keys with a leader in flight right now."""
        return len(self._flights)

    async def run(self, key: str, leader_fn: Callable[[], Awaitable[T]], timeout_s: float, *,
                  poll_fn: Callable[[], Awaitable[T | None]] | None = None,
                  hold: Callable[[], Awaitable[Any]] | None = None,
                  tried: bool = False, token: str | None = None) -> tuple[T, bool]:
        """`(result, was_leader)`: lead and call `leader_fn`, or share the leader's result.

        `poll_fn` (the cache lookup) is used with a lock, when another replica leads. A leader awaits
        `hold` (the answer's cache write) after its followers here have the result and before it gives
        the lock back, so the replica that takes the lock next finds the answer instead of calling again;
        `hold` returning True says the write released the lock too (`write_and_give_back`).
        `tried`: the caller already tried the lock, with `read_or_acquire` (`token`: it holds it now; from the
        run's first step the run gives it back, or hands it to the leader here that waits for that lock).
        Raises `FlightAbandoned` to a follower that must go direct; a leader's own
        exception propagates to the leader only.
        """
        flight = self._flights.get(key)
        if flight is not None:
            if token is not None and not self._hand_over(key, token):     # the leader here needs no lock
                await asyncio.shield(self._lock.release(self._lock.key_for(key), token))
            return await self._follow(flight, timeout_s), False
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight

        def land(outcome: _Outcome) -> None:
            """End the flight: its followers get `outcome`, later requests no longer join it."""
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.done():
                flight.set_result(outcome)

        try:
            result, was_leader = await self._lead(key, leader_fn, timeout_s, poll_fn, land, hold, tried, token)
        except BaseException:
            land(_Outcome(failed=True))
            raise
        land(_Outcome(result))
        return result, was_leader

    def _hand_over(self, key: str, token: str) -> bool:
        """Give the lock `token` holds to the leader here that waits for it, if one does (True)."""
        waiting = self._handed.get(key)
        if waiting is None or waiting.done():
            return False
        waiting.set_result(token)
        return True

    @property
    def local_only(self) -> bool:
        """No cross-replica lock: leading is decided in this process alone, with no waiting."""
        return self._lock is None

    async def read_or_acquire(self, key: str) -> tuple[bytes | None, str | None]:
        """The stored entry at `key`, or else an attempt at the cross-replica lock, in one round trip: see
        `RedisLock.read_or_acquire`; pass what it gives to `run` as `tried=True, token=...`."""
        return await self._lock.read_or_acquire(key, self._lock_ttl_ms)

    async def write_and_give_back(self, key: str, value: bytes, ttl_s: int, token: str) -> bool:
        """A leader's answer stored and the lock `read_or_acquire` took for it released, in one round trip (the
        flight's `hold` then says so, and the release is not sent again); see `RedisLock.write_and_release`."""
        return await self._lock.write_and_release(key, value, ttl_s, token)

    async def give_back(self, key: str, token: str) -> None:
        """Release the lock of `key` that `read_or_acquire` took, when no flight was led with it."""
        await self._lock.release(self._lock.key_for(key), token, after_response=True)

    def try_lead(self, key: str) -> "LocalFlight | None":
        """Lead `key` at once, in this process; None when another request already leads it."""
        if key in self._flights:
            return None
        future = asyncio.get_running_loop().create_future()
        self._flights[key] = future
        return LocalFlight(self, key, future)

    async def follow(self, key: str, timeout_s: float) -> T:
        """The result of the leader of `key`; FlightAbandoned when there is none to share."""
        flight = self._flights.get(key)
        if flight is None:
            raise FlightAbandoned("no_result")
        return await self._follow(flight, timeout_s)

    async def _follow(self, flight: asyncio.Future[_Outcome[T]], timeout_s: float) -> T:
        """Wait for the leader's outcome (shielded: a follower leaving does not cancel it)."""
        try:
            outcome = await asyncio.wait_for(asyncio.shield(flight), timeout_s)
        except TimeoutError as exc:
            raise FlightAbandoned("timeout") from exc
        if outcome.failed:
            raise FlightAbandoned("leader_failed")
        if outcome.result is None:
            raise FlightAbandoned("no_result")
        return outcome.result

    async def _lead(self, key: str, leader_fn: Callable[[], Awaitable[T]], timeout_s: float,
                    poll_fn: Callable[[], Awaitable[T | None]] | None,
                    land: Callable[[_Outcome], None],
                    hold: Callable[[], Awaitable[Any]] | None = None,
                    tried: bool = False, token: str | None = None) -> tuple[T, bool]:
        """Call `leader_fn`, unless another replica holds the lock and its answer arrives.

        The local flight lands as soon as the answer is in, before the lock is given back: a request
        arriving after the answer reads the cache; it does not join a flight that is only releasing.
        """
        if self._lock is None or poll_fn is None:
            return await leader_fn(), True
        lock, lock_key = self._lock, self._lock.key_for(key)
        if token is None:
            token, polled = await self._elect(key, lock, lock_key, timeout_s, poll_fn, tried)
            if polled is not None:
                return polled, False
        keeper = asyncio.ensure_future(self._keep(lock, lock_key, token)) if token is not None else None
        released = False
        try:
            result = await leader_fn()
            land(_Outcome(result))
            if hold is not None:
                released = await hold() is True
            return result, True
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            if token is not None and not released:      # the leader has answered: nobody waits for this release
                await lock.release(lock_key, token, after_response=True)

    async def _keep(self, lock: RedisLock, lock_key: str, token: str) -> None:
        """Extend the lock every third of its TTL while the leader works; stop once it is lost."""
        while True:
            await asyncio.sleep(self._lock_ttl_ms / 3000)
            if not await lock.extend(lock_key, token, self._lock_ttl_ms):
                return

    async def _elect(self, key: str, lock: RedisLock, lock_key: str, timeout_s: float,
                     poll_fn: Callable[[], Awaitable[T | None]], tried: bool = False) -> tuple[str | None, T | None]:
        """Take the lock, or poll until the holder's answer appears or time runs out.

        The answer is checked after every attempt, won or lost, so a leader that
        finished just before we took the lock is not called twice. A request that
        waited for a holder which let go without an answer to share (an error, an
        answer not cached) calls upstream itself without the lock, as do the
        others that waited with it: they do not queue behind one another.
        `tried`: a first attempt found the lock held and no answer, so this one starts by waiting.
        A request here whose read took the lock meanwhile (it found this flight and joins it) hands the lock over:
        this one leads with it, as that request would have.
        """
        loop = asyncio.get_running_loop()
        handed = self._handed[key] = loop.create_future()
        kept: str | None = None
        try:
            kept, polled = await self._take_or_poll(lock, lock_key, loop.time() + timeout_s, poll_fn, tried, handed)
            return kept, polled
        finally:
            if self._handed.get(key) is handed:
                del self._handed[key]
            if handed.done() and handed.result() != kept:       # handed over too late to be used
                await asyncio.shield(lock.release(lock_key, handed.result(), after_response=True))

    async def _take_or_poll(self, lock: RedisLock, lock_key: str, deadline_s: float,
                            poll_fn: Callable[[], Awaitable[T | None]], tried: bool,
                            handed: asyncio.Future[str]) -> tuple[str | None, T | None]:
        """`_elect`'s loop: the lock taken or `handed` over, or the holder's answer, or time out."""
        loop = asyncio.get_running_loop()
        waited = tried
        if tried:
            await asyncio.wait((handed,), timeout=self._poll_interval_s)
        while True:
            if handed.done():
                return handed.result(), None
            taking = asyncio.ensure_future(lock.acquire(lock_key, ttl_ms=self._lock_ttl_ms))
            try:
                token = await asyncio.shield(taking)
                polled = await poll_fn()
                if polled is not None or (token is not None and waited):
                    if token is not None:   # an answer to share, or a holder gone without one: no lock needed
                        await lock.release(lock_key, token)
                    return None, polled
            except BaseException:           # cancelled (the client left) taking or holding the lock: give it back
                await asyncio.shield(_give_back_taken(lock, lock_key, taking))
                raise
            if token is not None or loop.time() >= deadline_s:
                return token, None
            waited = True
            await asyncio.wait((handed,), timeout=self._poll_interval_s)


async def _give_back_taken(lock: RedisLock, lock_key: str, taking: asyncio.Future[str | None]) -> None:
    """Release the lock an attempt took, once Redis has answered it: a SET sent before its taker left still lands."""
    token = await taking
    if token is not None:
        await lock.release(lock_key, token, after_response=True)


class LocalFlight:
    """A flight led in this process; `land` hands the result (or None) to the followers, once."""

    __slots__ = ("_owner", "_key", "_future")

    def __init__(self, owner: SingleFlight, key: str, future: asyncio.Future) -> None:
        self._owner, self._key, self._future = owner, key, future

    def land(self, result: Any) -> None:
        if self._future.done():
            return
        if self._owner._flights.get(self._key) is self._future:
            del self._owner._flights[self._key]
        self._future.set_result(_Outcome(result))
