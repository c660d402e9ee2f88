"""GPU sampling at its edges: reloads, exporters with nothing to show, MIG, blank values, lost GPUs."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest

from gateway.energy import DcgmSource, EnergyMonitor
from gateway.energy.monitor import REOPEN_S, STALE_LIMIT_S
from gateway.policy.model import GpuSource
from tests.support.fake_pynvml import ManualClock, two_gpus
from tests import test_energy_sources
from tests.test_energy_sources import FIXTURE, policy_with

#: the shared fixtures: a DCGM exporter stand-in and one aiohttp session
exporter, session = test_energy_sources.exporter, test_energy_sources.session

GPU0_UUID = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
#: DCGM's "no value" for an int64 field, as older exporters print it
DCGM_INT64_BLANK = 9223372036854775794
NODE_EXPORTER_TEXT = "# HELP node_load1 1m load average.\n# TYPE node_load1 gauge\nnode_load1 0.42\n"


def mig_text(energy_mj: int, power_w: float = 250.0) -> str:
    """Exporter text for GPU 0 in MIG mode: each device field once per GPU instance, as dcgm-exporter writes it."""
    lines = []
    for field, kind, value in (("DCGM_FI_DEV_POWER_USAGE", "gauge", power_w),
                               ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", energy_mj),
                               ("DCGM_FI_DEV_FB_USED", "gauge", 1000), ("DCGM_FI_DEV_FB_FREE", "gauge", 19000)):
        lines += [f"# HELP {field} {field}.", f"# TYPE {field} {kind}"]
        for instance, profile in ((3, "3g.40gb"), (5, "3g.40gb")):
            lines.append(f'{field}{{gpu="0",UUID="{GPU0_UUID}",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",'
                         f'GPU_I_PROFILE="{profile}",GPU_I_ID="{instance}",Hostname="gpu-node-1"}} {value}')
    return "\n".join(lines) + "\n"


def with_energy(text: str, gpu: str, energy_mj: int) -> str:
    """The exporter text with GPU `gpu`'s energy counter replaced by `energy_mj`."""
    pattern = rf'^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{{gpu="{gpu}".*\}} )\d+$'
    return re.sub(pattern, rf"\g<1>{energy_mj}", text, flags=re.M)


async def awaiting_books(monitor: EnergyMonitor, clock: ManualClock) -> tuple[object, asyncio.Task]:
    """Open `monitor` with its samples driven by the test, start a request on `big`, and half a second on have a
    task waiting for its joules: (the request, that task)."""
    await monitor.open()
    monitor._task = asyncio.create_task(asyncio.sleep(3600))    # stands in for start(): samples are driven here
    await monitor.sample_once()
    request = monitor.request_started("big")
    clock.advance(0.5)
    finished = asyncio.create_task(monitor.request_finished(request))
    await asyncio.sleep(0)
    return request, finished


def gpu0_monitor(exporter, session) -> tuple[EnergyMonitor, ManualClock]:
    """A monitor of one pool, `big`, on DCGM GPU 0 of gpu-node-1 behind the test's exporter (no idle power
    configured), and the clock the test moves it by."""
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, hostname="gpu-node-1", idle_w=0.0)
    return EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock), clock


async def booked_over_two_seconds(exporter, session, texts: list[str]):
    """The joules a pool on DCGM GPU 0 books between two samples 2 s apart of the exporter's `texts` (the last one
    repeated), and the GPU's last reading."""
    exporter.texts = texts
    monitor, clock = gpu0_monitor(exporter, session)
    await monitor.open()
    try:
        await monitor.sample_once()
        clock.advance(2.0)
        await monitor.sample_once()
        return monitor.totals("big").measured_j, monitor.snapshot()[0]
    finally:
        await monitor.stop()


async def test_a_reload_to_a_longer_interval_waits_longer_for_a_requests_books():
    """After a reload from 0.25 s to 5 s sampling, a request's joules are awaited 2 x 5 + 2 s, as at start-up."""
    nvml = two_gpus(ManualClock())
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml")}, interval_s=0.25), nvml_module=nvml)
    await monitor.adopt(policy_with({"big": GpuSource(source="nvml")}, interval_s=5.0))
    fresh = EnergyMonitor(policy_with({"big": GpuSource(source="nvml")}, interval_s=5.0), nvml_module=nvml)
    assert monitor.settle_timeout_s == fresh.settle_timeout_s == 12.0


async def test_a_request_on_gpus_a_reload_took_away_is_answered_without_waiting_out_its_books():
    """A request awaiting its joules on a pool that a reload removes gets None (not whole) at once, not after
    the 2 x 60 + 2 s it would wait for a sample."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", ids=("0",))}, interval_s=60.0),
                            nvml_module=nvml, clock=clock)
    _, finished = await awaiting_books(monitor, clock)
    await monitor.adopt(policy_with({"small": GpuSource(source="nvml", ids=("1",))}, interval_s=60.0))
    try:
        assert await asyncio.wait_for(finished, 10.0) is None
    finally:
        monitor._task.cancel()
        await monitor.stop()


@pytest.mark.parametrize(("text", "hostname"), [(FIXTURE, "gpu-node-9"), (NODE_EXPORTER_TEXT, None)],
                         ids=["another-host", "not-dcgm"])
async def test_an_exporter_without_any_matching_gpu_is_failing_not_ok(exporter, session, text, hostname):
    """A scrape that finds no DCGM GPU (another host's exporter, or not a DCGM exporter) marks the model failing."""
    exporter.texts = [text]
    gpus = GpuSource(source="dcgm", url=exporter.url, hostname=hostname)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session)
    await monitor.open()
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    assert "no GPU in the DCGM exporter output" in monitor.reasons["big"]
    await monitor.stop()


