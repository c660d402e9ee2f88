"""Latency samples shared through a real redis-server (routing.share_estimates): what one process measures,
the others route by."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from gateway.policy.load import load_policy
from gateway.errors import PolicyError
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.sharing import EXPIRY_MARGIN_S, MAX_ENTRIES_READ, MAX_PENDING, EstimateSharing
from tests.support.fakes import FakeClock
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, price
from tests.support.redis_delay import DelayingRedisProxy

SLOW_S = 0.5


def sim_model(name: str, endpoint: str = "http://127.0.0.1:9/v1", ttft_ms: float = 5):
    """A policy model as the loader builds it."""
    return _load(f"""version: 1
models:
  {name}: {{endpoint: "{endpoint}", upstream_model: sim-{name}, latency_prior: {{ttft_ms: {ttft_ms}, tpot_ms: 1}}}}
routes:
  - {{name: r, match: {{models: ["auto"]}}, candidates: [{name}]}}
""").models[name]


def _load(text: str):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory(prefix="shared-est-") as folder:
        path = Path(folder) / "policy.yaml"
        path.write_text(text)
        return load_policy(path)


class Process:
    """One gateway process's estimates and sharing, against a real Redis."""

    def __init__(self, url: str, models_by_name: dict, window_s: float = 300.0, prefix: str = "gw",
                 cluster: bool = False, clock_ahead_s: float = 0.0) -> None:
        self.client = (ClusterClient if cluster else aioredis.Redis).from_url(url)
        self.models = models_by_name
        self.estimates = LatencyEstimates(models_by_name, window_s=window_s)
        self.sharing = EstimateSharing(self.client, prefix, 0.5, self.estimates, lambda: self.models,
                                       wall_clock=lambda: time.time() + clock_ahead_s)
        self.sharing.enabled = True

    def measure(self, name: str, ttft_s: float, count: int = 1) -> None:
        """Record `count` calls measured here, as the fleet does."""
        for _ in range(count):
            self.estimates.record(name, ttft_s, 0.001)
            self.sharing.add(self.models[name], ttft_s, 0.001)

    async def close(self) -> None:
        await self.client.aclose()


@pytest.fixture
async def processes(redis_server):
    made: list[Process] = []

    def make(url: str | None = None, **kwargs) -> Process:
        kwargs.setdefault("models_by_name", {"small": sim_model("small")})
        made.append(Process(url or redis_server.url, **kwargs))
        return made[-1]

    yield make
    for process in made:
        await process.close()


async def test_samples_one_process_measured_reach_another(processes) -> None:
    """Samples process A sent are recorded by process B, which made no call: B's p95 TTFT is A's slow one."""
    a, b = processes(), processes()
    a.measure("small", SLOW_S, 10)
    await a.sharing.sync()
    assert b.estimates.sample_count("small") == 0
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 10
    assert b.estimates.ttft_p95_s("small") == pytest.approx(SLOW_S)


async def test_a_process_does_not_count_its_own_samples_again(processes) -> None:
    """A process reading the stream skips the entries it wrote itself: its windows hold each sample once."""
    a, b = processes(), processes()
    a.measure("small", SLOW_S, 4)
    await a.sharing.sync()
    await a.sharing.sync()
    b.measure("small", 0.01, 3)
    await b.sharing.sync()
    await a.sharing.sync()
    assert a.estimates.sample_count("small") == 4 + 3
    assert b.estimates.sample_count("small") == 3 + 4


async def test_only_new_entries_are_read_on_later_syncs(processes) -> None:
    """Each sync reads past the last entry read: samples sent once are recorded once, however often B syncs."""
    a, b = processes(), processes()
    a.measure("small", SLOW_S, 2)
    await a.sharing.sync()
    for _ in range(3):
        await b.sharing.sync()
    a.measure("small", SLOW_S, 1)
    await a.sharing.sync()
    await b.sharing.sync()
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3


