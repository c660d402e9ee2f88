"""GPU energy shared out between the processes that measure the same GPUs (workers, replicas), through a real
redis-server, or without Redis through the workers' folder: each books its share of every interval, so their books
add up to what the GPUs used, not N times it. The whole check, two gateway workers against the fake GPU, with and
without Redis, is in test_bench_gpu_energy.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.energy import EnergyMonitor, monitor as monitor_module, sharing
from gateway.energy.attribution import EnergyLedger, Others
from gateway.energy.sharing import EnergySharing, FolderSharing, gpus_key
from gateway.policy.model import GpuSource
from gateway.services import energy_sharing_for
from gateway.stores import Stores
from gateway.telemetry.peers import Peers
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


@pytest.mark.parametrize("through", ["redis", "folder"])
async def test_processes_sampling_slowly_still_hear_each_other(request, tmp_path, monkeypatch, through):
    """Two processes sampling one GPU every 4 s (here: their clock moves 1 s a round, and each round takes
    longer, in real time, than FRESH_S): a word stays fresh for four sampling intervals, so they go on sharing,
    and their books add up to about what the GPU used (one round late to hear of the other's requests), not
    twice it, as when each word went stale before the next and each process booked everything alone."""
    monkeypatch.setattr(monitor_module, "FRESH_S", 0.05)     # the name the monitor reads
    clock = ManualClock()
    nvml = one_gpu_host(clock)
    policy = policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}, interval_s=4.0)
    client = Redis.from_url(request.getfixturevalue("redis_server").url) if through == "redis" else None
    monitors = [EnergyMonitor(policy, nvml_module=nvml, clock=clock) for _ in range(2)]
    try:
        for slot, monitor in enumerate(monitors):
            monitor.share_through(EnergySharing(client, "gw", timeout_s=1.0) if client is not None
                                  else FolderSharing(tmp_path / "workers", slot))
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
        if client is not None:
            await client.aclose()
    if through == "folder":                         # each took its words back; the last one out, the folder
        assert not (tmp_path / "workers").exists()


async def test_a_process_cut_off_from_the_others_for_longer_than_a_word_lasts_books_alone(tmp_path):
    """Once the folder cannot be used and the last word heard is older than four sampling intervals, the process
    books the GPU's whole energy among its own requests, not the share it last heard of."""
    clock = ManualClock()
    folder = tmp_path / "workers"
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}, interval_s=4.0),
                            nvml_module=one_gpu_host(clock), clock=clock)
    other = FolderSharing(folder, 1)
    try:
        monitor.share_through(FolderSharing(folder, 0))
        await monitor.open()
        assert await other.exchange({"GPU-77777777-2222-3333-4444-555555555555"}, 3.0, fresh_s=16.0) == Others(0, 0.0)
        await monitor.sample_once()                 # hears the other's 3 requests
        monitor.request_started("big", tracks_tokens=False)
        folder.chmod(0o777)                         # refused from now on
        clock.advance(20.0)
        await monitor.sample_once()
        assert monitor.sharing.store_failures == 1
        assert monitor.totals("big").measured_j == pytest.approx(300.0 * 20.0)
    finally:
        folder.chmod(0o700)
        await monitor.stop()
        await other.close()


async def test_a_word_lasts_four_sampling_intervals_when_that_is_longer_than_fresh_s(tmp_path):
    """Sampling every 4 s, a worker's word said 5 s ago (past FRESH_S, within four intervals) is still heard: the
    process books its share beside the other's 3 requests, a quarter, not the GPU's whole energy."""
    clock = ManualClock()
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    uuid = "GPU-77777777-2222-3333-4444-555555555555"
    (folder / f"{gpus_key({uuid})}.1.energy").write_text(f"3.0 {time.monotonic() - 5.0!r}")
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}, interval_s=4.0),
                            nvml_module=one_gpu_host(clock, uuid), clock=clock)
    monitor.share_through(FolderSharing(folder, 0))
    try:
        await monitor.open()
        await monitor.sample_once()
        monitor.request_started("big", tracks_tokens=False)
        clock.advance(1.0)
        await monitor.sample_once()
        assert monitor.totals("big").measured_j == pytest.approx(300.0 / 4)
    finally:
        await monitor.stop()


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


