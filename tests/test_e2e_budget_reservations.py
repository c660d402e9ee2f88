"""End to end: requests in flight hold their predicted cost of their tenant's budget, in memory and in Redis."""

from __future__ import annotations

import asyncio
import random
import subprocess
import tempfile
import threading
import time
from collections import Counter
from decimal import Decimal

import openai
import pytest

from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.keys import new_key
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, price, short_timeouts

#: tenant -> (raw key, its sha256 hex)
KEYS = {name: new_key() for name in ("crowd", "ender", "failer", "leaver", "hitter", "open", "paying")}
#: output at 0.001 USD a token, input free: a request with max_tokens 10 is predicted at exactly 0.01 USD
PREDICTED_USD = Decimal("0.01")
PREDICTED_NANOS = 10_000_000
SIMS = {
    "slow": dict(ttft_ms=700, tpot_ms=10),          # answers after 0.7 s: requests at once overlap
    "hanging": dict(ttft_ms=5, tpot_ms=1, hang_rate=1.0),
    "trickle": dict(ttft_ms=5, tpot_ms=300),        # a token every 0.3 s: a client can leave mid-stream
    "quick": dict(ttft_ms=1, tpot_ms=0),
}
METERED = dict(size_b=1, tier=1, context_window=8192, price=price(0, 1000), latency_prior=latency(5, 1))
#: `hanging` gives up after 1.5 s, as a non-streamed call is bounded by total_s alone
POLICY = models(*(model(name, **METERED, timeouts=short_timeouts(first_byte_s=1.5, total_s=1.5 if name == "hanging"
                                                                  else 10)) for name in SIMS)) + """
routes:
  - name: slow
    match: {{models: ["slow"], endpoints: [chat]}}
    candidates: [slow]
  - name: hanging
    match: {{models: ["hanging"], endpoints: [chat]}}
    candidates: [hanging]
  - name: trickle
    match: {{models: ["trickle"], endpoints: [chat]}}
    candidates: [trickle]
  - name: quick
    match: {{models: ["quick"], endpoints: [chat]}}
    candidates: [quick]
  - name: cached
    match: {{models: ["cached"], endpoints: [chat]}}
    candidates: [quick]
    cache: {{enabled: true, ttl_s: 60}}
tenants:
""" + "".join(f'  {name}: {{{{keys_sha256: ["{KEYS[name][1]}"], budget: {{{{usd_per_day: 1}}}}}}}}\n'
              for name in ("crowd", "ender", "failer", "leaver")) + f"""
  hitter:
    keys_sha256: ["{KEYS['hitter'][1]}"]
    budget: {{{{usd_per_day: 1}}}}
    limits: {{{{requests_per_minute: 100}}}}
  open: {{{{keys_sha256: ["{KEYS['open'][1]}"]}}}}
  paying: {{{{keys_sha256: ["{KEYS['paying'][1]}"], budget: {{{{usd_per_day: 100}}}}}}}}
"""
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(request):
    """The gateway with its budgets in memory, or in a real redis-server."""
    environ = {"OTEL_SDK_DISABLED": "true"}
    if request.param == "redis":
        environ["GATEWAY_REDIS_URL"] = request.getfixturevalue("module_redis_server").url
    harness = Harness(POLICY, sims=SIMS, environ=environ).start()
    yield harness
    harness.stop()


def tenant_of(gw: Harness, name: str):
    return gw.holder.current.policy.tenants[name]


def held_nanos(gw: Harness, name: str) -> int:
    """What the tenant's requests in flight hold of its budget, as the store keeps it."""
    budgets = gw.services.stores.budgets
    if isinstance(budgets, MemoryBudgets):
        return budgets.held_nanos.get(name, 0)
    return int(gw.call(budgets.client.get(budgets.holds_keys(name)[1])) or 0)


def spent_usd(gw: Harness, name: str) -> Decimal:
    return gw.call(gw.services.stores.budgets.usage(tenant_of(gw, name))).spent_day_usd


def charge(gw: Harness, name: str, usd: str) -> None:
    gw.call(gw.services.stores.budgets.charge(tenant_of(gw, name), Decimal(usd)))


def wait_until(predicate, timeout_s: float = 10.0):
    """Poll until predicate() is truthy and return its value; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


async def ask_at_once(gateways: list[Harness], name: str, count: int) -> list[object]:
    """`count` requests of tenant `name` at once, spread over `gateways`: each a response or the error raised."""
    clients = [gw.async_openai(api_key=KEYS[name][0]) for gw in gateways]
    try:
        return await asyncio.gather(*(
            clients[i % len(clients)].chat.completions.with_raw_response.create(
                model="slow", messages=HELLO, max_tokens=10) for i in range(count)), return_exceptions=True)
    finally:
        for client in clients:
            await client.close()


def tally(answers: list[object]) -> tuple[list[object], list[openai.RateLimitError]]:
    """The answers served, and the budget refusals; anything else fails the test."""
    served = [a for a in answers if not isinstance(a, Exception)]
    refused = [a for a in answers if isinstance(a, openai.RateLimitError) and a.code == "budget_exceeded"]
    assert len(served) + len(refused) == len(answers), answers
    return served, refused


def test_twenty_requests_at_once_get_only_what_the_budget_covers(gw):
    """With 0.045 of 1.00 left, twenty slow requests predicted at 0.01 each arriving at once: four are served and
    sixteen refused, the day's spend stays within the budget, and no hold is left."""
    charge(gw, "crowd", "0.955")
    served, refused = tally(asyncio.run(ask_at_once([gw], "crowd", 20)))
    assert (len(served), len(refused)) == (4, 16)
    assert refused[0].response.headers["retry-after"] == "1"
    wait_until(lambda: held_nanos(gw, "crowd") == 0)
    costs = sum(Decimal(answer.headers["x-gateway-cost-usd"]) for answer in served)
    assert wait_until(lambda: spent_usd(gw, "crowd") == Decimal("0.955") + costs)
    assert spent_usd(gw, "crowd") <= 1