async def test_a_stream_expires_a_margin_past_the_window_after_its_last_write(processes) -> None:
    """Each send sets the stream's time to live to the latency window (rounded up) plus EXPIRY_MARGIN_S: a model
    nobody calls any more leaves Redis, and one still written to does not."""
    a = processes(window_s=30.5)
    a.measure("small", SLOW_S)
    await a.sharing.sync()
    key = a.sharing.key(a.models["small"])
    await a.client.expire(key, 5)               # as if the window were nearly over: the next send sets it again
    a.measure("small", SLOW_S)
    await a.sharing.sync()
    ttl_ms = await a.client.pttl(key)
    assert (31 + EXPIRY_MARGIN_S - 0.5) * 1000 <= ttl_ms <= (31 + EXPIRY_MARGIN_S) * 1000, ttl_ms
    await a.sharing.sync()                      # nothing to send: the time to live runs on
    assert await a.client.pttl(key) <= ttl_ms


async def test_a_send_trims_entries_older_than_the_window_from_the_stream(processes) -> None:
    """Each send trims the stream to the latency window on Redis's clock: a model called all day keeps a window's
    worth of entries in Redis, not the whole day's, and the entry just sent stays."""
    a = processes(window_s=60.0)
    key = a.sharing.key(a.models["small"])
    seconds, _ = await a.client.time()
    hour_ago_ms = (seconds - 3600) * 1000
    pipe = a.client.pipeline(transaction=False)
    for i in range(300):                    # several stream nodes: an approximate trim drops whole ones
        pipe.xadd(key, {"p": "gone", "b": i + 1, "s": b"[[0.5, 0.001, 0]]"}, id=f"{hour_ago_ms}-{i}")
    await pipe.execute()
    await a.sharing.sync()                  # learns Redis's clock; nothing to send yet
    a.measure("small", SLOW_S)
    await a.sharing.sync()
    assert await a.client.xrange(key, "-", f"{hour_ago_ms}-0") == []
    assert await a.client.xlen(key) < 300
    newest = await a.client.xrevrange(key, count=1)
    assert newest[0][1][b"p"] == a.sharing.process_id.encode()


async def test_a_backlog_longer_than_one_read_is_caught_up_on_the_next_sync(processes) -> None:
    """More than MAX_ENTRIES_READ entries since a process last synced: the next sync reads on from the last entry
    the previous one read, so the newest samples (the only ones with a TTFT here) arrive then, not one a sync."""
    b = processes()
    await b.sharing.sync()                  # the stream read once (empty): later syncs read on from there
    key = b.sharing.key(b.models["small"])
    pipe = b.client.pipeline(transaction=False)
    for number in range(1, MAX_ENTRIES_READ + 201):
        sample = b"[[null, 0.001, 0]]" if number <= MAX_ENTRIES_READ else b"[[0.5, 0.001, 0]]"
        pipe.xadd(key, {"p": "busy", "b": number, "s": sample})
    await pipe.execute()
    await b.sharing.sync()                  # the first MAX_ENTRIES_READ entries: time per token only
    assert (b.estimates.sample_count("small"), b.estimates.tpot_sample_count("small")) == (0, MAX_ENTRIES_READ)
    await b.sharing.sync()                  # the 200 after them
    assert b.estimates.sample_count("small") == 200


async def test_a_process_started_later_reads_what_the_fleet_measured(processes) -> None:
    """A process that starts after the samples were sent reads the newest window's worth on its first sync."""
    a = processes()
    for _ in range(3):
        a.measure("small", SLOW_S, 5)
        await a.sharing.sync()
    late = processes()
    await late.sharing.sync()
    assert late.estimates.sample_count("small") == 15


async def test_samples_older_than_the_window_are_not_read(processes) -> None:
    """A sample counts from when it was sent: one older than the latency window reaches no other process, and
    one read late leaves the reader's window when it would have left the sender's."""
    a = processes(window_s=3.0)
    a.measure("small", SLOW_S, 3)
    await a.sharing.sync()
    await asyncio.sleep(1.0)
    b = processes(window_s=3.0)
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3         # 1 s old (2 s of margin for a slow machine): inside
    await asyncio.sleep(2.2)
    assert b.estimates.sample_count("small") == 0         # 3.2 s or more after they were sent: gone, as at A
    c = processes(window_s=3.0)
    await c.sharing.sync()
    assert c.estimates.sample_count("small") == 0