async def test_a_mig_gpu_is_read_from_its_instance_series_once(exporter, session):
    """A GPU in MIG mode, whose device fields come once per instance, is read: its counter once, its memory summed."""
    exporter.texts = [mig_text(5_000_000), mig_text(5_400_000)]
    monitor, clock = gpu0_monitor(exporter, session)
    await monitor.open()
    await monitor.sample_once()
    clock.advance(1.0)
    await monitor.sample_once()
    [gpu0] = monitor.snapshot()
    assert monitor.health == {"big": "ok"}
    assert (gpu0.energy_mj, gpu0.power_w, gpu0.uuid) == (5_400_000, 250.0, GPU0_UUID)
    assert (gpu0.memory_used_bytes, gpu0.memory_total_bytes) == (2000 * 2**20, 40000 * 2**20)
    assert monitor.totals("big").measured_j == pytest.approx(400.0)
    await monitor.stop()


async def test_a_blank_dcgm_energy_counter_falls_back_to_power(exporter, session):
    """An energy counter an old exporter prints as DCGM's blank value is absent: power x dt is booked instead."""
    booked_j, reading = await booked_over_two_seconds(exporter, session, [with_energy(FIXTURE, "0", DCGM_INT64_BLANK)])
    assert reading.energy_mj is None
    assert booked_j == pytest.approx(412.345 * 2.0)


async def test_a_gpu_with_whole_gpu_series_is_read_from_them_not_from_its_instances(exporter, session):
    """An exporter printing a GPU's whole-GPU series and also per-instance ones: the whole GPU's values are read."""
    exporter.texts = [FIXTURE + mig_text(5_000_000, power_w=250.0)]
    [reading] = await DcgmSource(exporter.url, ("0",), "gpu-node-1", session).read()
    assert (reading.energy_mj, reading.power_w) == (4817294001, 412.345)
    assert (reading.memory_used_bytes, reading.memory_total_bytes) == (73403 * 2**20, 81559 * 2**20)


async def test_every_gpu_of_an_exporter_is_listed_in_numeric_order(exporter, session):
    """With no ids named, GPUs come in the order of their numbers: GPU 2 before GPU 10, not as text sorts them."""
    exporter.texts = [FIXTURE.replace('gpu="0"', 'gpu="10"').replace('gpu="1"', 'gpu="2"')]
    readings = await DcgmSource(exporter.url, (), "gpu-node-1", session).read()
    assert [r.gpu_id for r in readings] == ["2", "10"]


async def test_an_energy_counter_past_the_gauges_blank_value_is_still_read(exporter, session):
    """The int64 energy counter has its own blank marker: a count above the float gauges' (2**47 mJ) is energy."""
    exporter.texts = [with_energy(FIXTURE, "0", 2**47 + 1_000)]
    [reading] = await DcgmSource(exporter.url, ("0",), "gpu-node-1", session).read()
    assert reading.energy_mj == 2**47 + 1_000


async def test_an_energy_counter_that_went_back_is_booked_by_power(exporter, session):
    """A counter lower than the last one (reset by a driver reload) is no delta: the interval is booked as
    power x dt."""
    booked_j, _ = await booked_over_two_seconds(exporter, session, [FIXTURE, with_energy(FIXTURE, "0", 1_000)])
    assert booked_j == pytest.approx(412.345 * 2.0)


async def test_blank_dcgm_gauges_are_absent(exporter, session):
    """Power and utilization printed as DCGM's blank values are read as absent, not as 140 TW and 1.4e12 %."""
    text = re.sub(r'^(DCGM_FI_DEV_(POWER_USAGE|GPU_UTIL)\{gpu="0".*\} ).*$', r"\g<1>140737488355328.0",
                  FIXTURE, flags=re.M)
    exporter.texts = [text]
    [reading] = await DcgmSource(exporter.url, ("0",), "gpu-node-1", session).read()
    assert (reading.failed, reading.power_w, reading.utilization) == (False, None, None)


