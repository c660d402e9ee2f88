"""Single-flight: one upstream call for identical concurrent requests, and no follower hangs."""

from __future__ import annotations

import asyncio
import gc

import pytest
from redis.asyncio import Redis

from gateway.cache.redis_store import RedisCache, RedisLock
from gateway.cache.singleflight import FlightAbandoned, SingleFlight


class Upstream:
    """A stand-in upstream call that counts how often it runs."""

    def __init__(self, delay_s: float = 0.05, fail: bool = False) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("upstream exploded")
        return "answer"


async def run_or_reason(flight: SingleFlight, key: str, upstream: Upstream, timeout_s: float):
    """The run's outcome, with a follower's give-up turned into its reason."""
    try:
        return await flight.run(key, upstream, timeout_s)
    except FlightAbandoned as exc:
        return exc.reason


async def test_fifty_identical_calls_make_one_upstream_call() -> None:
    """50 concurrent calls for one key run the leader once and all get its result."""
    flight, upstream = SingleFlight(), Upstream()
    results = await asyncio.gather(*(flight.run("k", upstream, 1.0) for _ in range(50)))
    assert upstream.calls == 1
    assert [r for r, _ in results] == ["answer"] * 50
    assert sum(was_leader for _, was_leader in results) == 1
    assert len(flight) == 0


async def test_different_keys_do_not_share() -> None:
    """Each key has its own leader."""
    flight, upstream = SingleFlight(), Upstream()
    await asyncio.gather(flight.run("a", upstream, 1.0), flight.run("b", upstream, 1.0))
    assert upstream.calls == 2


async def test_leader_failure_releases_followers() -> None:
    """The leader sees its own error; followers are told to go direct at once, not left hanging."""
    flight, upstream = SingleFlight(), Upstream(fail=True)
    outcomes = await asyncio.wait_for(asyncio.gather(
        *(run_or_reason(flight, "k", upstream, 5.0) for _ in range(5)), return_exceptions=True),
        timeout=1.0)
    assert isinstance(outcomes[0], RuntimeError)
    assert outcomes[1:] == ["leader_failed"] * 4
    assert upstream.calls == 1 and len(flight) == 0


async def test_slow_leader_times_followers_out() -> None:
    """A follower waits at most timeout_s, then goes direct; the leader still finishes."""
    flight, upstream = SingleFlight(), Upstream(delay_s=0.3)
    leader = asyncio.create_task(flight.run("k", upstream, 1.0))
    await asyncio.sleep(0)
    assert await run_or_reason(flight, "k", upstream, 0.05) == "timeout"
    assert await leader == ("answer", True)


async def test_cancelled_leader_releases_followers() -> None:
    """A leader whose client went away hands followers `leader_failed`, and leaves no flight behind."""
    flight, upstream = SingleFlight(), Upstream(delay_s=1.0)
    leader = asyncio.create_task(flight.run("k", upstream, 5.0))
    await asyncio.sleep(0)
    follower = asyncio.create_task(run_or_reason(flight, "k", upstream, 5.0))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await asyncio.wait_for(follower, 1.0) == "leader_failed"
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert len(flight) == 0


async def test_none_result_is_not_shared() -> None:
    """When the leader has nothing to share (an uncacheable answer), followers go direct."""
    flight = SingleFlight()

    async def nothing() -> None:
        await asyncio.sleep(0.02)

    outcomes = await asyncio.gather(flight.run("k", nothing, 1.0),
                                    run_or_reason(flight, "k", Upstream(), 1.0))
    assert outcomes == [(None, True), "no_result"]


async def test_no_unretrieved_exceptions_are_left_behind() -> None:
    """Leader failures, with or without followers, leave nothing for the loop's exception handler."""
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        flight = SingleFlight()
        with pytest.raises(RuntimeError):
            await flight.run("alone", Upstream(fail=True), 1.0)
        await asyncio.gather(run_or_reason(flight, "k", Upstream(fail=True), 1.0),
                             run_or_reason(flight, "k", Upstream(), 0.01), return_exceptions=True)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def race_two_replicas(cache: RedisCache, upstream: Upstream, *, wait_s: float, head_start_s: float,
                            **flight) -> tuple[tuple, tuple]:
    """Two replicas (two SingleFlights on one Redis, `flight` their settings) asked for one key, the first
    `head_start_s` ahead: each one's (answer, led). The leader calls `upstream` and stores the answer; the other
    polls the cache for it."""
    replicas = [SingleFlight(lock=RedisLock(cache), **flight) for _ in range(2)]

    async def lead_and_store() -> bytes:
        await upstream()
        await cache.set("gw:c:v1:k", b"answer", ttl_s=60)
        return b"answer"

    async def poll() -> bytes | None:
        return await cache.get("gw:c:v1:k")

    first = asyncio.create_task(replicas[0].run("gw:c:v1:k", lead_and_store, wait_s, poll_fn=poll))
    await asyncio.sleep(head_start_s)
    second = await replicas[1].run("gw:c:v1:k", lead_and_store, wait_s, poll_fn=poll)
    return await first, second