async def test_a_model_on_another_server_keeps_its_own_samples(processes) -> None:
    """Processes whose policies call `small` on different servers never mix their measurements."""
    a = processes(models_by_name={"small": sim_model("small", "http://127.0.0.1:9/v1")})
    b = processes(models_by_name={"small": sim_model("small", "http://127.0.0.1:10/v1")})
    a.measure("small", SLOW_S, 5)
    await a.sharing.sync()
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 0
    c = processes(models_by_name={"small": sim_model("small", "http://127.0.0.1:9/v1", ttft_ms=50)})
    await c.sharing.sync()                  # another prior on the same server: the same measurements
    assert c.estimates.sample_count("small") == 5


async def test_nothing_is_sent_while_sharing_is_off(processes, redis_server) -> None:
    """With routing.share_estimates off, a process's samples stay its own and Redis holds no stream."""
    a = processes()
    a.sharing.enabled = False
    a.measure("small", SLOW_S, 5)
    assert a.sharing.unsent == 0
    assert await a.client.keys("gw:estimates:*") == []


async def back_after_an_outage(redis_server, process) -> None:
    """Redis started again, and `process` syncs at once (its back-off after the outage skipped): what it held
    through the outage goes out."""
    redis_server.start()
    process.sharing.guard._retry_at_s = 0.0
    await process.sharing.sync()


async def test_samples_wait_out_a_redis_outage(processes, redis_server) -> None:
    """Samples measured while Redis is down are kept and sent with the first sync that reaches it; the failed
    sync is counted, and nothing raises."""
    a, b = processes(), processes()
    redis_server.stop()
    a.measure("small", SLOW_S, 4)
    await a.sharing.sync()
    assert a.sharing.store_failures >= 1
    assert a.sharing.unsent == 4
    await back_after_an_outage(redis_server, a)
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 4


async def test_samples_past_the_pending_bound_are_dropped_and_counted(processes, redis_server) -> None:
    """An outage longer than the pending bound keeps the newest samples and counts the rest as lost."""
    a = processes()
    redis_server.stop()
    a.measure("small", SLOW_S, MAX_PENDING + 10)
    await a.sharing.sync()
    assert a.sharing.unsent == MAX_PENDING
    assert a.sharing.lost == 10
    redis_server.start()



async def test_samples_measured_during_a_failed_sync_count_toward_the_pending_bound(processes, redis_server) -> None:
    """Samples a call adds while a sync to a downed Redis is under way are held too: with them the bound still
    holds, and the oldest held samples are the ones lost."""
    a = processes()
    redis_server.stop()
    a.measure("small", SLOW_S, MAX_PENDING)
    syncing = asyncio.create_task(a.sharing.sync())
    await asyncio.sleep(0)                  # the sync took the pending samples and waits on Redis
    a.measure("small", SLOW_S, 10)
    await syncing
    assert a.sharing.unsent == MAX_PENDING
    assert a.sharing.lost == 10
    redis_server.start()


async def test_samples_held_through_an_outage_longer_than_the_window_are_dropped(processes, redis_server) -> None:
    """Samples held while Redis is down are let go once they leave the latency window: no one would use them."""
    a = processes(window_s=1.0)
    redis_server.stop()
    a.measure("small", SLOW_S, 3)
    await a.sharing.sync()
    assert a.sharing.unsent == 3
    await asyncio.sleep(1.1)
    await a.sharing.sync()
    assert a.sharing.unsent == 0
    redis_server.start()

async def test_an_outage_past_the_pending_bound_drops_the_first_samples_measured(processes, redis_server) -> None:
    """Past the pending bound the oldest samples go, not the newest: the last ten measured before Redis came back
    (ten that carry only a time per token) reach the other processes."""
    a, b = processes(), processes()
    small = a.models["small"]
    redis_server.stop()
    for _ in range(MAX_PENDING):
        a.sharing.add(small, 0.01, None)
    for _ in range(10):
        a.sharing.add(small, None, SLOW_S)
    await a.sharing.sync()
    assert a.sharing.lost == 10
    await back_after_an_outage(redis_server, a)
    await b.sharing.sync()
    assert b.estimates.tpot_sample_count("small") == 10