async def test_workers_hear_each_other_through_their_folder_and_a_silent_one_drops_out(tmp_path):
    """Without Redis, the workers of one gateway say their numbers in flight through files in their private
    folder: each hears the others' (not its own), not those measuring other GPUs, nor one silent for longer than
    `fresh_s`; a worker that stops takes its words back, and the last one out removes the folder."""
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    a, b, c, elsewhere = (FolderSharing(folder, slot) for slot in range(4))
    assert await a.exchange(GPUS, 1.0, fresh_s=0.3) == Others(processes=0, in_flight=0.0)
    assert await b.exchange(GPUS, 2.5, fresh_s=0.3) == Others(processes=1, in_flight=1.0)
    assert await elsewhere.exchange({"GPU-9999"}, 7.0, fresh_s=0.3) == Others(processes=0, in_flight=0.0)
    assert await c.exchange(GPUS, 0.0, fresh_s=0.3) == Others(processes=2, in_flight=3.5)
    assert await a.exchange(GPUS, 1.0, fresh_s=0.3) == Others(processes=2, in_flight=2.5)
    await asyncio.sleep(0.4)                        # b and c fall silent
    assert await a.exchange(GPUS, 1.0, fresh_s=0.3) == Others(processes=0, in_flight=0.0)
    assert await b.exchange(GPUS, 4.0, fresh_s=0.3) == Others(processes=1, in_flight=1.0)
    await b.close()
    assert await a.exchange(GPUS, 1.0, fresh_s=0.3) == Others(processes=0, in_flight=0.0)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"{gpus_key(GPUS)}.0.energy", f"{gpus_key(GPUS)}.2.energy", f"{gpus_key({'GPU-9999'})}.3.energy"])
    for sharing_ in (a, c):
        await sharing_.close()
    assert folder.exists()                          # a worker still holds words there
    await elsewhere.close()
    assert not folder.exists()


async def test_a_worker_after_the_last_one_out_makes_the_folder_again(tmp_path):
    """Every worker stopped at once took the folder: a replacement makes it again, this user's alone."""
    folder = tmp_path / "workers"
    assert await FolderSharing(folder, 1).exchange(GPUS, 2.0) == Others(processes=0, in_flight=0.0)
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("problem", ["open to others", "not a folder"])
async def test_a_folder_that_cannot_be_used_is_no_answer_and_counted(tmp_path, caplog, problem):
    """A folder others may write to (refused: their words would be trusted), or a path that cannot be a folder:
    no answer (the monitor keeps what it last heard while fresh, then books alone), counted as a store failure and
    said once; once it works again, said too."""
    caplog.set_level(logging.WARNING, logger="gateway.energy.sharing")
    if problem == "open to others":
        folder = tmp_path / "workers"
        folder.mkdir(mode=0o700)
        folder.chmod(0o777)
    else:
        (tmp_path / "file").write_text("")
        folder = tmp_path / "file" / "workers"
    shared = FolderSharing(folder, 0)
    assert await shared.exchange(GPUS, 1.0) is None
    assert await shared.exchange(GPUS, 1.0) is None
    assert shared.store_failures == 2
    assert [r.getMessage() for r in caplog.records if "cannot share GPU energy" in r.getMessage()] != []
    assert len(caplog.records) == 1
    if problem == "open to others":
        folder.chmod(0o700)
        assert await shared.exchange(GPUS, 1.0) == Others(processes=0, in_flight=0.0)
        assert "again" in caplog.records[-1].getMessage() and len(caplog.records) == 2


