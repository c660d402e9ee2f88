"""The store boundary itself: which failures back off, and how a back-off ends."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
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


async def test_a_failure_inside_the_redis_client_is_an_outage_not_a_request_error(caplog):
    """redis-py's Cluster client raises AttributeError on a node's closed transport as the node dies: the call gets
    the default and starts a back-off, said at ERROR with the traceback once, where it used to escape as a 500."""
    guard = StoreGuard("test store", 1.0, backoff_s=5.0, clock=Clock())

    async def broken_client():             # redis-py writing to a connection whose transport is gone, as its
        connection = Connection()           # cluster client does as a node dies
        await connection._send_packed_command([b"PING"])

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        assert await guard.run(broken_client) is STORE_DOWN
        assert await guard.run(broken_client) is STORE_DOWN             # in the back-off: not sent, not said
    assert guard.failures == 2 and not guard.healthy
    [said] = caplog.records
    assert said.levelno == logging.ERROR and said.exc_info and "failed inside the Redis client" in said.getMessage()


async def test_a_callers_own_bug_is_not_taken_for_the_stores_outage():
    """An exception raised by the caller's code (building a command's arguments), not inside redis-py, is the
    caller's: it is raised, not answered as the store's outage."""
    guard = StoreGuard("test store", 1.0, clock=Clock())

    async def callers_bug():
        raise ValueError("a bug of ours")

    try:
        await guard.run(callers_bug)
    except ValueError:
        pass
    else:
        raise AssertionError("the caller's bug was swallowed")
    assert guard.healthy and guard.failures == 0


async def test_an_outage_flapping_as_redis_resumes_is_said_once(caplog):
    """Outages that begin within FLAP_QUIET_S of the last one's end (a Redis working through its backlog as it
    resumes, one Cluster node down among healthy ones) are counted but not warned of again: one pair of warnings,
    not one per flap."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=0.5, clock=clock)

    async def fails():
        raise TimeoutError()

    async def answers():
        return "ok"

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        for _ in range(6):
            assert await guard.run(fails) is STORE_DOWN
            clock.now_s += 1.0                                          # past the back-off: the next call probes
            assert await guard.run(answers) == "ok"
        assert await guard.run(fails) is STORE_DOWN                    # flapping again, then down for good:
        for _ in range(12):                                             # said once it lasts past FLAP_QUIET_S
            clock.now_s += 1.0
            assert await guard.run(fails) is STORE_DOWN
        clock.now_s += 1.0
        assert await guard.run(answers) == "ok"                         # and its end is said
    said = [r.getMessage().split(" (")[0].split(" after")[0].split(" for ")[0] for r in caplog.records]
    assert said == ["test store unavailable", "test store reachable again", "test store unavailable",
                    "test store reachable again"]
    assert guard.failures == 19
