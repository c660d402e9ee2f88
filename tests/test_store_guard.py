"""The store boundary itself: which failures back off, and how a back-off ends."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.store_guard import LATE_MARGIN_S, REFUSED_WARNING_S, STORE_DOWN, RedisClock, StoreGuard
from tests.support.redis_delay import DelayingRedisProxy
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


async def times_out():
    """A store call that times out."""
    raise TimeoutError()


async def answers_ok():
    """A store call that answers."""
    return "ok"


async def test_an_outage_flapping_as_redis_resumes_is_said_once(caplog):
    """Outages that begin within FLAP_QUIET_S of the last one's end (a Redis working through its backlog as it
    resumes, one Cluster node down among healthy ones) are counted but not warned of again: one pair of warnings,
    not one per flap."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=0.5, clock=clock)

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        for _ in range(6):
            assert await guard.run(times_out) is STORE_DOWN
            clock.now_s += 1.0                                          # past the back-off: the next call probes
            assert await guard.run(answers_ok) == "ok"
        assert await guard.run(times_out) is STORE_DOWN                    # flapping again, then down for good:
        for _ in range(12):                                             # said once it lasts past FLAP_QUIET_S
            clock.now_s += 1.0
            assert await guard.run(times_out) is STORE_DOWN
        clock.now_s += 1.0
        assert await guard.run(answers_ok) == "ok"                         # and its end is said
    said = [r.getMessage().split(" (")[0].split(" after")[0].split(" for ")[0] for r in caplog.records]
    assert said == ["test store unavailable", "test store reachable again", "test store unavailable",
                    "test store reachable again"]
    assert guard.failures == 19


async def test_a_reply_later_than_the_timeout_gets_the_default_and_starts_a_back_off(redis_server, caplog):
    """A Redis that answers later than timeout_s is taken for unreachable: the call gets the default without
    waiting for the reply, a back-off starts, and the one warning says the call timed out."""
    proxy = DelayingRedisProxy(redis_server.port, 1.5).start()
    client = Redis.from_url(proxy.url)
    guard = StoreGuard("test store", 0.2, backoff_s=60.0)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
            started_s = time.monotonic()
            assert await guard.run(client.ping) is STORE_DOWN
            assert time.monotonic() - started_s < 1.2                      # not the 1.5 s the reply takes
        assert not guard.healthy and guard.backing_off and guard.failures == 1
        [said] = caplog.records
        assert said.getMessage() == "test store unavailable (TimeoutError: timed out)", said.getMessage()
    finally:
        await client.aclose()
        proxy.stop()


async def test_a_call_given_a_longer_timeout_waits_past_the_guards_own(redis_server):
    """A write after the response given its own, longer timeout_s (a budget flush) gets a reply slower than the
    guard's timeout, rather than being given up on, retried and counted lost."""
    proxy = DelayingRedisProxy(redis_server.port, 0.4).start()
    client = Redis.from_url(proxy.url)
    guard = StoreGuard("test store", 0.2, backoff_s=60.0)
    try:
        assert await guard.run(client.ping, after_response=True, timeout_s=5.0) is True
        assert guard.healthy and guard.failures == 0
    finally:
        await client.aclose()
        proxy.stop()


async def test_a_back_off_ends_for_the_response_path_once_backoff_s_has_passed():
    """`backing_off` (which tells the limiter and the budgets not to send a script) holds only for backoff_s:
    past it a call may probe, though Redis is not known healthy until one answers."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=5.0, clock=clock)

    assert await guard.run(times_out) is STORE_DOWN
    clock.now_s += 4.9
    assert guard.backing_off
    clock.now_s += 0.1
    assert not guard.backing_off and not guard.healthy


async def test_a_socket_error_not_wrapped_by_redis_py_starts_a_back_off():
    """A connection reset that reaches the guard as a bare OSError (not wrapped as redis-py's ConnectionError)
    means Redis could not be reached: a back-off starts, not the once-a-minute treatment of an error reply."""
    async def reset() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    guard = StoreGuard("test store", 1.0, backoff_s=5.0, clock=Clock())
    assert await guard.run(reset) is STORE_DOWN
    assert not guard.healthy and guard.backing_off


async def test_a_call_left_out_by_the_back_off_gets_its_callers_default():
    """In a back-off a call is answered with the default its caller gave (a cache miss, an allowed admission),
    as when the store fails, not with STORE_DOWN, which the caller would take for the store's answer."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=5.0, clock=clock)

    assert await guard.run(times_out, default=None) is None
    assert guard.backing_off
    assert await guard.run(answers_ok, default=None) is None
    assert await guard.run(answers_ok, default=0) == 0
    assert guard.failures == 3


async def test_each_outage_ended_says_only_the_calls_answered_without_redis_during_it(caplog):
    """The "reachable again" warning of a second outage, well apart from the first, counts that outage's calls
    answered without Redis, not the first's as well."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=0.5, clock=clock)

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        for calls_without_redis in (3, 2):
            assert await guard.run(times_out) is STORE_DOWN
            for _ in range(calls_without_redis - 1):
                assert await guard.run(answers_ok) is STORE_DOWN            # in the back-off: not sent
            clock.now_s += 1.0
            assert await guard.run(answers_ok) == "ok"
            clock.now_s += 60.0                                         # well past FLAP_QUIET_S: a new outage
    ended = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert ended == ["test store reachable again after 3 calls answered without it",
                     "test store reachable again after 2 calls answered without it"], ended


async def test_the_calls_of_a_quiet_flap_are_counted_into_the_next_outage_said_to_end(caplog):
    """A flap's calls answered without Redis (not said, as the flap is not) are counted into the next "reachable
    again" warning, so the warnings add up to every call answered without Redis."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=0.5, clock=clock)

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        for pause_s in (0.0, 1.0, 60.0):                                # an outage, a flap 1 s later, one 60 s later
            clock.now_s += pause_s
            assert await guard.run(times_out) is STORE_DOWN
            clock.now_s += 1.0
            assert await guard.run(answers_ok) == "ok"
    ended = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert ended == ["test store reachable again after 1 calls answered without it",
                     "test store reachable again after 2 calls answered without it"], ended
    assert guard.failures == 3