async def test_a_word_from_before_the_clock_started_is_stale(tmp_path):
    """A word is dated on the host's monotonic clock, which every process of the host shares: one dated earlier
    than `fresh_s` ago is not heard, and a file that holds no word (cut short) is skipped."""
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    (folder / f"{gpus_key(GPUS)}.1.energy").write_text(f"5.0 {time.monotonic() - 10.0!r}")
    (folder / f"{gpus_key(GPUS)}.2.energy").write_text("5.0")
    (folder / f"{gpus_key(GPUS)}.3.energy").write_text(f"2.0 {time.monotonic()!r}")
    assert await FolderSharing(folder, 0).exchange(GPUS, 1.0) == Others(processes=1, in_flight=2.0)


async def test_a_folder_path_that_is_a_symbolic_link_is_refused(tmp_path):
    """The folder gone (the last worker out took it) and a symbolic link put at its path, even to a folder of this
    user's alone: refused, nothing written there (a link to elsewhere would have the worker write, and hear, what
    another user chose)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    folder = tmp_path / "workers"
    folder.symlink_to(elsewhere)
    shared = FolderSharing(folder, 0)
    assert await shared.exchange(GPUS, 1.0) is None and shared.store_failures == 1
    assert list(elsewhere.iterdir()) == []


async def test_close_waits_for_an_exchange_still_in_its_thread(tmp_path, monkeypatch):
    """The monitor stopping cancels an exchange whose thread runs on (a slow disk): the worker's close waits for
    it, so its word is not written after the words were taken back (it kept the folder from going)."""
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    made = sharing.own_folder

    def slow_disk(path):
        time.sleep(0.2)
        made(path)

    monkeypatch.setattr(sharing, "own_folder", slow_disk)
    shared = FolderSharing(folder, 0)
    exchanging = asyncio.create_task(shared.exchange(GPUS, 1.0))
    await asyncio.sleep(0.05)
    exchanging.cancel()
    await asyncio.gather(exchanging, return_exceptions=True)
    await shared.close()
    await asyncio.sleep(0.4)                        # past the slow write, had it been left running
    assert not folder.exists()


async def test_a_word_cut_short_while_written_leaves_the_last_whole_one(tmp_path, monkeypatch):
    """A word is written aside and renamed into place: a write that fails halfway (a full disk) leaves the
    worker's last whole word for the others to hear, not a torn one they would skip."""
    folder = tmp_path / "workers"
    folder.mkdir(mode=0o700)
    first, second = FolderSharing(folder, 0), FolderSharing(folder, 1)
    assert await first.exchange(GPUS, 3.0) == Others(processes=0, in_flight=0.0)
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        write_text(path, text[:3], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert await first.exchange(GPUS, 5.0) is None
    monkeypatch.undo()
    assert await second.exchange(GPUS, 1.0) == Others(processes=1, in_flight=3.0)
    for shared in (first, second):
        await shared.close()
    assert not folder.exists()                      # the half-written word taken back too


async def test_a_process_shares_through_redis_when_there_is_one_else_through_the_workers_folder(tmp_path):
    """Redis, when configured, for every process (replicas too); without it, the workers of one gateway through
    their folder; a lone process without Redis shares with nobody."""
    client = Redis.from_url("redis://127.0.0.1:1")
    peers = Peers(tmp_path, 1, 2, metrics=False)
    try:
        with_redis = energy_sharing_for(memory_stores(redis=client), peers, 0.5)
        assert isinstance(with_redis, EnergySharing) and with_redis.prefix == "gw"
        folder = energy_sharing_for(memory_stores(), peers, 0.5)
        assert isinstance(folder, FolderSharing) and (folder.folder, folder.slot) == (tmp_path, 1)
        assert energy_sharing_for(memory_stores(), None, 0.5) is None
    finally:
        await client.aclose()


def memory_stores(redis=None) -> Stores:
    return Stores(cache=None, singleflight=None, limiter=None, budgets=None, redis=redis, key_prefix="gw")