async def test_replicas_share_one_leader_through_redis(redis_server) -> None:
    """Two replicas (two SingleFlights on one Redis): the loser polls for the winner's answer."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        upstream = Upstream(delay_s=0.1)
        first, second = await race_two_replicas(cache, upstream, wait_s=2.0, head_start_s=0.02, poll_interval_s=0.01)
        assert first == (b"answer", True)
        assert second == (b"answer", False)
        assert upstream.calls == 1
        assert await cache.client.exists("{gw:c:v1:k}:lock") == 0
    finally:
        await cache.close()


async def test_only_the_lock_holder_extends_or_releases_the_lock(redis_server) -> None:
    """A request whose lock lapsed and was taken by another replica neither extends that replica's lock, nor
    releases it, nor releases it with its answer's write: the new holder keeps leading."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    lock = RedisLock(cache)
    lock_key = lock.key_for("gw:c:v2:k")
    try:
        holder = await lock.acquire(lock_key, ttl_ms=10_000)
        assert holder is not None
        assert await lock.extend(lock_key, "a-lapsed-token", ttl_ms=60_000) is False
        assert await cache.client.pttl(lock_key) <= 10_000
        await lock.release(lock_key, "a-lapsed-token")
        assert await lock.write_and_release("gw:c:v2:k", b"answer", 60, "a-lapsed-token")
        assert await cache.get("gw:c:v2:k") == b"answer"
        assert await cache.client.get(lock_key) == holder.encode()
        assert await lock.write_and_release("gw:c:v2:k", b"answer", 60, holder)
        assert await cache.client.exists(lock_key) == 0
    finally:
        await cache.close()


async def test_a_leader_working_longer_than_the_lock_ttl_keeps_the_lock(redis_server) -> None:
    """The leader extends its cross-replica lock while it works: an answer taking over twice the lock's TTL still
    holds the other replica back, which gets the answer instead of calling upstream too."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        upstream = Upstream(delay_s=4.5)
        # a 2 s lock extended every third of it: over a second of margin for a loaded machine's late timer
        answers = await race_two_replicas(cache, upstream, wait_s=10.0, head_start_s=0.1, poll_interval_s=0.02,
                                          lock_ttl_s=2.0)
        assert answers == ((b"answer", True), (b"answer", False))
        assert upstream.calls == 1
    finally:
        await cache.close()


async def test_lock_is_granted_when_redis_is_down(redis_server) -> None:
    """With Redis gone the lock never blocks: every replica leads on its own."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.2)
    try:
        lock = RedisLock(cache)
        assert await lock.acquire("l", ttl_ms=1000) is not None
        assert await lock.acquire("l", ttl_ms=1000) is None
        redis_server.stop()
        assert await lock.acquire("l", ttl_ms=1000) is not None
    finally:
        await cache.close()


async def test_lock_scripts_are_loaded_again_when_the_server_lost_them(redis_server) -> None:
    """After SCRIPT FLUSH (a restarted or flushed Redis) extending and releasing the lock still work."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        lock = RedisLock(cache)
        token = await lock.acquire("l", ttl_ms=1000)
        await cache.client.script_flush()
        assert await lock.extend("l", token, ttl_ms=60_000) is True
        assert await cache.client.pttl("l") > 1000
        await cache.client.script_flush()
        await lock.release("l", token)
        assert await cache.client.exists("l") == 0
        assert cache.healthy
    finally:
        await cache.close()


async def test_a_leader_releases_its_lock_even_in_a_cache_back_off(redis_server) -> None:
    """Redis stalls while the leader works: its lookups back off, yet its lock is released once it has answered,
    so other replicas do not wait for the lock to expire."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.1, backoff_s=60.0)
    pauser = Redis.from_url(redis_server.url)
    flight = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01)

    async def lead_through_a_stall() -> bytes:
        await pauser.execute_command("CLIENT", "PAUSE", 300, "ALL")
        assert await cache.get("gw:c:v1:other") is None           # times out: the back-off starts
        assert not cache.healthy
        await asyncio.sleep(0.4)                                    # Redis answers again
        return b"answer"

    try:
        assert await flight.run("gw:c:v1:k", lead_through_a_stall, 2.0, poll_fn=lambda: cache.get("gw:c:v1:k")) \
            == (b"answer", True)
        assert await pauser.exists("{gw:c:v1:k}:lock") == 0
    finally:
        await pauser.aclose()
        await cache.close()


