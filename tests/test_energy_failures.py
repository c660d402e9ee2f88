"""GPU sampling when things go wrong: a hung NVML call, an exporter down, bad values, a GPU in two pools."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest

from gateway.energy import EnergyMonitor
from gateway.energy.dcgm import POWER, parse_exporter_text
from gateway.policy.model import GpuSource
from tests.support.fake_pynvml import ManualClock, two_gpus
from tests import test_energy_sources
from tests.test_energy_edges import awaiting_books
from tests.test_energy_sources import FIXTURE, policy_with, with_more_energy

#: the shared fixtures: a DCGM exporter stand-in and one aiohttp session
exporter, session = test_energy_sources.exporter, test_energy_sources.session

#: DCGM's "no value" for the int64 energy counter, as older exporters print it
DCGM_INT64_BLANK = 9223372036854775794


def gpu0_with(text: str, field: str, value: object) -> str:
    """The exporter text with GPU 0's `field` replaced by `value`."""
    return re.sub(rf'^({field}\{{gpu="0".*\}}) \S+$', rf"\g<1> {value}", text, flags=re.M)


def reading_of(monitor: EnergyMonitor, label: str):
    [reading] = [r for r in monitor.snapshot() if r.model == label]
    return reading


# -- a hung NVML call --------------------------------------------------------------


async def test_a_hung_nvml_read_holds_back_no_other_pool(exporter, session):
    """While GPU 0's NVML read hangs, the NVML pool of GPU 1 and a DCGM pool are still read every interval."""
    nvml = two_gpus(time.monotonic, power_w=100.0)
    policy = policy_with({"hung": GpuSource(source="nvml", ids=("0",)), "other": GpuSource(source="nvml", ids=("1",)),
                          "remote": GpuSource(source="dcgm", ids=("0",), url=exporter.url)}, interval_s=0.05)
    monitor = EnergyMonitor(policy, session=session, nvml_module=nvml)
    monitor.nvml_timeout_s = 5.0
    await monitor.start()
    await asyncio.sleep(0.2)
    nvml.gpus[0].hang = threading.Event()
    try:
        await asyncio.sleep(0.2)
        before = {label: reading_of(monitor, label).timestamp_s for label in ("other", "remote")}
        await asyncio.sleep(0.5)
        after = {label: reading_of(monitor, label).timestamp_s for label in ("other", "remote")}
        assert all(after[label] - before[label] >= 0.3 for label in before), (before, after)
        assert monitor.health["other"] == monitor.health["remote"] == "ok"
    finally:
        nvml.gpus[0].hang.set()
        await asyncio.wait_for(monitor.stop(), 5.0)


async def test_a_read_still_hanging_from_the_last_sample_fails_at_once():
    """Once an NVML read has timed out, the next samples fail its pool at once instead of waiting again."""
    nvml = two_gpus(ManualClock(), power_w=100.0)
    monitor = EnergyMonitor(policy_with({"hung": GpuSource(source="nvml", ids=("0",))}), nvml_module=nvml)
    monitor.nvml_timeout_s = 0.5
    await monitor.open()
    await monitor.sample_once()
    nvml.gpus[0].hang = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        await monitor.sample_once()
        began_s = loop.time()
        await monitor.sample_once()
        assert loop.time() - began_s < 0.25
        assert monitor.health == {"hung": "failing"} and "NVML did not answer" in monitor.reasons["hung"]
    finally:
        nvml.gpus[0].hang.set()
        await asyncio.wait_for(monitor.stop(), 5.0)


# -- readings that fail ------------------------------------------------------------


async def test_a_request_whose_gpus_fail_has_no_joules_not_a_part(exporter, session):
    """A request whose exporter goes down before its books close gets None, not the joules booked before."""
    clock = ManualClock()
    exporter.texts = [FIXTURE, with_more_energy(FIXTURE, {"0": 400_000, "1": 0})]
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    request = monitor.request_started("big", tracks_tokens=False)
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.ledger._flights[request].energy_j == pytest.approx(300.0)     # a part is booked
    exporter.status = 503
    clock.advance(1.0)
    await monitor.sample_once()
    assert await monitor.request_finished(request) is None
    await monitor.stop()


async def test_energy_during_an_exporter_outage_is_not_booked_nor_given_to_the_requests_in_flight_after(
        exporter, session):
    """An exporter down for 3 s: what the GPU used meanwhile is not booked (booked whole on its return, it would
    all go to the requests in flight then, not those that ran meanwhile); a request that ran across the outage has
    no joules (not whole), and booking resumes from the first reading after it."""
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    exporter.texts = [FIXTURE]
    await monitor.sample_once()
    request = monitor.request_started("big", tracks_tokens=False)
    exporter.status = 503
    for _ in range(3):
        clock.advance(1.0)
        await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    exporter.status, exporter.texts = 200, [with_more_energy(FIXTURE, {"0": 1_600_000, "1": 0})]   # 4 s at 400 W
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.totals("big").measured_j == 0.0
    late = monitor.request_started("big", tracks_tokens=False)
    exporter.texts = [with_more_energy(FIXTURE, {"0": 2_000_000, "1": 0})]                          # 1 s at 400 W
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.totals("big").measured_j == pytest.approx(400.0)
    assert await monitor.request_finished(request) is None     # ran through the outage: not whole
    assert await monitor.request_finished(late) == pytest.approx(150.0)     # its share of 300 J above idle
    await monitor.stop()