async def test_a_gpu_still_lost_at_reopen_does_not_stop_measuring_the_others():
    """A GPU still lost when its pool is opened afresh leaves the pool failing, the other GPU still booked."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=0.0)}), nvml_module=nvml,
                            clock=clock)
    await monitor.open()
    await monitor.sample_once()
    nvml.gpus[1].lost = True
    clock.advance(REOPEN_S)
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"} and monitor.request_started("big") is not None
    assert monitor.totals("big").measured_j == pytest.approx(100.0 * (REOPEN_S + 1.0))
    assert nvml.init_count == 1
    await monitor.stop()
    assert nvml.init_count == 0


async def test_an_unconvertible_value_of_a_field_not_used_does_not_spoil_the_scrape(exporter, session):
    """A line dcgm-exporter could not format (`ERROR - FAILED TO CONVERT TO STRING`) in another field is skipped."""
    broken = ('# HELP DCGM_FI_DEV_VGPU_PER_PROCESS_UTILIZATION vGPU Per Process Utilization\n'
              '# TYPE DCGM_FI_DEV_VGPU_PER_PROCESS_UTILIZATION gauge\n'
              f'DCGM_FI_DEV_VGPU_PER_PROCESS_UTILIZATION{{gpu="0",UUID="{GPU0_UUID}",device="nvidia0",'
              'Hostname="gpu-node-1"} ERROR - FAILED TO CONVERT TO STRING\n')
    exporter.texts = [FIXTURE + broken]
    [reading] = await DcgmSource(exporter.url, ("0",), "gpu-node-1", session).read()
    assert (reading.failed, reading.energy_mj, reading.power_w) == (False, 4817294001, 412.345)


async def test_counters_frozen_for_a_minute_mark_the_model_failing(exporter, session):
    """Counters standing still at full power (a stuck exporter) fail the model after STALE_LIMIT_S, until they move."""
    exporter.texts = [FIXTURE]
    monitor, clock = gpu0_monitor(exporter, session)
    await monitor.open()
    await monitor.sample_once()
    for _ in range(int(STALE_LIMIT_S / 5) - 1):
        clock.advance(5.0)
        await monitor.sample_once()
    assert monitor.health == {"big": "ok"}
    clock.advance(5.0)
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    assert "GPU 0: energy counter not refreshed for 60 s" in monitor.reasons["big"]
    exporter.texts = [with_energy(FIXTURE, "0", 4817294001 + 1_000_000)]
    clock.advance(5.0)
    await monitor.sample_once()
    assert monitor.health == {"big": "ok"} and monitor.totals("big").measured_j == pytest.approx(1000.0)
    await monitor.stop()


async def test_a_counter_standing_still_at_zero_watts_is_an_idle_gpu_not_a_stuck_exporter(exporter, session):
    """A GPU drawing 0 W whose counter does not move for minutes is measured (0 J), not failing as stale."""
    exporter.texts = [re.sub(r'^(DCGM_FI_DEV_POWER_USAGE\{gpu="0".*\}) \S+$', r"\g<1> 0", FIXTURE, flags=re.M)]
    monitor, clock = gpu0_monitor(exporter, session)
    await monitor.open()
    await monitor.sample_once()
    for _ in range(2):
        clock.advance(STALE_LIMIT_S)
        await monitor.sample_once()
    assert monitor.health == {"big": "ok"}
    totals = monitor.totals("big")
    assert (totals.measured_j, totals.idle_s) == (0.0, 2 * STALE_LIMIT_S)
    await monitor.stop()


async def test_a_hung_nvml_call_fails_its_pool_without_stalling_the_others(exporter, session):
    """An NVML read that hangs fails its pool after nvml_timeout_s; DCGM pools go on, and stop returns."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    policy = policy_with({"local": GpuSource(source="nvml", ids=("0",), idle_w=0.0),
                          "remote": GpuSource(source="dcgm", ids=("0",), url=exporter.url, idle_w=0.0)})
    exporter.texts = [FIXTURE, with_energy(FIXTURE, "0", 4817294001 + 500_000)]
    monitor = EnergyMonitor(policy, session=session, nvml_module=nvml, clock=clock)
    monitor.nvml_timeout_s = 0.2
    await monitor.open()
    await monitor.sample_once()
    nvml.gpus[0].hang = threading.Event()
    clock.advance(1.0)
    try:
        await asyncio.wait_for(monitor.sample_once(), 5.0)
        assert monitor.health == {"local": "failing", "remote": "ok"}
        assert "NVML did not answer" in monitor.reasons["local"]
        assert monitor.totals("remote").measured_j == pytest.approx(500.0)
        await asyncio.wait_for(monitor.sample_once(), 5.0)     # the read still hangs: no second one is queued
        assert nvml.calls.count("nvmlDeviceGetTotalEnergyConsumption") == 2
        await asyncio.wait_for(monitor.stop(), 5.0)
    finally:
        nvml.gpus[0].hang.set()


async def test_a_gpu_reporting_neither_energy_nor_power_is_failing(exporter, session):
    """An exporter whose field list lacks power and energy cannot measure the model: failing, saying why."""
    exporter.texts = ["\n".join(line for line in FIXTURE.splitlines()
                                if "POWER_USAGE" not in line and "TOTAL_ENERGY" not in line) + "\n"]
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, hostname="gpu-node-1")
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session)
    await monitor.open()
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    assert monitor.reasons["big"] == "GPU 0: reports neither energy nor power"
    assert monitor.snapshot()[0].utilization == 0.87
    await monitor.stop()
