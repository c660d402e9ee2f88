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
from gateway.routing.sharing import MAX_PENDING, EstimateSharing
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, price

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
    path = Path(tempfile.mkdtemp(prefix="shared-est-")) / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


class Process:
    """One gateway process's estimates and sharing, against a real Redis."""

    def __init__(self, url: str, models_by_name: dict, window_s: float = 300.0, prefix: str = "gw",
                 cluster: bool = False) -> None:
        self.client = (ClusterClient if cluster else aioredis.Redis).from_url(url)
        self.models = models_by_name
        self.estimates = LatencyEstimates(models_by_name, window_s=window_s)
        self.sharing = EstimateSharing(self.client, prefix, 0.5, self.estimates, lambda: self.models)
        self.sharing.enabled = True

    def measure(self, name: str, ttft_s: float, count: int = 1) -> None:
        """Record `count` calls measured here, as the fleet does."""
        for _ in range(count):
            self.estimates.record(name, ttft_s, 0.001)
            self.sharing.add(name, ttft_s, 0.001)

    async def close(self) -> None:
        await self.client.aclose()


@pytest.fixture
async def processes(redis_server):
    made: list[Process] = []

    def make(**kwargs) -> Process:
        kwargs.setdefault("models_by_name", {"small": sim_model("small")})
        made.append(Process(redis_server.url, **kwargs))
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
    a = processes(window_s=1.5)
    a.measure("small", SLOW_S, 3)
    await a.sharing.sync()
    await asyncio.sleep(1.0)
    b = processes(window_s=1.5)
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 3         # 1 s old: inside the 1.5 s window
    await asyncio.sleep(0.7)
    assert b.estimates.sample_count("small") == 0         # 1.7 s after they were sent: gone, as at A
    c = processes(window_s=1.5)
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
    assert a.sharing._pending == []
    assert await a.client.keys("gw:estimates:*") == []


async def test_samples_wait_out_a_redis_outage(processes, redis_server) -> None:
    """Samples measured while Redis is down are kept and sent with the first sync that reaches it; the failed
    sync is counted, and nothing raises."""
    a, b = processes(), processes()
    redis_server.stop()
    a.measure("small", SLOW_S, 4)
    await a.sharing.sync()
    assert a.sharing.store_failures >= 1
    assert len(a.sharing._pending) == 4
    redis_server.start()
    a.sharing.guard._retry_at_s = 0.0       # the back-off after the outage: the next sync probes at once
    await a.sharing.sync()
    await b.sharing.sync()
    assert b.estimates.sample_count("small") == 4


async def test_samples_past_the_pending_bound_are_dropped_and_counted(processes, redis_server) -> None:
    """An outage longer than the pending bound keeps the newest samples and counts the rest as lost."""
    a = processes()
    redis_server.stop()
    a.measure("small", SLOW_S, MAX_PENDING + 10)
    await a.sharing.sync()
    assert len(a.sharing._pending) == MAX_PENDING
    assert a.sharing.lost == 10
    redis_server.start()


async def test_entries_that_are_not_samples_are_skipped(processes) -> None:
    """A stream entry another writer left (bad JSON, wrong shapes, negative or infinite values) is not believed."""
    a, b = processes(), processes()
    key = a.sharing.key("small", a.models["small"])
    for raw in (b"not json", b"{}", b"[[1, 2, 3]]", b'[["x", 1]]', b"[[-1, 0.1]]", b"[[1e999, 0.1]]",
                b"[[null, null]]"):
        await a.client.xadd(key, {"p": "someone", "s": raw})
    await a.client.xadd(key, {"p": "someone", "s": b"[[0.25, 0.002], [0.25, null], [null, 0.002], [0.25, 0.002]]"})
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