async def test_a_request_cancelled_while_holding_the_lock_gives_it_back(redis_server) -> None:
    """The client leaves after its replica took the cross-replica lock, while it looks the answer up: the lock is
    released at once, so other replicas do not wait for it to expire."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    flight = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01)
    looking_up = asyncio.Event()

    async def slow_lookup() -> None:
        looking_up.set()
        await asyncio.sleep(10)

    async def upstream() -> bytes:
        return b"never"

    try:
        task = asyncio.create_task(flight.run("gw:c:v1:k", upstream, 2.0, poll_fn=slow_lookup))
        await looking_up.wait()
        assert await cache.client.exists("{gw:c:v1:k}:lock") == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await cache.client.exists("{gw:c:v1:k}:lock") == 0
    finally:
        await cache.close()


async def test_the_lock_is_given_back_only_once_the_answer_is_stored(redis_server) -> None:
    """A leader holds the cross-replica lock through its answer's cache write (`hold`): a replica arriving
    meanwhile finds the stored answer instead of taking the lock and calling upstream a second time."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        replicas = [SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01) for _ in range(2)]
        upstream = Upstream(delay_s=0.0)
        answered, write_now = asyncio.Event(), asyncio.Event()

        async def lead() -> bytes:
            await upstream()
            answered.set()
            return b"answer"

        async def store_the_answer() -> None:           # a cache write that lands a little later
            await write_now.wait()
            await cache.set("gw:c:v1:k", b"answer", ttl_s=60)

        async def poll() -> bytes | None:
            return await cache.get("gw:c:v1:k")

        first = asyncio.create_task(replicas[0].run("gw:c:v1:k", lead, 2.0, poll_fn=poll, hold=store_the_answer))
        await answered.wait()
        second = asyncio.create_task(replicas[1].run("gw:c:v1:k", lead, 2.0, poll_fn=poll))
        await asyncio.sleep(0.1)                        # the second replica polls while the write is pending
        write_now.set()
        assert await first == (b"answer", True)
        assert await second == (b"answer", False)
        assert upstream.calls == 1
    finally:
        await cache.close()


async def test_followers_here_get_the_answer_before_the_leader_s_cache_write_ends(redis_server) -> None:
    """The local flight lands as soon as the leader answers: its followers do not wait for the leader's `hold`
    (the cache write), however long that takes."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        flight = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01)
        write_now = asyncio.Event()

        async def store_once_followed() -> None:
            await write_now.wait()

        leader = asyncio.create_task(flight.run("gw:c:v1:k", Upstream(delay_s=0.05), 5.0,
                                                poll_fn=lambda: cache.get("gw:c:v1:k"), hold=store_once_followed))
        await asyncio.sleep(0)
        follower = await run_or_reason(flight, "gw:c:v1:k", Upstream(), 5.0)
        write_now.set()
        assert follower == ("answer", False)
        assert await leader == ("answer", True)
    finally:
        await cache.close()


async def test_a_leader_ending_its_cache_write_leaves_the_next_flight_for_its_key_in_place(redis_server) -> None:
    """A flight led while the last leader still writes its answer (`hold`) stays joinable when that leader ends:
    a request after it follows the new flight instead of calling upstream again."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=0.5)
    try:
        flight = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01)
        write_now, second_may_answer = asyncio.Event(), asyncio.Event()

        async def first_answer() -> bytes:
            return b"first"

        async def second_answer() -> bytes:
            await second_may_answer.wait()
            return b"second"

        async def nothing_stored() -> None:     # the second leader never finds the first's answer
            return None

        async def write_the_answer() -> None:
            await write_now.wait()

        first = asyncio.create_task(flight.run("gw:c:v1:k", first_answer, 5.0, poll_fn=nothing_stored,
                                               hold=write_the_answer))
        await asyncio.sleep(0)
        assert len(flight) == 1
        deadline = asyncio.get_running_loop().time() + 5.0
        while len(flight) and asyncio.get_running_loop().time() < deadline:    # the first flight has landed
            await asyncio.sleep(0.01)
        second = asyncio.create_task(flight.run("gw:c:v1:k", second_answer, 5.0, poll_fn=nothing_stored))
        await asyncio.sleep(0.05)
        write_now.set()
        assert await first == (b"first", True)
        assert len(flight) == 1
        third = asyncio.create_task(run_or_reason(flight, "gw:c:v1:k", Upstream(), 5.0))
        await asyncio.sleep(0)
        second_may_answer.set()
        assert await second == (b"second", True)
        assert await third == (b"second", False)
    finally:
        await cache.close()
