"""The cross-replica single-flight lock at its edges: a request that leaves at any point, a slow or lost Redis
reply and Redis Cluster leave no lock held for its TTL and release none another holder owns.

The lock is exercised through `SingleFlight` and `RedisLock` on a real redis-server (behind a proxy that delays
its replies where timing matters), on a real 3-master Redis Cluster, and through running gateways.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from gateway.cache.redis_store import RedisCache, RedisLock
from gateway.cache.singleflight import SingleFlight
from tests.support.redis_delay import DelayingRedisProxy

KEY = "gw:c:v2:edge"
LOCK = RedisLock.key_for(KEY)
#: how late every Redis reply comes through the proxy
REPLY_DELAY_S = 0.3


async def never_called() -> bytes:
    raise AssertionError("a request that left called upstream")


async def wait_until(predicate, timeout_s: float) -> float:
    """Seconds until the async `predicate` holds (it must, within `timeout_s`)."""
    started_s = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started_s < timeout_s, "it never happened"
        await asyncio.sleep(0.005)
    return time.monotonic() - started_s


async def test_a_follower_that_leaves_while_taking_the_lock_gives_it_back(redis_server) -> None:
    """A follower whose client leaves while its attempt at the lock is on its way releases the lock that attempt
    took once Redis answers, instead of leaving it held for its TTL (3 s) by a token nobody knows."""
    proxy = DelayingRedisProxy(redis_server.port, REPLY_DELAY_S).start()
    cache = RedisCache.from_url(proxy.url, timeout_s=5.0)     # connecting takes several replies
    direct = Redis.from_url(redis_server.url)
    try:
        lock = RedisLock(cache)
        await lock.release("warm", "nobody")            # the release script loaded: one round trip from now on
        flight = SingleFlight(lock=lock, poll_interval_s=0.01)
        follower = asyncio.create_task(flight.run(KEY, never_called, 5.0, poll_fn=lambda: cache.get(KEY),
                                                  tried=True))
        await wait_until(lambda: direct.exists(LOCK), 2.0)    # its SET has landed; the reply is still on its way
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower
        held_s = await wait_until(lambda: _gone(direct, LOCK), 5.0)
        assert held_s < 1.5, f"the lock was held {held_s:.2f} s after its taker left (its TTL is 3 s)"
    finally:
        await direct.aclose()
        await cache.close()
        proxy.stop()


async def _gone(client: Redis, key: str) -> bool:
    return not await client.exists(key)


# Redis Cluster ------------------------------------------------------------------------------------

async def test_the_lock_scripts_run_in_the_entry_slot_on_every_cluster_master(cluster) -> None:
    """On a 3-master Redis Cluster each entry's lock hashes to the entry's slot (CLUSTER KEYSLOT), so the
    read-or-lock and write-and-release scripts run on the entry's master without a cross-slot refusal."""
    from redis.asyncio.cluster import RedisCluster as ClusterClient

    from gateway.cache.key import cache_key

    client = ClusterClient(host="127.0.0.1", port=cluster.ports[0], socket_timeout=2.0)
    await client.initialize()
    try:
        cache = RedisCache(client, 2.0)
        lock = RedisLock(cache)
        keys = [cache_key(prefix="gw", tenant=f"t{index}", route="chat", resolved="chat", endpoint="chat",
                          body={"messages": [], "temperature": 0}) for index in range(12)]
        assert len({client.get_node_from_key(key).name for key in keys}) == 3
        for key in keys:
            node = client.get_node_from_key(key)
            entry_slot = await client.execute_command("CLUSTER KEYSLOT", key, target_nodes=node)
            lock_slot = await client.execute_command("CLUSTER KEYSLOT", lock.key_for(key), target_nodes=node)
            assert entry_slot == lock_slot
            entry, token = await lock.read_or_acquire(key, 5000)
            assert entry is None and token is not None
            assert await lock.read_or_acquire(key, 5000) == (None, None)         # held: no second leader
            assert await lock.write_and_release(key, b"answer", 60, token) is True
            assert await client.exists(lock.key_for(key)) == 0
            assert await lock.read_or_acquire(key, 5000) == (b"answer", None)
        assert cache.errors == 0
    finally:
        await client.flushall(target_nodes=ClusterClient.PRIMARIES)
        await client.aclose()


# A request that took the lock while this process already had a flight for its key ----------------------------