async def test_entries_that_are_not_samples_are_skipped(processes) -> None:
    """A stream entry another writer left (bad JSON, wrong shapes, negative or infinite values) is not believed."""
    a, b = processes(), processes()
    key = a.sharing.key(a.models["small"])
    for number, raw in enumerate((b"not json", b"{}", b"[[1, 2]]", b'[["x", 1, 0]]', b"[[-1, 0.1, 0]]",
                                  b"[[1e999, 0.1, 0]]", b"[[null, null, 0]]", b"[[0.2, 0.1, -5]]", b"[[0.2, 0.1, 1.5]]")):
        await a.client.xadd(key, {"p": "someone", "b": number, "s": raw})
    await a.client.xadd(key, {"p": "someone", "b": "x", "s": b"[[0.25, 0.002, 0]]"})     # no batch number
    await a.client.xadd(key, {"p": "someone", "b": 99,
                              "s": b"[[0.25, 0.002, 0], [0.25, null, 10], [null, 0.002, 0], [0.25, 0.002, 0]]"})
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3             # TTFT samples: the one with none has a TPOT only
    assert b.estimates.ttft_p95_s("small") == pytest.approx(0.25)


async def test_samples_are_shared_through_a_redis_cluster(cluster) -> None:
    """On a Redis Cluster the models' streams live on different nodes and one pipelined sync still sends and
    reads them all."""
    names = {f"model-{i}": sim_model(f"model-{i}") for i in range(6)}
    prefix = f"gw-{time.monotonic_ns()}"
    a = Process(cluster.url, names, prefix=prefix, cluster=True)
    b = Process(cluster.url, names, prefix=prefix, cluster=True)
    try:
        for name in names:
            a.measure(name, SLOW_S, 3)
        await a.sharing.sync()
        await b.sharing.sync()
        assert a.sharing.store_failures == 0 and b.sharing.store_failures == 0
        assert {name: b.estimates.sample_count(name) for name in names} == {name: 3 for name in names}
    finally:
        await a.close()
        await b.close()


async def test_a_sync_whose_reply_was_lost_is_sent_again_and_counted_once(processes, redis_server) -> None:
    """A sync Redis stored but whose reply came after the store timeout is sent again under the same batch
    number: the other process records its samples once, not twice."""
    proxy = DelayingRedisProxy(redis_server.port, 0.0).start()
    try:
        a, b = processes(url=proxy.url), processes()
        a.measure("small", SLOW_S, 5)
        await a.client.ping()                   # connected first: the handshake's reply is not the one held
        proxy.holding.set()
        await a.sharing.sync()                  # Redis runs it; the reply is held past the 0.5 s timeout
        assert a.sharing.unsent == 5
        proxy.holding.clear()
        a.sharing.guard._retry_at_s = 0.0       # the back-off after the failure: the next sync goes at once
        await a.sharing.sync()
        assert a.sharing.unsent == 0
        await b.sharing.sync()
        assert b.estimates.sample_count("small") == 5
        assert len(await b.client.xrange(b.sharing.key(b.models["small"]))) == 2     # it was stored twice
    finally:
        proxy.stop()


async def test_a_command_redis_refuses_fails_neither_the_other_streams_nor_the_reads(processes) -> None:
    """A stream key holding something else (WRONGTYPE) loses that model's samples (counted, never sent again:
    the refusal is an answer), while the other model's go out once each and the reads still come in."""
    both = {"small": sim_model("small"), "large": sim_model("large")}
    a, b = processes(models_by_name=both), processes(models_by_name=both)
    await a.client.set(a.sharing.key(both["small"]), "not a stream")
    b.measure("large", 0.02, 2)
    await b.sharing.sync()
    for _ in range(3):
        a.measure("small", SLOW_S, 1)
        a.measure("large", SLOW_S, 1)
        await a.sharing.sync()
    assert a.estimates.sample_count("large") == 3 + 2       # B's two came in despite the refused write
    assert (a.sharing.unsent, a.sharing.lost) == (0, 3)     # the refused ones are dropped and counted
    await b.sharing.sync()
    assert b.estimates.sample_count("large") == 2 + 3
    assert len(await b.client.xrange(b.sharing.key(both["large"]))) == 1 + 3     # each of A's batches sent once


