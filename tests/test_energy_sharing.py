"""GPU energy shared out between the processes that measure the same GPUs (workers, replicas), through a real
redis-server: each books its share of every interval, so their books add up to what the GPUs used, not N times
it. The whole check, two gateway workers against the fake GPU, is in test_bench_gpu_energy.py."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from gateway.energy import EnergyMonitor, sharing
from gateway.energy.attribution import EnergyLedger, Others
from gateway.energy.sharing import EnergySharing, gpus_key
from gateway.policy.model import GpuSource
from tests.support.fake_pynvml import FakeGpu, FakeNvml, ManualClock
from tests.test_energy_sources import policy_with

GPUS = {"GPU-1111", "GPU-2222"}


def process(in_flight: int, clock: ManualClock) -> EnergyLedger:
    """One process's ledger for the pool `big` (idle 100 W a GPU), with `in_flight` requests running 1 s."""
    ledger = EnergyLedger({"big": 100.0}, clock=clock)
    for index in range(in_flight):
        ledger.request_started(f"r{index}", "big", tracks_tokens=False)
    return ledger


def test_processes_book_their_share_and_add_up_to_what_the_gpus_used():
    """One process with 1 request in flight, another with 3, on the same 2 GPUs for 1 s: the first books a
    quarter of the 1,000 J measured and the second three quarters (each with its part of the idle 200 J), so
    together they book 1,000 J, not 2,000; each process's own books still balance."""
    clock = ManualClock()
    first, second = process(1, clock), process(3, clock)
    clock.advance(1.0)
    assert (first.in_flight("big", 1.0), second.in_flight("big", 1.0)) == (1.0, 3.0)
    one = first.on_interval("big", 1000.0, 1.0, n_gpus=2, others=Others(processes=1, in_flight=3.0))
    three = second.on_interval("big", 1000.0, 1.0, n_gpus=2, others=Others(processes=1, in_flight=1.0))
    assert (one.measured_j, three.measured_j) == pytest.approx((250.0, 750.0))
    assert (one.idle_j, three.idle_j) == pytest.approx((50.0, 150.0))
    assert sum(one.shares_j.values()) + sum(three.shares_j.values()) == pytest.approx(800.0)
    for ledger in (first, second):
        totals = ledger.totals("big")
        assert totals.attributed_j + totals.idle_j == pytest.approx(totals.measured_j)
        assert (totals.active_s, totals.idle_s) == (1.0, 0.0)


def test_an_idle_interval_is_split_evenly_and_a_process_idle_beside_a_busy_one_books_nothing():
    """Nothing in flight anywhere: each of three processes books a third, all idle. A process with nothing in
    flight while another has requests books none of the interval, and counts it as active time of the GPUs."""
    clock = ManualClock()
    idle = [process(0, clock) for _ in range(3)]
    clock.advance(1.0)
    splits = [ledger.on_interval("big", 300.0, 1.0, others=Others(processes=2, in_flight=0.0)) for ledger in idle]
    assert [(s.measured_j, s.idle_j) for s in splits] == pytest.approx([(100.0, 100.0)] * 3)
    quiet = process(0, clock)
    clock.advance(1.0)
    split = quiet.on_interval("big", 500.0, 1.0, others=Others(processes=1, in_flight=2.0))
    assert (split.measured_j, split.idle_j, split.shares_j) == (0.0, 0.0, {})
    assert (quiet.totals("big").active_s, quiet.totals("big").idle_s) == (1.0, 0.0)


def test_without_others_a_process_books_the_whole_interval():
    clock = ManualClock()
    ledger = process(2, clock)
    clock.advance(1.0)
    assert ledger.on_interval("big", 600.0, 1.0, others=None).measured_j == 600.0
    assert ledger.on_interval("big", 600.0, 1.0, others=Others(processes=0, in_flight=0.0)).measured_j == 600.0


def test_the_gpus_go_by_their_uuids_whatever_their_order():
    assert gpus_key(["GPU-2222", "GPU-1111"]) == gpus_key(GPUS) != gpus_key(["GPU-1111"])