async def test_a_lock_taken_beside_a_waiting_local_flight_is_handed_to_it(redis_server) -> None:
    """A request whose read took the lock joins the flight already waiting here (one that found that lock held) and
    hands it the lock, so that flight leads under the lock and another replica waits for its answer instead of
    calling upstream a second time."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=1.0)
    try:
        here, there = (SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01) for _ in range(2))
        calls = []

        async def lead_and_store() -> bytes:
            calls.append(1)
            await asyncio.sleep(0.3)
            await cache.set(KEY, b"answer", ttl_s=60)
            return b"answer"

        def poll() -> asyncio.Future:
            return cache.get(KEY)

        _, token = await here.read_or_acquire(KEY)          # request A's read: no entry, the lock taken
        assert token is not None
        waiting = asyncio.create_task(here.run(KEY, lead_and_store, 5.0, poll_fn=poll, tried=True))     # B
        await asyncio.sleep(0.05)           # B's read found A's lock; B reached the flight first and waits on it
        holder = asyncio.create_task(here.run(KEY, lead_and_store, 5.0, poll_fn=poll, tried=True, token=token))
        await asyncio.sleep(0.1)
        elsewhere = await there.run(KEY, lead_and_store, 5.0, poll_fn=poll)
        assert [result for result, _ in await asyncio.gather(waiting, holder)] == [b"answer", b"answer"]
        assert elsewhere == (b"answer", False)
        assert len(calls) == 1
        assert await wait_until(lambda: _gone(cache.client, LOCK), 1.0) < 1.0
    finally:
        await cache.close()



async def test_a_lock_handed_over_while_the_flight_finds_the_answer_is_given_back(redis_server) -> None:
    """A request here hands its lock to the flight waiting for it just as that flight finds the holder's answer:
    the flight needs no lock then, and releases the handed one at once instead of leaving it to expire."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=1.0)
    try:
        here, elsewhere = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01), RedisLock(cache)
        looking, answer_stored = asyncio.Event(), asyncio.Event()

        async def poll() -> bytes | None:
            looking.set()
            await answer_stored.wait()
            return b"answer"

        async def never_called() -> bytes:
            raise AssertionError("the answer was there to share")

        holder = await elsewhere.acquire(LOCK, ttl_ms=10_000)        # another replica leads
        waiting = asyncio.create_task(here.run(KEY, never_called, 5.0, poll_fn=poll))
        await looking.wait()                                          # the flight looks up the answer
        await elsewhere.release(LOCK, holder)                         # the other replica answered and let go
        _, token = await here.read_or_acquire(KEY)                    # a request here takes the free lock
        assert token is not None
        joined = asyncio.create_task(here.run(KEY, never_called, 5.0, poll_fn=poll, tried=True, token=token))
        await asyncio.sleep(0)
        answer_stored.set()
        assert await asyncio.gather(waiting, joined) == [(b"answer", False), (b"answer", False)]
        assert await wait_until(lambda: _gone(cache.client, LOCK), 1.0) < 1.0
    finally:
        await cache.close()

# Through the gateway: every way a leader ends gives its lock back at once -------------------------------------

#: how long the scripted model waits before answering: long enough to see the leader's lock
CALL_S = 0.4


@pytest.fixture(scope="module")
def gateway_on_redis(module_redis_server):
    """A gateway caching route `raw-cached` (the scripted model `raw`) in a real redis-server, and a client of it."""
    import os

    import redis

    from tests.support.harness import RAW_CACHED_ROUTE, Harness, raw_model_policy
    from tests.support.raw_upstream import RawUpstream

    environ = {**os.environ, "OTEL_SDK_DISABLED": "true", "GATEWAY_REDIS_URL": module_redis_server.url}
    raw = RawUpstream().start()
    gw = Harness(raw_model_policy(raw.url, first_byte_s=5, tail=RAW_CACHED_ROUTE),
                 sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")},
                 environ=environ).start()
    client = redis.Redis.from_url(module_redis_server.url)
    yield gw, raw, client
    client.close()
    gw.stop()
    raw.stop()


