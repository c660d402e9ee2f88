"""End to end: the response cache in a real redis-server, through the running gateway and the openai SDK.

Each Redis test gets a fresh redis-server (the `redis_server` fixture) and a
gateway pointed at it with GATEWAY_REDIS_URL; the embedded in-memory default
is checked with a gateway that has no Redis at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gateway.cache.entry import CacheEntry, decode_entry, encode_entry
from gateway.cache.key import KEY_VERSION
import redis

from tests.support.harness import Harness
from tests.support.policies import models, short_timeouts, standard_model, tenants

KEYS = {"alpha": "key-alpha-0001", "beta": "key-beta-0002"}
ENTRY_PATTERN = f"gw:c:{KEY_VERSION}:*"

POLICY = models(standard_model("small", timeouts=short_timeouts(first_byte_s=5))) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 60}}
  - name: short
    match: {{models: ["short"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 1}}
""" + tenants(KEYS)
SIMS = {"small": dict(ttft_ms=5, tpot_ms=1)}


def environ(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    return {**base, "OTEL_SDK_DISABLED": "true", **extra}


@pytest.fixture
def gw(redis_server):
    harness = Harness(POLICY, SIMS, environ(GATEWAY_REDIS_URL=redis_server.url)).start()
    harness.redis = redis.Redis.from_url(redis_server.url)
    yield harness
    harness.redis.close()
    harness.stop()


@pytest.fixture(scope="module")
def memory_gw():
    harness = Harness(POLICY, SIMS, environ()).start()
    yield harness
    harness.stop()


# helpers -----------------------------------------------------------------------------------------

def ask(content: str, **changes) -> dict:
    """A cacheable chat request (temperature 0)."""
    return {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 5,
            "temperature": 0, **changes}


async def leader_under_way(client, request: dict) -> asyncio.Future:
    """The leader's call, started and given 0.1 s to open its flight before the identical calls meant to follow it."""
    leader = asyncio.ensure_future(client.chat.completions.create(**request))
    await asyncio.sleep(0.1)
    return leader


def chat(gw, tenant: str = "alpha", headers: dict | None = None, **request):
    """A non-streamed chat through the SDK: (completion, x-gateway-cache)."""
    raw = gw.openai(api_key=KEYS[tenant]).chat.completions.with_raw_response.create(
        **request, extra_headers=headers or {})
    return raw.parse(), raw.headers["x-gateway-cache"]


def stream(gw, tenant: str = "alpha", **request):
    """A streamed chat through the SDK: (chunks, x-gateway-cache)."""
    raw = gw.openai(api_key=KEYS[tenant]).chat.completions.with_raw_response.create(**request, stream=True)
    return list(raw.parse()), raw.headers["x-gateway-cache"]


def stream_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def upstream_calls(gw) -> int:
    return gw.sim_stats("small")["total"]


def entry_keys(gw) -> list[bytes]:
    """The cache entries in Redis (single-flight locks, `...:lock`, left out)."""
    return entry_keys_of(gw.redis)


def entry_keys_of(client) -> list[bytes]:
    return [key for key in client.keys(ENTRY_PATTERN) if not key.endswith(b":lock")]


def wait_for_entries(gw, count: int, timeout_s: float = 5.0) -> None:
    """Wait until Redis holds `count` entries: cache writes run in the background, after the answer."""
    deadline = time.monotonic() + timeout_s
    while len(entry_keys(gw)) < count:
        assert time.monotonic() < deadline, f"Redis never held {count} cache entries"
        time.sleep(0.01)


# hit, miss, TTL, Cache-Control ------------------------------------------------------------------

def test_second_identical_request_is_a_hit_from_redis(gw):
    """The first answer is stored in Redis with its TTL; the identical second one is served from it, not upstream."""
    first, status_first = chat(gw, **ask("What is a cache?"))
    wait_for_entries(gw, 1)
    second, status_second = chat(gw, **ask("What is a cache?"))
    assert (status_first, status_second) == ("stored", "hit")
    assert second.id == first.id
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage == first.usage
    assert upstream_calls(gw) == 1
    (key,) = entry_keys(gw)
    assert 50 < gw.redis.ttl(key) <= 60


def test_entry_expires_after_its_ttl(gw):
    """A route with ttl_s 1 stops answering from the cache once the second has passed."""
    assert chat(gw, **ask("Short-lived", model="short"))[1] == "stored"
    wait_for_entries(gw, 1)
    assert chat(gw, **ask("Short-lived", model="short"))[1] == "hit"
    time.sleep(1.2)
    assert chat(gw, **ask("Short-lived", model="short"))[1] == "stored"
    assert upstream_calls(gw) == 2


def test_no_cache_skips_the_lookup_and_refreshes_the_entry(gw):
    """Cache-Control: no-cache calls upstream even with an entry, and its fresh answer replaces the entry."""
    first, _ = chat(gw, **ask("Refresh me"))
    wait_for_entries(gw, 1)
    fresh, status = chat(gw, headers={"Cache-Control": "no-cache"}, **ask("Refresh me"))
    assert status == "stored"
    assert fresh.id != first.id
    assert upstream_calls(gw) == 2
    deadline = time.monotonic() + 5
    while (hit := chat(gw, **ask("Refresh me")))[0].id != fresh.id:
        assert time.monotonic() < deadline, "the refreshed answer never replaced the entry"
        time.sleep(0.01)
    assert hit[1] == "hit"
    assert upstream_calls(gw) == 2


def test_a_no_cache_answer_is_stored_with_the_route_s_ttl(gw):
    """A `Cache-Control: no-cache` answer, written without the single-flight lock, still expires after the
    route's ttl_s, not later."""
    assert chat(gw, headers={"Cache-Control": "no-cache"}, **ask("Fresh and kept"))[1] == "stored"
    wait_for_entries(gw, 1)
    (key,) = entry_keys(gw)
    assert 50 < gw.redis.ttl(key) <= 60


def test_no_store_answers_without_storing(gw):
    """Cache-Control: no-store leaves nothing in Redis; the next request misses and is stored."""
    _, status = chat(gw, headers={"Cache-Control": "no-store"}, **ask("Keep no copy"))
    assert status == "miss"
    time.sleep(0.1)
    assert entry_keys(gw) == []
    assert chat(gw, **ask("Keep no copy"))[1] == "stored"
    wait_for_entries(gw, 1)
    assert chat(gw, headers={"Cache-Control": "no-store"}, **ask("Keep no copy"))[1] == "hit"
    assert chat(gw, headers={"Cache-Control": "no-cache, no-store"}, **ask("Keep no copy"))[1] == "bypass"
    assert upstream_calls(gw) == 3


def test_tenants_never_share_an_entry(gw):
    """The same request from two tenants makes two entries: the second tenant misses and gets its own answer."""
    alpha_first, status_alpha = chat(gw, "alpha", **ask("Shared question"))
    wait_for_entries(gw, 1)
    beta_first, status_beta = chat(gw, "beta", **ask("Shared question"))
    assert (status_alpha, status_beta) == ("stored", "stored")
    wait_for_entries(gw, 2)
    assert len(entry_keys(gw)) == 2
    alpha_again, alpha_status = chat(gw, "alpha", **ask("Shared question"))
    beta_again, beta_status = chat(gw, "beta", **ask("Shared question"))
    assert (alpha_status, beta_status) == ("hit", "hit")
    assert (alpha_again.id, beta_again.id) == (alpha_first.id, beta_first.id)
    assert alpha_first.id != beta_first.id
    assert upstream_calls(gw) == 2


@pytest.mark.parametrize("request_changes", [{"temperature": 1}, {"temperature": None}, {"n": 2}])
def test_nondeterministic_requests_bypass_the_cache(gw, request_changes):
    """Sampled requests without a seed (temperature 1, or none: the default 1) and n=2 never touch the cache."""
    request = {k: v for k, v in {**ask("Sample me"), **request_changes}.items() if v is not None}
    statuses = [chat(gw, **request)[1] for _ in range(2)]
    assert statuses == ["bypass", "bypass"]
    assert upstream_calls(gw) == 2
    time.sleep(0.05)
    assert entry_keys(gw) == []


def test_a_seed_makes_a_sampled_request_cacheable(gw):
    """temperature 1 with a seed is deterministic enough to share: stored, then a hit."""
    request = ask("Seeded sample", temperature=1, seed=42)
    assert chat(gw, **request)[1] == "stored"
    wait_for_entries(gw, 1)
    assert chat(gw, **request)[1] == "hit"
    assert upstream_calls(gw) == 1


# streams ----------------------------------------------------------------------------------------

def test_stream_then_plain_request_share_one_entry(gw):
    """A finished stream is stored, and the same request without streaming is answered from it."""
    chunks, status = stream(gw, **ask("Stream first"))
    assert status == "miss"         # the headers left before the stream was complete, and so stored
    wait_for_entries(gw, 1)
    completion, status = chat(gw, **ask("Stream first"))
    assert status == "hit"
    assert completion.choices[0].message.content == stream_text(chunks)
    assert completion.choices[0].finish_reason == "length"
    assert completion.id == chunks[0].id
    assert completion.usage.completion_tokens == 5
    assert upstream_calls(gw) == 1


def test_plain_then_stream_replay_is_parsed_by_the_sdk(gw):
    """A stored answer replays as a stream the SDK parses: same content, finish reason, and usage when asked."""
    original, _ = chat(gw, **ask("Plain first"))
    wait_for_entries(gw, 1)
    chunks, status = stream(gw, **ask("Plain first"), stream_options={"include_usage": True})
    assert status == "hit"
    assert stream_text(chunks) == original.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == original.usage
    assert all(c.id == original.id and c.object == "chat.completion.chunk" for c in chunks)
    bare, status = stream(gw, **ask("Plain first"))
    assert status == "hit"
    assert stream_text(bare) == original.choices[0].message.content
    assert all(c.usage is None for c in bare)
    assert upstream_calls(gw) == 1


# single-flight ----------------------------------------------------------------------------------

async def test_fifty_identical_concurrent_requests_make_one_upstream_call(gw):
    """50 identical requests in flight together are answered by one upstream call, all with the same answer."""
    client = gw.async_openai(api_key=KEYS["alpha"], timeout=30)
    # a warm pool first, as a running gateway has: 50 connections opened at once on a loaded test
    # machine can outlast the store timeout, which the cache rightly treats as Redis being down
    await asyncio.gather(*(client.chat.completions.create(**ask(f"Warm-up {i}")) for i in range(50)))
    deadline = time.monotonic() + 10        # and the store answering again, should the warm-up have tripped it
    while (await asyncio.to_thread(chat, gw, **ask("Probe")))[1] not in ("stored", "hit"):
        assert time.monotonic() < deadline, "the cache store did not come back after the warm-up"
        await asyncio.sleep(0.2)
    calls_before = upstream_calls(gw)
    gw.sim_config("small", ttft_ms=800)
    try:
        raws = await asyncio.gather(*(client.chat.completions.with_raw_response.create(**ask("Stampede"))
                                      for _ in range(50)))
    finally:
        await client.close()
        gw.sim_config("small", ttft_ms=5)
    completions = [raw.parse() for raw in raws]
    assert upstream_calls(gw) - calls_before == 1
    assert len({c.id for c in completions}) == 1
    assert len({c.choices[0].message.content for c in completions}) == 1
    statuses = sorted(raw.headers["x-gateway-cache"] for raw in raws)
    assert statuses == ["hit"] * 49 + ["stored"]


async def test_a_follower_leaving_does_not_disturb_the_flight(gw):
    """A follower whose client gives up leaves the leader and the other followers to one shared upstream call."""
    gw.sim_config("small", ttft_ms=800)
    client = gw.async_openai(api_key=KEYS["alpha"], timeout=30)
    impatient = gw.async_openai(api_key=KEYS["alpha"], timeout=0.3)
    try:
        leader = await leader_under_way(client, ask("Patience"))
        with pytest.raises(openai.APITimeoutError):
            await impatient.chat.completions.create(**ask("Patience"))
        follower = await client.chat.completions.create(**ask("Patience"))
        first = await leader
    finally:
        await client.close()
        await impatient.close()
        gw.sim_config("small", ttft_ms=5)
    assert follower.id == first.id
    assert upstream_calls(gw) == 1


async def test_a_leader_leaving_releases_its_followers(gw):
    """When the leader's client gives up, its followers are not stranded: each is answered from upstream."""
    gw.sim_config("small", ttft_ms=800)
    client = gw.async_openai(api_key=KEYS["alpha"], timeout=30)
    impatient = gw.async_openai(api_key=KEYS["alpha"], timeout=0.3)
    try:
        leader = await leader_under_way(impatient, ask("Abandoned"))
        started = time.perf_counter()
        followers = await asyncio.gather(*(client.chat.completions.with_raw_response.create(**ask("Abandoned"))
                                           for _ in range(2)))
        waited_s = time.perf_counter() - started
        with pytest.raises(openai.APITimeoutError):
            await leader
    finally:
        await client.close()
        await impatient.close()
        gw.sim_config("small", ttft_ms=5)
    assert all(raw.parse().choices[0].message.content for raw in followers)
    assert waited_s < 5.0           # not the 30 s single-flight timeout
    assert upstream_calls(gw) == 3


# across replicas ----------------------------------------------------------------------------------

@pytest.fixture
def replicas(redis_server):
    """Two gateways (each with its own simulator) sharing one redis-server."""
    pair = [Harness(POLICY, SIMS, environ(GATEWAY_REDIS_URL=redis_server.url)).start() for _ in range(2)]
    yield pair
    for harness in pair:
        harness.stop()


def pause(harness: Harness) -> None:
    """Stop a replica's event loop where it stands, as if its process were frozen."""
    harness.loop.call_soon_threadsafe(harness.loop.stop)
    harness.thread.join(timeout=5)


def resume(harness: Harness) -> None:
    harness.thread = threading.Thread(target=harness.loop.run_forever, daemon=True)
    harness.thread.start()


def test_replicas_share_one_upstream_call_through_the_redis_lock(replicas):
    """The same request on two replicas at once makes one upstream call: the second waits for the first's entry."""
    first, second = replicas
    first.sim_config("small", ttft_ms=600)
    with ThreadPoolExecutor(1) as pool:
        leading = pool.submit(chat, first, **ask("Across replicas"))
        time.sleep(0.2)
        follower, status = chat(second, **ask("Across replicas"))
        leader, _ = leading.result(timeout=10)
    assert status == "hit"
    assert follower.id == leader.id
    assert upstream_calls(first) + upstream_calls(second) == 1


def test_a_frozen_replica_blocks_the_others_only_briefly(replicas):
    """A replica frozen mid-call stops renewing its lock, so another replica takes over within seconds, not 30."""
    first, second = replicas
    first.sim_config("small", ttft_ms=1500)
    with ThreadPoolExecutor(1) as pool:
        leading = pool.submit(chat, first, **ask("Frozen leader"))
        time.sleep(0.3)
        pause(first)
        try:
            started = time.perf_counter()
            answer, status = chat(second, **ask("Frozen leader"))
            waited_s = time.perf_counter() - started
        finally:
            resume(first)
        leader, _ = leading.result(timeout=10)
    assert answer.choices[0].message.content and status == "stored"
    assert waited_s < 6.0           # the lock's 3 s TTL, not the 30 s single-flight timeout
    assert upstream_calls(second) == 1 and leader.choices[0].message.content


# Redis failure ----------------------------------------------------------------------------------

async def test_killing_redis_mid_load_fails_no_request_and_caching_resumes(gw, redis_server, caplog):
    """With redis-server killed under load every request still succeeds quickly, with a warning, and caching resumes."""
    client = gw.async_openai(api_key=KEYS["alpha"], timeout=10)
    latencies_s: list[float] = []

    async def worker(worker_id: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            content = "Repeated under load" if n % 2 else f"Distinct {worker_id}-{n}"
            started = time.perf_counter()
            completion = await client.chat.completions.create(**ask(content))
            latencies_s.append(time.perf_counter() - started)
            assert completion.choices[0].message.content

    stop = asyncio.Event()
    workers = [asyncio.ensure_future(worker(i, stop)) for i in range(4)]
    try:
        await asyncio.sleep(0.4)
        before_kill = len(latencies_s)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)          # any failed request fails the test here
    finally:
        stop.set()
        await client.close()
    assert before_kill > 0 and len(latencies_s) > before_kill + 8
    assert max(latencies_s) < 2.0
    warnings = [r for r in caplog.records if "redis cache unavailable" in r.getMessage()]
    assert warnings and all(r.levelname == "WARNING" for r in warnings)
    assert gw.services.stores.cache.errors >= len(warnings)
    # while Redis is down the gateway does not claim to have stored an answer
    assert (await asyncio.to_thread(chat, gw, **ask("While Redis is down")))[1] == "bypass"
    await asyncio.to_thread(redis_server.start)
    deadline = time.monotonic() + 10
    while (status := (await asyncio.to_thread(chat, gw, **ask("After the restart")))[1]) != "hit":
        assert time.monotonic() < deadline, f"caching did not resume after Redis came back (last: {status})"
        await asyncio.sleep(0.2)
    assert len(entry_keys(gw)) >= 1


def test_identical_requests_while_redis_is_down_share_one_call(gw, redis_server):
    """With redis-server gone, identical requests in flight together still wait for the first one's answer
    instead of each calling the model: the answer is shared though it cannot be stored."""
    redis_server.stop()
    assert chat(gw, **ask("Down, once"))[1] == "bypass"
    gw.sim_config("small", ttft_ms=1500)     # long enough for the followers to join on a loaded machine

    async def together() -> list:
        client = gw.async_openai(api_key=KEYS["alpha"], timeout=10)
        try:
            leader = await leader_under_way(client, ask("Down, together"))
            followers = await asyncio.gather(*(client.chat.completions.create(**ask("Down, together"))
                                               for _ in range(3)))
            return [await leader, *followers]
        finally:
            await client.close()

    try:
        answers = asyncio.run(together())
    finally:
        gw.sim_config("small", ttft_ms=5)
        redis_server.start()            # a gateway stops quickly only with its Redis there
    assert len({answer.id for answer in answers}) == 1
    assert upstream_calls(gw) == 2


# the embedded default -----------------------------------------------------------------------------

def test_in_memory_cache_is_the_default_without_redis(memory_gw):
    """With no Redis configured the gateway caches in memory: store, hit, and tenant isolation all hold."""
    assert memory_gw.services.stores.backend == "memory"
    first, status_first = chat(memory_gw, **ask("Memory please"))
    second, status_second = chat(memory_gw, **ask("Memory please"))
    other, status_other = chat(memory_gw, "beta", **ask("Memory please"))
    assert (status_first, status_second, status_other) == ("stored", "hit", "stored")
    assert second.id == first.id != other.id
    assert upstream_calls(memory_gw) == 2


def test_an_entry_for_another_endpoint_under_a_requests_key_is_a_miss(memory_gw):
    """The key names the endpoint, so only a hand-written entry could answer a chat request with embeddings: it is
    a miss (the model answers and its answer replaces it), not a hit the SDK cannot read."""
    first, status = chat(memory_gw, **ask("Which endpoint"))
    assert status == "stored"
    cache = memory_gw.services.stores.cache
    [key] = [key for key in list(cache._slots)
             if (entry := decode_entry(memory_gw.call(cache.get(key)) or b"")) and entry.body.get("id") == first.id]
    foreign = encode_entry(CacheEntry("embeddings", {"object": "list", "data": [], "model": "e"}, model="small"))
    memory_gw.call(cache.set(key, foreign, 60))
    second, status = chat(memory_gw, **ask("Which endpoint"))
    assert status == "stored" and second.choices[0].message.content


def test_in_memory_followers_of_a_leader_that_left_are_answered_by_the_model(memory_gw):
    """In-process single-flight: when the leader's client gives up, its followers do not fail; each is answered."""
    calls_before = upstream_calls(memory_gw)
    memory_gw.sim_config("small", ttft_ms=2000)

    async def abandoned() -> list:
        client = memory_gw.async_openai(api_key=KEYS["alpha"], timeout=30)
        # gives up after 1 s: time enough for the followers to join its flight on a loaded machine
        impatient = memory_gw.async_openai(api_key=KEYS["alpha"], timeout=1.0)
        try:
            leader = await leader_under_way(impatient, ask("Left in memory"))
            followers = await asyncio.gather(*(client.chat.completions.create(**ask("Left in memory"))
                                               for _ in range(2)))
            with pytest.raises(openai.APITimeoutError):
                await leader
            return followers
        finally:
            await client.close()
            await impatient.close()

    try:
        followers = asyncio.run(abandoned())
    finally:
        memory_gw.sim_config("small", ttft_ms=5)
    assert all(follower.choices[0].message.content for follower in followers)
    assert upstream_calls(memory_gw) - calls_before == 3


def test_a_frozen_redis_costs_each_request_a_bounded_wait(gw, redis_server):
    """With redis-server frozen (SIGSTOP) requests bypass the cache after a short timeout, said `bypass` (they said
    `miss`, swelling the miss rate of every outage), and it resumes on SIGCONT."""
    assert chat(gw, **ask("Before the freeze"))[1] == "stored"
    wait_for_entries(gw, 1)
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        latencies_s = []
        for n in range(6):
            started = time.perf_counter()
            completion, status = chat(gw, **ask("Before the freeze" if n % 2 else f"Frozen {n}"))
            latencies_s.append(time.perf_counter() - started)
            assert completion.choices[0].message.content
            assert status == "bypass"       # out of reach: neither a hit nor a miss (a dashboard's miss rate)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert max(latencies_s) < 1.0
    deadline = time.monotonic() + 10
    while chat(gw, **ask("Before the freeze"))[1] != "hit":
        assert time.monotonic() < deadline, "caching did not resume after Redis thawed"
        time.sleep(0.2)


def test_a_no_store_request_does_not_hold_other_replicas(redis_server):
    """Two replicas on one Redis, an identical `Cache-Control: no-store` request on each: nothing will be stored,
    so the second replica calls upstream at once instead of waiting for the first one's answer to appear."""
    slow = {"small": dict(ttft_ms=800, tpot_ms=1)}
    replicas = [Harness(POLICY, slow, environ(GATEWAY_REDIS_URL=redis_server.url)).start() for _ in range(2)]
    try:
        async def both() -> list[float]:
            async def one(gw, delay_s: float) -> float:
                await asyncio.sleep(delay_s)
                started = time.perf_counter()
                await asyncio.to_thread(chat, gw, headers={"Cache-Control": "no-store"}, **ask("Not to keep"))
                return time.perf_counter() - started
            return await asyncio.gather(one(replicas[0], 0.0), one(replicas[1], 0.2))

        first_s, second_s = asyncio.run(both())
        assert second_s < 1.3 * first_s + 0.2           # not the first's wait plus its own call
    finally:
        for gw in replicas:
            gw.stop()


# The cache read overlaps admission ------------------------------------------------------------------

REPLY_DELAY_S = 0.4


def test_the_cache_read_is_sent_before_the_admission_reply_is_back(redis_server):
    """A tenant with limits: the cache GET leaves while the admission script's reply is still on its way, so a hit
    waits for one store round trip, not two. Redis answers through a proxy that holds every reply 0.4 s: a GET sent
    after the admission reply could not arrive sooner than 0.4 s after the admission script."""
    from gateway.tenancy.identity import sha256_hex
    from tests.support.redis_delay import DelayingRedisProxy

    policy = POLICY.replace("tenants:", "store: {{timeout_ms: 5000}}\ntenants:")
    policy = policy.split("tenants:")[0] + (
        "tenants:\n"
        f'  alpha: {{{{keys_sha256: ["{sha256_hex(KEYS["alpha"])}"], limits: {{{{requests_per_minute: 1000}}}}}}}}\n')
    proxy = DelayingRedisProxy(redis_server.port, REPLY_DELAY_S).start()
    gw = Harness(policy, SIMS, environ(GATEWAY_REDIS_URL=proxy.url)).start()
    try:
        request = ask("Overlap the round trips")
        for _ in range(3):          # a miss, then hits: the pool has its connections, the entry is stored
            status = chat(gw, **request)[1]
            time.sleep(REPLY_DELAY_S * 2)
        assert status == "hit"
        proxy.arrivals.clear()
        assert chat(gw, **request)[1] == "hit"
        admit = next(a for a in proxy.arrivals if a.name == "EVALSHA" and any(w.startswith("gw:{") for w in a.args))
        read = next(a for a in proxy.arrivals if any(w.startswith("gw:c:") for w in a.args))
        assert read.at_s - admit.at_s < REPLY_DELAY_S, (
            f"the cache read left {read.at_s - admit.at_s:.3f} s after the admission script: it waited for its reply")
    finally:
        gw.stop()
        proxy.stop()


def test_a_miss_that_leads_waits_for_one_store_round_trip_before_calling_the_model(redis_server):
    """The read and the cross-replica lock go in one script call: with every Redis reply 0.4 s late, a miss is
    answered within two reply delays of its read reaching Redis (a lock attempt and a re-read under the lock after
    the read, each waiting for the previous reply, would take three)."""
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, REPLY_DELAY_S).start()
    gw = Harness(POLICY.replace("tenants:", "store: {{timeout_ms: 5000}}\ntenants:"), SIMS,
                 environ(GATEWAY_REDIS_URL=proxy.url)).start()
    try:
        chat(gw, **ask("Load the scripts"))     # a first script call finds it unloaded: NOSCRIPT, load, call again
        time.sleep(REPLY_DELAY_S * 4)           # its cache write and lock release are done
        proxy.arrivals.clear()
        assert chat(gw, **ask("One round trip, then the model"))[1] == "stored"
        ended_s = time.monotonic()
        read = next(a for a in proxy.arrivals if a.name != "SET" and any(w.startswith("gw:c:") for w in a.args))
        assert read.name == "EVALSHA", read
        assert ended_s - read.at_s < 2 * REPLY_DELAY_S, f"answered {ended_s - read.at_s:.2f} s after the read"
    finally:
        gw.stop()
        proxy.stop()


