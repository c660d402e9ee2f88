"""The store boundary itself: which failures back off, and how a back-off ends."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.store_guard import STORE_DOWN, StoreGuard
from tests.support.redis_server import free_port


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


async def test_an_error_reply_is_answered_and_counted_but_starts_no_back_off(redis_server, caplog):
    """Redis answering with an error (here WRONGTYPE; out of memory or a read-only replica alike) is reachable:
    the call gets the default, the calls it still serves go on at once."""
    client = Redis.from_url(redis_server.url)
    guard = StoreGuard("test store", 1.0, backoff_s=60.0)
    try:
        await client.rpush("a-list", "x")
        await client.set("a-string", "kept")
        with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
            for _ in range(5):                                      # a full Redis refuses every write
                assert await guard.run(lambda: client.incr("a-list")) is STORE_DOWN
                assert await guard.run(lambda: client.get("a-string")) == b"kept"  # not backed off, no outage
            assert await guard.run(lambda: client.incr("a-list"), default=0) == 0
        assert guard.failures == 6 and guard.healthy
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            "test store refused 1 call(s) since the last such warning"]            # once a minute, not per call
    finally:
        await client.aclose()


async def test_after_a_back_off_one_call_probes_while_the_others_keep_the_default(redis_server):
    """An unreachable store is left alone for backoff_s; then exactly one call probes it, however many arrive,
    and its success ends the outage for all."""
    down = Redis(port=free_port(), socket_connect_timeout=0.5)        # nothing listens there
    up = Redis.from_url(redis_server.url)
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=5.0, clock=clock)
    tried: list[str] = []

    def command(client: Redis, name: str):
        tried.append(name)
        return client.ping()

    try:
        assert await guard.run(lambda: command(down, "first")) is STORE_DOWN
        assert await guard.run(lambda: command(down, "in the back-off")) is STORE_DOWN
        assert not guard.healthy and tried == ["first"]
        clock.now_s += 5.0
        answers = await asyncio.gather(*(guard.run(lambda n=n: command(down, f"probe {n}")) for n in range(10)))
        assert answers == [STORE_DOWN] * 10 and tried == ["first", "probe 0"]
        clock.now_s += 5.0
        answers = await asyncio.gather(*(guard.run(lambda n=n: command(up, f"probe {n}")) for n in range(10)))
        assert answers[0] is True and answers[1:] == [STORE_DOWN] * 9      # the others came during the probe
        assert guard.healthy and await guard.run(lambda: command(up, "after")) is True
        assert tried == ["first", "probe 0", "probe 0", "after"]
        assert guard.failures == 2 + 10 + 9
    finally:
        await down.aclose()
        await up.aclose()


async def test_calls_after_the_response_are_tried_in_a_back_off_and_end_it(redis_server):
    """Writes after the response (releases, settles, charges) are never skipped; one that lands ends the outage."""
    down = Redis(port=free_port(), socket_connect_timeout=0.5)
    up = Redis.from_url(redis_server.url)
    guard = StoreGuard("test store", 1.0, backoff_s=60.0)
    try:
        assert await guard.run(down.ping) is STORE_DOWN
        assert await guard.run(up.ping) is STORE_DOWN                        # on the response path: skipped
        assert await guard.run(up.ping, after_response=True) is True
        assert guard.healthy and await guard.run(up.ping) is True
    finally:
        await down.aclose()
        await up.aclose()


async def test_a_call_the_cluster_client_refuses_as_cross_slot_starts_no_back_off(cluster):
    """redis-py refusing a script whose keys map to several Cluster slots (before sending it) is a refused call:
    counted, answered with the default, but no outage, so the other calls go on at once."""
    client = ClusterClient.from_url(cluster.url, socket_timeout=2.0)
    guard = StoreGuard("test store", 2.0, backoff_s=60.0)
    try:
        await client.initialize()              # only a client that knows the slots refuses before sending
        script = client.register_script("return 1")
        assert client.keyslot("guard-a") != client.keyslot("guard-b")
        assert await guard.run(lambda: script(keys=["guard-a", "guard-b"])) is STORE_DOWN
        assert guard.healthy and not guard.backing_off and guard.failures == 1
        assert await guard.run(lambda: script(keys=["{guard}a", "{guard}b"])) == 1
    finally:
        await client.aclose()