async def test_a_negative_power_from_an_exporter_is_absent_and_stops_no_sampling(exporter, session):
    """GPU 0 reporting -3.5 W and a blank counter is failing; the sampler lives on and the NVML pool is booked."""
    assert POWER not in parse_exporter_text(gpu0_with(FIXTURE, POWER, -3.5), None)["0"]
    exporter.texts = [gpu0_with(gpu0_with(FIXTURE, POWER, -3.5), "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                                DCGM_INT64_BLANK)]
    nvml = two_gpus(time.monotonic, power_w=300.0)
    monitor = EnergyMonitor(policy_with({"local": GpuSource(source="nvml", ids=("0",)),
                                         "remote": GpuSource(source="dcgm", ids=("0",), url=exporter.url)},
                                        interval_s=0.05), session=session, nvml_module=nvml)
    await monitor.start()
    try:
        await asyncio.sleep(0.3)
        measured_j = monitor.totals("local").measured_j
        await asyncio.sleep(0.3)
        assert not monitor._task.done()
        assert monitor.totals("local").measured_j > measured_j
        assert monitor.health == {"local": "ok", "remote": "failing"}
        assert monitor.reasons["remote"] == "GPU 0: reports neither energy nor power"
    finally:
        await monitor.stop()


async def test_sampling_that_raises_fails_the_pool_saying_why_until_a_sample_works():
    """An NVML binding raising something other than an NVMLError (here a NaN power it cannot round) fails the pool
    with the error as its reason; the next good sample makes it ok again."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=0.0)}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    nvml.gpus[0].power_w = float("nan")
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    assert monitor.reasons["big"].startswith("sampling failed: ValueError")
    nvml.gpus[0].power_w = 100.0
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.health == {"big": "ok"}
    await monitor.stop()


async def test_a_request_whose_joules_are_no_longer_awaited_is_forgotten():
    """A wait for a request's books that is cancelled (its client gone) drops the request from the books."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml")}), nvml_module=nvml, clock=clock)
    request, finished = await awaiting_books(monitor, clock)
    finished.cancel()
    await asyncio.gather(finished, return_exceptions=True)
    assert finished.cancelled() and monitor.ledger.model_of(request) is None
    monitor._task.cancel()
    await monitor.stop()


# -- one GPU in two pools ----------------------------------------------------------


async def test_a_gpu_named_by_index_and_by_uuid_in_two_pools_is_not_booked_twice(caplog):
    """Models naming GPU 0 as "0" and by its UUID: neither pool books it, both are failing, and an error names both."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=200.0)
    uuid = nvml.gpus[0].uuid
    monitor = EnergyMonitor(policy_with({"a": GpuSource(source="nvml", ids=("0",)),
                                         "b": GpuSource(source="nvml", ids=(uuid,))}), nvml_module=nvml, clock=clock)
    await monitor.open()
    with caplog.at_level(logging.ERROR, logger="gateway.energy"):
        for _ in range(4):
            await monitor.sample_once()
            clock.advance(1.0)
    await monitor.stop()
    assert monitor.totals("a").measured_j == monitor.totals("b").measured_j == 0.0
    assert monitor.health == {"a": "failing", "b": "failing"}
    assert monitor.reasons["a"] == f"GPU {uuid} is also measured for b"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(uuid in message and "for a" in message and "energy of b" in message for message in errors)


async def test_a_pool_freed_from_a_conflict_books_nothing_of_the_time_in_conflict():
    """A reload adds a model naming GPU 0 by UUID beside one naming it "0", then takes it away: the energy the GPU
    used while both named it is not booked afterwards either; booking starts again from the next reading."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=200.0)
    alone = policy_with({"a": GpuSource(source="nvml", ids=("0",))})
    monitor = EnergyMonitor(alone, nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    await monitor.adopt(policy_with({"a": GpuSource(source="nvml", ids=("0",)),
                                     "b": GpuSource(source="nvml", ids=(nvml.gpus[0].uuid,))}))
    for _ in range(3):
        clock.advance(1.0)
        await monitor.sample_once()
    assert monitor.health["a"] == "failing"
    await monitor.adopt(alone)
    booked_j = monitor.totals("a").measured_j
    for _ in range(2):
        clock.advance(1.0)
        await monitor.sample_once()
    await monitor.stop()
    assert monitor.health == {"a": "ok"}
    assert monitor.totals("a").measured_j - booked_j == pytest.approx(200.0)