async def test_a_later_error_reply_warning_counts_only_the_refusals_since_the_one_before(redis_server, caplog):
    """Error replies are warned of once per REFUSED_WARNING_S, each warning counting the refusals since the
    previous one, so a full Redis's log adds up to the calls it refused."""
    client = Redis.from_url(redis_server.url)
    clock = Clock()
    guard = StoreGuard("test store", 1.0, clock=clock)
    try:
        await client.rpush("a-list", "x")
        with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
            for _ in range(3):
                assert await guard.run(lambda: client.incr("a-list")) is STORE_DOWN
            clock.now_s += REFUSED_WARNING_S
            assert await guard.run(lambda: client.incr("a-list")) is STORE_DOWN
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            "test store refused 1 call(s) since the last such warning",
            "test store refused 3 call(s) since the last such warning"]
    finally:
        await client.aclose()


def test_a_scripts_deadline_is_on_redis_clock_however_far_this_hosts_is_off():
    """A Redis clock 10 s ahead of this host's puts a script's deadline 10 s later than this host's clock
    would: the wait, LATE_MARGIN_S and the offset; none before any reply told Redis's time."""
    clock = RedisClock()
    assert clock.deadline_ms(2.0) == 0
    clock.learn(int(time.time() * 1000) + 10_000)
    expected_ms = (time.time() + 2.0 + LATE_MARGIN_S + 10.0) * 1000
    assert abs(clock.deadline_ms(2.0) - expected_ms) < 500


async def test_a_call_finding_every_pooled_connection_busy_waits_for_one(redis_server):
    """A burst larger than the pool is no outage: a call that finds every connection busy waits, within the
    timeout, for one to come free, and gets Redis's answer."""
    client = Redis.from_url(redis_server.url, max_connections=1)
    guard = StoreGuard("test store", 5.0, backoff_s=60.0)
    try:
        await client.set("pooled", "kept")
        slow = guard.run(lambda: client.blpop(["nothing-here"], timeout=0.3))     # holds the one connection
        answers = await asyncio.gather(slow, guard.run(lambda: client.get("pooled")))
        assert answers == [None, b"kept"]
        assert guard.healthy and guard.failures == 0
    finally:
        await client.aclose()


async def test_an_outage_taken_for_a_flap_is_said_once_it_has_lasted_flap_quiet_s_of_its_own(caplog):
    """An outage beginning soon after the last one ended is quiet at first; it is said once it has itself lasted
    FLAP_QUIET_S, counted from its own start, not from the end of the outage before."""
    clock = Clock()
    guard = StoreGuard("test store", 1.0, backoff_s=0.5, clock=clock)

    with caplog.at_level(logging.WARNING, logger="gateway.store_guard"):
        assert await guard.run(times_out) is STORE_DOWN
        clock.now_s += 1.0
        assert await guard.run(answers_ok) == "ok"
        clock.now_s += 8.0                                              # 8 s after the end: a flap, quiet
        assert await guard.run(times_out) is STORE_DOWN
        clock.now_s += 3.0                                              # 11 s after the end, 3 s into it
        assert await guard.run(times_out) is STORE_DOWN
        clock.now_s += 8.0                                              # 11 s into it: said
        assert await guard.run(times_out) is STORE_DOWN
    said = [r.getMessage() for r in caplog.records]
    assert said[2:] == ["test store unavailable for 11 s"], said