def in_background(call) -> tuple[threading.Thread, list[object]]:
    """Run `call` in a thread; the list gets its result, or the exception it raised."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_served_request_holds_its_predicted_cost_until_charged_its_real_one(gw):
    """While a request is in flight its predicted cost is held; once answered the hold is gone and the spend is
    its real cost, charged once."""
    sdk = gw.openai(api_key=KEYS["ender"][0])
    thread, outcome = in_background(lambda: sdk.chat.completions.with_raw_response.create(
        model="slow", messages=HELLO, max_tokens=10))
    wait_until(lambda: held_nanos(gw, "ender") == PREDICTED_NANOS)
    thread.join(10)
    cost = Decimal(outcome[0].headers["x-gateway-cost-usd"])
    wait_until(lambda: held_nanos(gw, "ender") == 0)
    assert wait_until(lambda: spent_usd(gw, "ender") == cost) and 0 < cost <= PREDICTED_USD


def test_an_upstream_failure_gives_the_hold_back_and_charges_nothing(gw):
    """A request whose model never answers holds its predicted cost until the gateway gives up on it; then the
    hold is given back and nothing is charged."""
    sdk = gw.openai(api_key=KEYS["failer"][0])
    thread, outcome = in_background(lambda: sdk.chat.completions.create(model="hanging", messages=HELLO,
                                                                        max_tokens=10))
    wait_until(lambda: held_nanos(gw, "failer") == PREDICTED_NANOS)
    thread.join(10)
    assert isinstance(outcome[0], openai.APIStatusError) and outcome[0].status_code >= 500
    wait_until(lambda: held_nanos(gw, "failer") == 0)
    time.sleep(0.1)                         # a charge, were there one, would have landed
    assert spent_usd(gw, "failer") == 0


def test_a_client_leaving_mid_stream_gives_the_hold_back_and_pays_what_it_got(gw):
    """A client that leaves after the first chunk of a stream: the hold is given back, and the tenant is charged
    for what was generated, no more than was held."""
    sdk = gw.openai(api_key=KEYS["leaver"][0])
    stream = sdk.chat.completions.create(model="trickle", messages=HELLO, max_tokens=10, stream=True)
    next(iter(stream))
    assert held_nanos(gw, "leaver") == PREDICTED_NANOS
    stream.close()
    wait_until(lambda: held_nanos(gw, "leaver") == 0)
    assert 0 < wait_until(lambda: spent_usd(gw, "leaver")) < PREDICTED_USD


def test_a_spent_budget_still_gets_its_cache_hits(gw):
    """A tenant whose budget is spent is served a cached answer, which costs nothing, while a request the cache
    cannot answer is refused with budget_exceeded and takes nothing from its rate limits."""
    sdk = gw.openai(api_key=KEYS["hitter"][0])
    first = sdk.chat.completions.with_raw_response.create(model="cached", messages=HELLO, max_tokens=10,
                                                          temperature=0)
    assert first.headers["x-gateway-cache"] == "stored"
    wait_until(lambda: len(gw.services.background) == 0)       # the cache write has landed
    charge(gw, "hitter", "5")
    hit = sdk.chat.completions.with_raw_response.create(model="cached", messages=HELLO, max_tokens=10,
                                                        temperature=0)
    assert (hit.headers["x-gateway-cache"], hit.headers["x-gateway-cost-usd"]) == ("hit", "0")
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="cached", messages=[{"role": "user", "content": "Other"}], max_tokens=10,
                                    temperature=0)
    assert refused.value.code == "budget_exceeded"
    limiter, hitter = gw.services.stores.limiter, tenant_of(gw, "hitter")
    assert wait_until(lambda: gw.call(limiter.usage(hitter)).requests == 2)     # the refusal was withdrawn


def monitored(port: int, run) -> list[str]:
    """The commands Redis (on `port`) ran while `run()` ran, as MONITOR lists them."""
    with tempfile.TemporaryFile("w+") as out:
        monitor = subprocess.Popen(["redis-cli", "-p", str(port), "monitor"], stdout=out, text=True)
        try:
            wait_until(lambda: out.tell() > 0)          # "OK": it is listening
            run()
            time.sleep(0.1)
        finally:
            monitor.kill()
            monitor.wait(5)
        out.seek(0)
        return out.read().splitlines()[1:]


def test_a_tenant_without_a_budget_sends_no_reservation_only_its_charges(redis_server):
    """Requests of a tenant without a budget send Redis no budget read or reservation, only their charges (its
    spend is kept, so a budget a reload gives it counts what it spent), in the flush script after each; a budgeted
    tenant's request sends one script call that reads and reserves together (no separate read), and one for its
    charge and give-back after."""
    gw = Harness(POLICY, sims=SIMS, environ={"OTEL_SDK_DISABLED": "true",
                                             "GATEWAY_REDIS_URL": redis_server.url}).start()

    def five(name: str):
        def run() -> None:
            for _ in range(5):
                gw.openai(api_key=KEYS[name][0]).chat.completions.create(model="quick", messages=HELLO,
                                                                        max_tokens=2)
                wait_until(lambda: len(gw.services.background) == 0)
        return run

    def by_script(lines: list[str]) -> Counter:
        return Counter(line.split('"')[3] for line in lines if '"EVALSHA"' in line)    # by SHA

    try:
        five("paying")()                        # warm: connections, scripts
        unbudgeted = [line for line in monitored(redis_server.port, five("open")) if "{open}:budget" in line]
        budgeted = [line for line in monitored(redis_server.port, five("paying")) if "{paying}:budget" in line]
        scripts = by_script(budgeted)
        assert sorted(scripts.values()) == [5, 5]           # each request's reservation, and its charge's flush
        assert not [line for line in budgeted if '"MGET"' in line or '"EVAL"' in line]
        (flush, charges), = by_script(unbudgeted).items()   # one script: the flush, five times, and nothing else
        assert flush in scripts and charges == 5
        assert all('"EVALSHA"' in line for line in unbudgeted if " lua] " not in line)     # run by the script
    finally:
        gw.stop()


def test_two_replicas_share_the_holds_of_requests_in_flight(redis_server):
    """Two gateways on one Redis: twenty requests at once, half through each, get only the four the budget's
    0.045 left covers between them."""
    replicas = [Harness(POLICY, sims=SIMS, environ={"OTEL_SDK_DISABLED": "true",
                                                    "GATEWAY_REDIS_URL": redis_server.url}).start() for _ in range(2)]
    try:
        charge(replicas[0], "crowd", "0.955")
        served, refused = tally(asyncio.run(ask_at_once(replicas, "crowd", 20)))
        assert (len(served), len(refused)) == (4, 16)
        wait_until(lambda: held_nanos(replicas[0], "crowd") == 0)
        assert wait_until(lambda: spent_usd(replicas[1], "crowd") > Decimal("0.955")) <= 1
    finally:
        for replica in replicas:
            replica.stop()


def test_a_seeded_mix_of_endings_at_once_leaves_no_hold_and_charges_what_was_served(gw):
    """Sixty requests of one tenant at once, of every ending (answered, streamed to the end, streams the client
    cuts after a chunk, a model that never answers, cache hits and misses), in a seeded order: once all have
    ended no hold is left, and the spend is what was served (the answers' cost headers, and a cut stream's share
    at most its hold)."""
    rng = random.Random(20261127)
    kinds = [rng.choice(("answered", "streamed", "cut", "hanging", "cached")) for _ in range(60)]
    spent_before = spent_usd(gw, "paying")

    async def one(client, kind: str, index: int) -> Decimal:
        if kind == "hanging":
            with pytest.raises(openai.APIStatusError):
                await client.chat.completions.create(model="hanging", messages=HELLO, max_tokens=10)
            return Decimal(0)
        if kind in ("streamed", "cut"):
            stream = await client.chat.completions.create(model="trickle" if kind == "cut" else "quick",
                                                          messages=HELLO, max_tokens=10, stream=True)
            async for _ in stream:
                if kind == "cut":
                    break
            await stream.close()
            return Decimal(0)               # a stream's cost is not in its headers: checked through the bounds below
        prompt = [{"role": "user", "content": f"Hello {index % 3}"}] if kind == "cached" else HELLO
        answer = await client.chat.completions.with_raw_response.create(
            model="cached" if kind == "cached" else "quick", messages=prompt, max_tokens=10, temperature=0)
        return Decimal(answer.headers["x-gateway-cost-usd"])

    async def all_at_once() -> list[Decimal]:
        client = gw.async_openai(api_key=KEYS["paying"][0])
        try:
            return await asyncio.gather(*(one(client, kind, i) for i, kind in enumerate(kinds)))
        finally:
            await client.close()

    costs = asyncio.run(all_at_once())
    wait_until(lambda: held_nanos(gw, "paying") == 0)
    streams = sum(kind in ("streamed", "cut") for kind in kinds)
    wait_until(lambda: spent_usd(gw, "paying") >= spent_before + sum(costs))
    time.sleep(0.2)                         # any charge still on its way has landed
    extra = spent_usd(gw, "paying") - spent_before - sum(costs)
    assert 0 <= extra <= streams * PREDICTED_USD, (extra, Counter(kinds))