def test_a_leader_stores_its_answer_and_gives_back_its_lock_in_one_script_call(redis_server):
    """After a miss that led, the answer's write and the lock's release go to Redis as one script call: the
    commands naming the entry are the read and that call (a SET, then a release script, took two round trips)."""
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, 0.0).start()
    gw = Harness(POLICY, SIMS, environ(GATEWAY_REDIS_URL=proxy.url)).start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        chat(gw, **ask("Load the scripts"))
        time.sleep(0.5)
        proxy.arrivals.clear()
        assert chat(gw, **ask("Write and release together"))[1] == "stored"
        deadline_s = time.monotonic() + 5
        while (client.keys("*:lock") or len(entry_keys_of(client)) < 2) and time.monotonic() < deadline_s:
            time.sleep(0.02)
        assert client.keys("*:lock") == [] and len(entry_keys_of(client)) == 2
        naming = [a.name for a in proxy.arrivals if any("gw:c:" in w for w in a.args)]
        assert naming == ["EVALSHA", "EVALSHA"], naming
    finally:
        client.close()
        gw.stop()
        proxy.stop()


def test_a_hit_takes_no_lock(gw):
    """A hit is answered by the read alone: Redis runs no SET (the lock) and no DEL (its release) for it."""
    request = ask("Nothing to lead")
    assert chat(gw, **request)[1] == "stored"
    deadline = time.monotonic() + 5
    # the lock given back, and the miss's charge to its tenant's spend sent (a script that SETs its flush marker)
    while (gw.redis.keys("*:lock") or len(gw.services.background)) and time.monotonic() < deadline:
        time.sleep(0.02)
    before = gw.redis.info("commandstats")
    assert chat(gw, **request)[1] == "hit"
    time.sleep(0.2)
    after = gw.redis.info("commandstats")
    calls = {name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"] for name in after}
    assert calls.get("cmdstat_set", 0) == 0 and calls.get("cmdstat_del", 0) == 0, calls


def test_a_request_refused_after_its_read_took_the_lock_gives_it_back(redis_server):
    """The read took the lock before admission; a request admission refuses leaves no lock holding other replicas
    back (it would be held for the lock's TTL, 3 s)."""
    from gateway.tenancy.identity import sha256_hex

    policy = POLICY.split("tenants:")[0] + (
        "tenants:\n"
        f'  alpha: {{{{keys_sha256: ["{sha256_hex(KEYS["alpha"])}"], limits: {{{{requests_per_minute: 1}}}}}}}}\n')
    gw = Harness(policy, SIMS, environ(GATEWAY_REDIS_URL=redis_server.url)).start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        chat(gw, **ask("The one allowed"))
        with pytest.raises(openai.RateLimitError):
            chat(gw, **ask("Refused"))
        time.sleep(0.5)
        assert client.keys("*:lock") == []
    finally:
        client.close()
        gw.stop()


def test_a_client_that_leaves_during_the_read_gives_the_lock_back(redis_server):
    """A client that gives up while the read-and-lock is on its way: once Redis answers, the lock it took is
    released, not left for its TTL."""
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, REPLY_DELAY_S).start()
    gw = Harness(POLICY.replace("tenants:", "store: {{timeout_ms: 5000}}\ntenants:"), SIMS,
                 environ(GATEWAY_REDIS_URL=proxy.url)).start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        chat(gw, **ask("Warm the pool"))
        time.sleep(REPLY_DELAY_S * 3)
        with pytest.raises(openai.APITimeoutError):
            gw.openai(api_key=KEYS["alpha"], timeout=0.1).chat.completions.create(
                **ask("Gone before the read is back"))
        deadline_s = time.monotonic() + 5
        while not client.keys("*:lock") and time.monotonic() < deadline_s:
            time.sleep(0.01)
        seen_s = time.monotonic()
        assert seen_s < deadline_s, "the read took no lock: the test shows nothing"
        while client.keys("*:lock") and time.monotonic() < seen_s + 5:
            time.sleep(0.01)
        held_s = time.monotonic() - seen_s
        assert held_s < 2.0, f"the lock was held {held_s:.2f} s (its TTL is 3 s): nobody gave it back"
    finally:
        client.close()
        gw.stop()
        proxy.stop()