def held_after_answer_s(gw_raw_client, content: str, *, stream: bool = False, client_timeout_s: float = 10.0) -> float:
    """Ask once (the call leads: its read took the lock); seconds the lock outlived the answer (or the client)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    gw, _, client = gw_raw_client
    request = {"model": "raw-cached", "messages": [{"role": "user", "content": content}], "temperature": 0}

    def ask() -> None:
        try:
            answer = gw.openai(timeout=client_timeout_s).chat.completions.create(**request, stream=stream)
            if stream:
                list(answer)
        except (openai.APIError, openai.APITimeoutError):
            pass                            # an error answer, a cut stream or a client that gave up: all end here

    with ThreadPoolExecutor(1) as pool:
        asking = pool.submit(ask)
        deadline_s = time.monotonic() + CALL_S
        while not client.keys("*:lock") and time.monotonic() < deadline_s:
            time.sleep(0.005)
        assert client.keys("*:lock"), "the request took no lock: the test shows nothing"
        asking.result()
    ended_s = time.monotonic()
    while client.keys("*:lock") and time.monotonic() < ended_s + 5:
        time.sleep(0.01)
    return time.monotonic() - ended_s


@pytest.mark.parametrize("ending", ["error", "cut_stream", "not_cached", "client_left"])
def test_a_leader_gives_its_lock_back_however_its_call_ends(gateway_on_redis, ending) -> None:
    """A leader whose call ends in an error, a cut stream, an answer the cache does not keep, or a client that left
    mid-call gives its lock back at once: other replicas do not wait out its TTL (3 s)."""
    from tests.support.raw_upstream import SSE_HEAD, chunk, http_head, json_answer, sse

    gw, raw, _ = gateway_on_redis
    filtered = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                             "finish_reason": "content_filter"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}
    scripts = {
        "error": [(b"", CALL_S), *json_answer({"error": {"message": "boom"}}, status=400)],
        "cut_stream": [(SSE_HEAD, CALL_S), (sse(chunk("", role=True), chunk("Hel")), 0.0)],
        "not_cached": [(b"", CALL_S), *json_answer(filtered)],
        "client_left": [(b"", 3.0), (http_head(200, {"Content-Type": "application/json"}, 2) + b"{}", 0.0)],
    }
    raw.script = scripts[ending]
    held_s = held_after_answer_s(gateway_on_redis, f"How does it end: {ending}?", stream=ending == "cut_stream",
                                 client_timeout_s=CALL_S + 0.2 if ending == "client_left" else 10.0)
    assert held_s < 1.0, f"the lock outlived the {ending} by {held_s:.2f} s"


def test_redis_down_then_back_leaves_no_lock_and_caches_again(redis_server) -> None:
    """With Redis gone every request leads on the lock granted by default and answers; once Redis is back the next
    request leads under a real lock, stores its answer and gives the lock back, and the one after is a hit."""
    import os

    import redis

    from tests.support.harness import RAW_CACHED_ROUTE, Harness, raw_model_policy
    from tests.support.raw_upstream import COMPLETION, RawUpstream, json_answer

    environ = {**os.environ, "OTEL_SDK_DISABLED": "true", "GATEWAY_REDIS_URL": redis_server.url}
    raw = RawUpstream().start()
    raw.script = json_answer(COMPLETION)
    gw = Harness(raw_model_policy(raw.url, first_byte_s=5, tail=RAW_CACHED_ROUTE + "store: {{timeout_ms: 200}}\n"),
                 sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")},
                 environ=environ).start()
    request = {"model": "raw-cached", "messages": [{"role": "user", "content": "Outage?"}], "temperature": 0}

    def status() -> str:
        return gw.openai().chat.completions.with_raw_response.create(**request).headers["x-gateway-cache"]

    try:
        redis_server.stop()
        assert [status(), status()] == ["bypass", "bypass"]      # no lookup could be made
        redis_server.start()
        time.sleep(1.2)                     # the cache's back-off (1 s) runs out
        client = redis.Redis.from_url(redis_server.url)
        deadline_s = time.monotonic() + 5
        while status() != "stored":
            assert time.monotonic() < deadline_s, "the cache never stored again"
        while client.keys("*:lock") and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert client.keys("*:lock") == []
        assert status() == "hit"
        client.close()
    finally:
        gw.stop()
        raw.stop()


async def test_a_second_lock_token_joining_a_flight_already_handed_one_follows_it(redis_server) -> None:
    """Two requests here each holding a lock token for one key (Redis failing over grants one to each) join the
    flight that waits for the lock: the first hands its token over, the second gives its own back and follows;
    neither request fails."""
    cache = RedisCache.from_url(redis_server.url, timeout_s=1.0)
    try:
        here, elsewhere = SingleFlight(lock=RedisLock(cache), poll_interval_s=0.01), RedisLock(cache)
        polling = asyncio.Event()

        async def poll() -> None:
            polling.set()

        async def answer() -> bytes:
            return b"answer"

        holder = await elsewhere.acquire(LOCK, ttl_ms=10_000)
        assert holder is not None
        waiting = asyncio.create_task(here.run(KEY, answer, 5.0, poll_fn=poll))
        await polling.wait()
        joined = [asyncio.create_task(here.run(KEY, answer, 5.0, poll_fn=poll, tried=True, token=token))
                  for token in ("token-one", "token-two")]
        assert await asyncio.gather(waiting, *joined) == [(b"answer", True), (b"answer", False), (b"answer", False)]
    finally:
        await cache.close()