async def test_processes_hear_each_other_through_redis_and_a_silent_one_drops_out(redis_server, monkeypatch):
    """Three processes say their numbers in flight on the same GPUs: each hears the other two's (not its own);
    processes on other GPUs are not heard; one that stops saying anything is left out once its word is past
    FRESH_S, and its field is removed."""
    monkeypatch.setattr(sharing, "FRESH_S", 0.3)
    client = Redis.from_url(redis_server.url)
    try:
        a, b, c, elsewhere = (EnergySharing(client, "gw", timeout_s=1.0) for _ in range(4))
        assert await a.exchange(GPUS, 1.0) == Others(processes=0, in_flight=0.0)
        assert await b.exchange(GPUS, 2.5) == Others(processes=1, in_flight=1.0)
        assert await elsewhere.exchange({"GPU-9999"}, 7.0) == Others(processes=0, in_flight=0.0)
        assert await c.exchange(GPUS, 0.0) == Others(processes=2, in_flight=3.5)
        assert await a.exchange(GPUS, 1.0) == Others(processes=2, in_flight=2.5)
        await asyncio.sleep(0.4)                    # b and c fall silent
        assert await a.exchange(GPUS, 1.0) == Others(processes=0, in_flight=0.0)
        assert await client.hkeys(f"gw:energy:{gpus_key(GPUS)}") == [a.process_id.encode()]
        assert 0 < await client.pttl(f"gw:energy:{gpus_key(GPUS)}") <= 600
    finally:
        await client.aclose()


async def test_a_redis_that_does_not_answer_is_no_answer_and_counted(redis_server):
    """Redis gone: the exchange answers None (the monitor keeps what it last heard while fresh, then books
    alone) and counts a store failure."""
    client = Redis.from_url(redis_server.url, socket_connect_timeout=0.2, socket_timeout=0.2)
    try:
        shared = EnergySharing(client, "gw", timeout_s=0.5)
        assert await shared.exchange(GPUS, 1.0) == Others(processes=0, in_flight=0.0)
        redis_server.stop()
        assert await shared.exchange(GPUS, 1.0) is None
        assert shared.store_failures == 1
    finally:
        await client.aclose()


def one_gpu_host(clock: ManualClock, uuid: str | None = "GPU-77777777-2222-3333-4444-555555555555") -> FakeNvml:
    gpu = FakeGpu(uuid=uuid, power_w=300.0, clock=clock)
    gpu.set_power(300.0)
    return FakeNvml(gpus=[gpu])


async def test_processes_sampling_slowly_still_hear_each_other(redis_server, monkeypatch):
    """Two processes sampling one GPU every 4 s (here: their clock moves 1 s a round, and each round takes
    longer, in real time, than FRESH_S): a word stays fresh for four sampling intervals, so they go on sharing,
    and their books add up to about what the GPU used (one round late to hear of the other's requests), not
    twice it, as when each word went stale before the next and each process booked everything alone."""
    monkeypatch.setattr(sharing, "FRESH_S", 0.05)
    clock = ManualClock()
    nvml = one_gpu_host(clock)
    policy = policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}, interval_s=4.0)
    client = Redis.from_url(redis_server.url)
    monitors = [EnergyMonitor(policy, nvml_module=nvml, clock=clock) for _ in range(2)]
    try:
        for monitor in monitors:
            monitor.share_through(EnergySharing(client, "gw", timeout_s=1.0))
            await monitor.open()
            await monitor.sample_once()
        first, second = monitors
        first.request_started("big", tracks_tokens=False)
        for _ in range(3):
            second.request_started("big", tracks_tokens=False)
        rounds = 6
        for _ in range(rounds):
            clock.advance(1.0)
            await asyncio.sleep(0.1)                # past FRESH_S: only the interval keeps the words fresh
            for monitor in monitors:
                await monitor.sample_once()
        booked = [monitor.totals("big").measured_j for monitor in monitors]
        # 300 J a round: split 1:3 from the second round; in the first, the first process had not yet heard of
        # the second's requests (its last word was from before them) and booked it all
        assert booked == pytest.approx([300.0 + 75.0 * (rounds - 1), 225.0 * rounds])
    finally:
        for monitor in monitors:
            await monitor.stop()
        await client.aclose()


async def test_gpus_that_report_no_uuid_are_said_to_be_unshared(redis_server, caplog):
    """GPUs whose NVML gives no UUID cannot be known to other processes: the process books alone, and says so
    once (it was silent, the books of N workers adding up N times)."""
    clock = ManualClock()
    client = Redis.from_url(redis_server.url)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}),
                            nvml_module=one_gpu_host(clock, uuid=None), clock=clock)
    try:
        monitor.share_through(EnergySharing(client, "gw", timeout_s=1.0))
        await monitor.open()
        for _ in range(4):
            await monitor.sample_once()
            clock.advance(0.25)
        said = [r for r in caplog.records if "report no UUID" in r.getMessage()]
        assert len(said) == 1 and said[0].levelname == "WARNING"
        assert await client.keys("gw:energy:*") == []
    finally:
        await monitor.stop()
        await client.aclose()