# Whose answer a hit serves --------------------------------------------------------------------------

TIERED = models(standard_model("small", timeouts=short_timeouts()), standard_model("large", timeouts=short_timeouts())) \
    + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small, large]
    cache: {{enabled: true, ttl_s: 60}}
""" + tenants(KEYS)


def test_a_hit_is_served_only_to_a_request_its_model_may_answer(redis_server):
    """The small model's stored answer is not served to a request asking for tier 3: it misses, the large model
    answers, and its answer replaces the entry. A hit names the model whose answer it is in x-gateway-model."""
    gw = Harness(TIERED, {"small": dict(ttft_ms=5, tpot_ms=1), "large": dict(ttft_ms=5, tpot_ms=1)},
                 environ(GATEWAY_REDIS_URL=redis_server.url)).start()
    gw.redis = redis.Redis.from_url(redis_server.url)
    try:
        def ask_tier(headers: dict[str, str]):
            raw = gw.openai(api_key=KEYS["alpha"]).chat.completions.with_raw_response.create(
                **ask("Which tier?"), extra_headers=headers)
            return raw.parse().model, raw.headers["x-gateway-cache"], raw.headers["x-gateway-model"]

        def stored() -> set[bytes]:
            return {gw.redis.get(key) for key in entry_keys(gw)}

        assert ask_tier({}) == ("sim-small", "stored", "small")
        wait_for_entries(gw, 1)                                  # the write runs after the answer
        small_entry = stored()
        assert ask_tier({}) == ("sim-small", "hit", "small")
        assert ask_tier({"x-gateway-min-tier": "3"}) == ("sim-large", "stored", "large")
        deadline_s = time.monotonic() + 5
        while stored() == small_entry:
            assert time.monotonic() < deadline_s, "the large model's answer was never stored"
            time.sleep(0.01)
        assert ask_tier({"x-gateway-min-tier": "3"}) == ("sim-large", "hit", "large")
        assert ask_tier({}) == ("sim-large", "hit", "large")     # a bigger model's answer serves a tier-1 request
    finally:
        gw.redis.close()
        gw.stop()


def test_a_model_given_another_upstream_model_no_longer_serves_its_old_answers(redis_server):
    """A reload that gives a model another upstream model (a new version behind the same policy name) makes its
    stored answers misses: the new upstream model answers, its answer replaces the entry and is the next hit.
    Moving the model to another endpoint with the same upstream model keeps its answers."""
    gw = Harness(POLICY, {"small": dict(ttft_ms=5, tpot_ms=1), "medium": dict(ttft_ms=5, tpot_ms=1)},
                 environ(GATEWAY_REDIS_URL=redis_server.url)).start()
    gw.redis = redis.Redis.from_url(redis_server.url)
    try:
        def stored_upstream() -> str | None:
            entries = [decode_entry(gw.redis.get(key)) for key in entry_keys(gw)]
            assert len(entries) == 1, entries
            return entries[0].upstream_model

        def reload_with(**changes: object) -> None:
            gw.write_policy(POLICY.replace(standard_model("small", timeouts=short_timeouts(first_byte_s=5)),
                                           standard_model("small", timeouts=short_timeouts(first_byte_s=5),
                                                          **changes)))
            assert gw.reload_policy()

        assert chat(gw, **ask("Which version?"))[1] == "stored"
        wait_for_entries(gw, 1)
        assert stored_upstream() == "sim-small" and chat(gw, **ask("Which version?"))[1] == "hit"

        reload_with(upstream_model="sim-small-v2")
        assert chat(gw, **ask("Which version?"))[1] == "stored"
        assert gw.sim_requests("small", last=1)[0]["body"]["model"] == "sim-small-v2"
        deadline_s = time.monotonic() + 5
        while stored_upstream() != "sim-small-v2":
            assert time.monotonic() < deadline_s, "the new upstream model's answer never replaced the entry"
            time.sleep(0.01)
        assert chat(gw, **ask("Which version?"))[1] == "hit"

        reload_with(upstream_model="sim-small-v2", endpoint="{medium}")
        assert chat(gw, **ask("Which version?"))[1] == "hit"
        assert gw.sim_stats("medium")["total"] == 0 and upstream_calls(gw) == 2

        # an entry an earlier build stored names no upstream model: judged by the model's name, still a hit
        key = entry_keys(gw)[0]
        legacy = decode_entry(gw.redis.get(key))
        gw.redis.set(key, encode_entry(CacheEntry(legacy.endpoint, legacy.body, legacy.created_unix_s,
                                                  legacy.cost_usd, model="small")), ex=60)
        assert stored_upstream() is None and chat(gw, **ask("Which version?"))[1] == "hit"
        assert upstream_calls(gw) == 2
    finally:
        gw.redis.close()
        gw.stop()


def test_a_stored_answer_from_a_model_dropped_only_for_price_is_still_a_hit():
    """The large model's stored answer serves a request whose cost limit leaves only the small model: a hit
    costs nothing, so the price that dropped the large model does not apply to it."""
    gw = Harness(TIERED, {"small": dict(ttft_ms=5, tpot_ms=1), "large": dict(ttft_ms=5, tpot_ms=1)},
                 environ()).start()
    try:
        def ask_with(headers: dict[str, str]):
            raw = gw.openai(api_key=KEYS["alpha"]).chat.completions.with_raw_response.create(
                **ask("Priced out"), extra_headers=headers)
            return raw.parse().model, raw.headers["x-gateway-cache"]

        assert ask_with({"x-gateway-min-tier": "3"}) == ("sim-large", "stored")
        assert ask_with({"x-gateway-max-cost-usd": "0.00005"}) == ("sim-large", "hit")
        assert gw.sim_stats("small")["total"] == 0
    finally:
        gw.stop()


def test_replicas_waiting_for_an_answer_that_is_not_cached_do_not_queue(redis_server):
    """Three replicas, one identical request each, and an answer the cache does not keep (content_filter): the two
    that waited for the first call upstream together when it ends, instead of one after the other."""
    from tests.support.raw_upstream import RawUpstream, http_head
    import json

    call_s = 0.8
    filtered = json.dumps({"id": "chatcmpl-f", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                        "finish_reason": "content_filter"}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}).encode()
    raw = RawUpstream().start()
    raw.script = [(b"", call_s), (http_head(200, {"Content-Type": "application/json"}, len(filtered)) + filtered, 0.0)]
    policy = models(standard_model("small", endpoint=raw.url, timeouts=short_timeouts())) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 60}}
""" + tenants(KEYS)
    replicas = [Harness(policy, {"small": {}}, environ(GATEWAY_REDIS_URL=redis_server.url)).start() for _ in range(3)]
    try:
        def timed(gw, delay_s: float) -> float:
            time.sleep(delay_s)             # the first replica leads; the others find its lock and wait
            started = time.monotonic()
            assert chat(gw, **ask("Filtered"))[1] == "miss"
            return time.monotonic() - started

        with ThreadPoolExecutor(3) as pool:
            took = list(pool.map(timed, replicas, (0, 0.2, 0.2)))
        assert len(raw.requests) == 3
        assert raw.most_at_once == 2, f"the waiting replicas called one after the other: {took}"
    finally:
        for gw in replicas:
            gw.stop()
        raw.stop()