async def test_a_process_whose_clock_is_ahead_neither_wipes_the_streams_nor_ages_its_samples(processes) -> None:
    """Ages and trimming follow Redis's clock: a process an hour ahead shares its samples as fresh, and its
    trimming leaves the others' entries in place."""
    ahead = processes(clock_ahead_s=3600)
    other = processes()
    other.measure("small", SLOW_S, 4)
    await other.sharing.sync()
    for _ in range(2):
        ahead.measure("small", SLOW_S, 3)
        await ahead.sharing.sync()
    late = processes()
    await late.sharing.sync()
    assert late.estimates.sample_count("small") == 4 + 6


async def test_samples_held_through_an_outage_count_from_when_they_were_measured(processes, redis_server) -> None:
    """Samples kept while Redis was down leave other processes' windows when they leave the measurer's, not a
    window after they finally went out; ones older than the window are not sent at all."""
    a = processes(window_s=3.0)

    async def measure_during_an_outage(count: int, outage_s: float) -> None:
        redis_server.stop()
        a.measure("small", SLOW_S, count)
        await a.sharing.sync()
        await asyncio.sleep(outage_s)
        await back_after_an_outage(redis_server, a)

    await measure_during_an_outage(3, 1.0)
    b = processes(window_s=3.0)
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3       # 1 s old (2 s of margin for a slow machine): inside
    await asyncio.sleep(2.2)                    # 3.2 s or more after they were measured
    assert b.estimates.sample_count("small") == 0
    await measure_during_an_outage(2, 3.2)
    assert a.sharing.unsent == 0 and a.sharing.lost == 0      # past the window: dropped, as no one would use them
    c = processes(window_s=3.0)
    await c.sharing.sync()
    assert c.estimates.sample_count("small") == 0


def test_a_shared_sample_older_than_local_ones_expires_when_it_is_due() -> None:
    """A sample read from another process goes into the window in time order, not dated like the newest."""
    clock = FakeClock()
    estimates = LatencyEstimates({"small": sim_model("small")}, window_s=10, clock=clock)
    estimates.record("small", 0.1, None)                    # measured here now
    estimates.record_shared("small", [(8.0, 0.2, None)])    # measured elsewhere 8 s ago
    clock.now_s += 3
    assert estimates.sample_count("small") == 1             # the shared one left at its 10 s
    clock.now_s += 7.5
    assert estimates.sample_count("small") == 0


def test_shared_samples_out_of_age_order_each_expire_when_due() -> None:
    """Samples handed over out of age order (a batch sent again after a newer one) each enter the window at their
    own age: the older one leaves when it is due, not when the newer one does."""
    clock = FakeClock()
    estimates = LatencyEstimates({"small": sim_model("small")}, window_s=10, clock=clock)
    estimates.record_shared("small", [(1.0, 0.2, None), (8.0, 0.3, None)])     # 1 s old, then 8 s old
    assert estimates.sample_count("small") == 2
    clock.now_s += 2.5
    assert estimates.sample_count("small") == 1             # the 8 s old one left at its 10 s
    clock.now_s += 7
    assert estimates.sample_count("small") == 0


def test_many_shared_samples_merge_into_a_full_window_in_time_order() -> None:
    """A thousand samples from other processes, up to a second old, merge into a full window of older local ones:
    the window keeps the newest `max_samples` in time order and expires each when due."""
    clock = FakeClock()
    estimates = LatencyEstimates({"small": sim_model("small")}, window_s=10, clock=clock, max_samples=1024)
    for _ in range(1024):
        estimates.record("small", 0.1, None)                # all measured here, 2 s ago
    clock.now_s += 2
    shared = [(1.0 - i / 1000, 0.3, None) for i in range(1000)]       # oldest first: 1.0 s .. 0.001 s old
    estimates.record_shared("small", shared)
    assert estimates.sample_count("small") == 1024
    assert estimates.ttft_p50_s("small") == pytest.approx(0.3)      # 1000 of the 1024 kept are the shared ones
    clock.now_s += 9.5                  # the local ones are 11.5 s old, the shared 9.5..10.5: half are left
    assert 400 < estimates.sample_count("small") < 600


def test_shared_samples_that_overflow_a_full_window_push_out_its_oldest() -> None:
    """Samples from other processes, older than the newest local ones, merged into a full window: the oldest go,
    so the window keeps the newest four (the shared 0.3 s and the latest local 0.1 s), not the stale 9 s ones."""
    clock = FakeClock()
    estimates = LatencyEstimates({"small": sim_model("small")}, window_s=60, prior_weight=0, clock=clock,
                                 max_samples=4)
    for _ in range(2):
        estimates.record("small", 9.0, None)                # measured here 5 s ago
    clock.now_s += 5
    for _ in range(2):
        estimates.record("small", 0.1, None)                # measured here now
    estimates.record_shared("small", [(3.0, 0.3, None), (3.0, 0.3, None)])     # measured elsewhere 3 s ago
    assert estimates.sample_count("small") == 4
    assert estimates.ttft_p95_s("small") == pytest.approx(0.3)


@pytest.mark.parametrize(("endpoint", "upstream_model"), [
    ("http://127.0.0.1:10/v1", "sim-small"),            # the model moved to another server
    ("http://127.0.0.1:9/v1", "sim-small-v2")])         # the same server, another upstream model
def test_a_call_on_a_model_a_reload_has_since_changed_teaches_this_process_nothing(endpoint, upstream_model) -> None:
    """A call made on an older policy version, where a reload has since moved the model or given it another
    upstream model, is not recorded under the model's name here (it measured another server, or another model)."""
    from gateway.fleet import Fleet
    changed = _load(f"""version: 1
models:
  small: {{endpoint: "{endpoint}", upstream_model: {upstream_model}, latency_prior: {{ttft_ms: 5, tpot_ms: 1}}}}
routes:
  - {{name: r, match: {{models: ["auto"]}}, candidates: [small]}}
""")
    fleet = Fleet(changed)
    fleet.record_latency(sim_model("small", "http://127.0.0.1:9/v1"), SLOW_S, 0.001)
    assert fleet.estimates.sample_count("small") == 0
    fleet.record_latency(changed.models["small"], SLOW_S, 0.001)
    assert fleet.estimates.sample_count("small") == 1


async def test_stopping_sends_what_is_pending(processes) -> None:
    """A process that stops sends its last samples before it goes (a sync under way is waited for, not cut)."""
    a, b = processes(), processes()
    a.sharing.start()
    a.measure("small", SLOW_S, 3)
    await a.sharing.stop()
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3


async def test_a_sample_measured_on_a_moved_model_goes_to_the_server_it_measured(processes) -> None:
    """A call still running on a policy version that had the model elsewhere shares its sample with that
    server's stream, not the one the model has moved to."""
    old = sim_model("small", "http://127.0.0.1:9/v1")
    a = processes(models_by_name={"small": sim_model("small", "http://127.0.0.1:10/v1")})
    a.sharing.add(old, SLOW_S, 0.001)
    await a.sharing.sync()
    on_old = processes(models_by_name={"small": old})
    on_new = processes(models_by_name={"small": sim_model("small", "http://127.0.0.1:10/v1")})
    await on_old.sharing.sync()
    await on_new.sharing.sync()
    assert (on_old.estimates.sample_count("small"), on_new.estimates.sample_count("small")) == (1, 0)


def test_share_estimates_must_be_a_flag() -> None:
    """routing.share_estimates is true or false; anything else is refused with its key path."""
    with pytest.raises(PolicyError, match="share_estimates"):
        _load("""version: 1
models:
  small: {endpoint: "http://127.0.0.1:9/v1", upstream_model: s}
routes:
  - {name: r, match: {models: ["auto"]}, candidates: [small]}
routing: {share_estimates: "yes"}
""")


# --- end to end: two gateways, one Redis ----------------------------------------------------------------------

def e2e_policy(share: bool) -> str:
    return models(
        model("small", size_b=1, price=price(0.1, 0.2), latency_prior=latency(5, 1)),
        model("large", size_b=70, price=price(5, 15), latency_prior=latency(20, 3)),
    ) + f"""routing: {{{{share_estimates: {str(share).lower()}}}}}
routes:
  - name: chat
    match: {{{{models: ["auto"]}}}}
    candidates: [small, large]
    sla: {{{{p95_latency_ms: 200}}}}
  - name: small-only
    match: {{{{models: ["small"]}}}}
    candidates: [small]
"""


def twin(first: Harness, share: bool, environ: dict) -> Harness:
    """A second gateway calling the first one's simulated models (the same servers, so the same streams)."""
    urls = {name: sim.url for name, sim in first.sims.items()}
    text = e2e_policy(share).format(**urls)
    return Harness(text.replace("{", "{{").replace("}", "}}"), sims={}, environ=environ).start()


@pytest.fixture
def gateways(redis_server):
    environ = {"GATEWAY_REDIS_URL": redis_server.url, "OTEL_SDK_DISABLED": "true"}
    sims = {"small": dict(ttft_ms=SLOW_S * 1000, tpot_ms=1), "large": dict(ttft_ms=5, tpot_ms=1)}
    first = Harness(e2e_policy(True), sims=sims, environ=environ).start()
    started = [first]

    def second(share: bool) -> Harness:
        started.append(twin(first, share, environ))
        return started[-1]

    yield first, second
    for harness in reversed(started):
        harness.stop()


def ask(harness: Harness, alias: str) -> str:
    client = openai.OpenAI(base_url=f"{harness.base_url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return raw.headers["x-gateway-model"]


def samples_seen(harness: Harness, name: str) -> int:
    async def count() -> int:
        return harness.services.fleet.estimates.sample_count(name)
    return harness.call(count())


def wait_for_samples(harness: Harness, name: str, count: int, timeout_s: float = 8.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (seen := samples_seen(harness, name)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def test_a_gateway_routes_off_a_model_another_found_slow(gateways) -> None:
    """Gateway A finds `small` slow; gateway B, sharing, sends its next request to `large` without ever having
    called `small`, where it would otherwise have trusted the prior."""
    first, second = gateways
    for _ in range(4):
        assert ask(first, "small") == "small"
    assert ask(first, "auto") == "large"
    b = second(share=True)
    assert wait_for_samples(b, "small", 4) >= 4
    calls_before = first.sim_stats("small")["total"]
    assert ask(b, "auto") == "large"
    assert first.sim_stats("small")["total"] == calls_before


def test_without_sharing_a_gateway_trusts_its_prior(gateways) -> None:
    """The same traffic with share_estimates off on B: B has no samples and sends `auto` to `small`."""
    first, second = gateways
    for _ in range(4):
        ask(first, "small")
    b = second(share=False)
    time.sleep(2.5)                         # two sync intervals: sharing would have arrived by now
    assert samples_seen(b, "small") == 0
    assert ask(b, "auto") == "small"


def test_a_reload_turns_sharing_on_in_a_running_gateway(gateways) -> None:
    """Gateway B started with sharing off gets A's samples once a reload of its policy turns it on."""
    first, second = gateways
    b = second(share=False)
    for _ in range(4):
        ask(first, "small")
    time.sleep(1.5)
    assert samples_seen(b, "small") == 0
    text = e2e_policy(True).format(**{name: sim.url for name, sim in first.sims.items()})
    b.policy_path.write_text(text)

    async def reload() -> bool:
        return b.holder.reload()
    assert b.call(reload())
    assert wait_for_samples(b, "small", 4) >= 4
    assert ask(b, "auto") == "large"
