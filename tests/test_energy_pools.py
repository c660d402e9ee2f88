"""GPUs shared by several models are measured once; stale or replaced counters, reloads and request ids."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import pynvml
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway.energy import EnergyMonitor
from gateway.energy.dcgm import parse_exporter_text
from gateway.energy.monitor import REOPEN_S
from gateway.energy.pools import labels, pools, sharing_problem
from gateway.errors import PolicyError
from gateway.policy.load import parse_policy
from gateway.policy.model import GpuSource
from gateway.telemetry.observed import observe_gpus
from tests.support.fake_pynvml import ManualClock, two_gpus
from tests.support.harness import Harness
from tests.support.policies import latency, model, models
from tests.test_e2e_energy import POLICY, LiveExporter
from tests import test_energy_sources
from tests.test_energy_sources import FIXTURE, policy_with, with_more_energy

#: the shared fixtures: a DCGM exporter stand-in and one aiohttp session
exporter, session = test_energy_sources.exporter, test_energy_sources.session

GPU0_UUID = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"


def shared_gpu0(idle_w: float = 100.0) -> dict[str, GpuSource]:
    """A base model and its LoRA adapter served from GPU 0."""
    return {"base": GpuSource(source="nvml", ids=("0",), idle_w=idle_w),
            "base-lora": GpuSource(source="nvml", ids=("0",), idle_w=idle_w)}


# -- pools -----------------------------------------------------------------------


def test_models_naming_the_same_gpus_form_one_pool():
    """Same source and ids in any order: one pool labelled with both names; other GPUs: a pool of their own."""
    sources = {"a": GpuSource(source="nvml", ids=("0", "1")), "b": GpuSource(source="nvml", ids=("1", "0")),
               "c": GpuSource(source="nvml", ids=("2",))}
    assert labels(pools(sources)) == {("a", "b"): "a+b", ("c",): "c"}
    assert sharing_problem(sources) is None


def test_two_pools_whose_names_join_alike_get_two_labels():
    """Pools of "a" with "b+c" and of "a+b" with "c" both join to "a+b+c": each gets a label of its own."""
    sources = {"a": GpuSource(source="nvml", ids=("0",)), "b+c": GpuSource(source="nvml", ids=("0",)),
               "a+b": GpuSource(source="nvml", ids=("1",)), "c": GpuSource(source="nvml", ids=("1",))}
    named = labels(pools(sources))
    assert named == {("a", "b+c"): "a+b+c", ("a+b", "c"): '"a+b"+"c"'}


def test_the_same_gpu_ids_on_two_dcgm_hosts_are_two_pools():
    """GPU 0 of gpu-node-1 and GPU 0 of gpu-node-2 behind one exporter URL are different GPUs, not one pool."""
    url = "http://127.0.0.1:1/metrics"
    sources = {"a": GpuSource(source="dcgm", url=url, hostname="gpu-node-1", ids=("0",)),
               "b": GpuSource(source="dcgm", url=url, hostname="gpu-node-2", ids=("0",))}
    assert labels(pools(sources)) == {("a",): "a", ("b",): "b"}
    assert sharing_problem(sources) is None


def test_a_policy_whose_models_share_only_some_gpus_is_refused_with_the_models_named():
    """Partly overlapping GPU lists (or all GPUs against some) cannot be measured once each: a policy error."""
    text = """version: 1
models:
  a: {endpoint: "http://127.0.0.1:1/v1", gpus: {source: nvml, ids: [0, 1]}}
  b: {endpoint: "http://127.0.0.1:1/v1", gpus: {source: nvml, ids: [1]}}
routes:
  - name: r
    candidates: [a, b]
"""
    with pytest.raises(PolicyError, match=r"models 'a' and 'b' share some of their GPUs \(ids 0, 1 and ids 1\)"):
        parse_policy(text)
    assert "every GPU" in sharing_problem({"a": GpuSource(source="nvml"), "b": GpuSource(source="nvml", ids=("3",))})
    assert "different idle_w" in sharing_problem({"a": GpuSource(source="nvml", idle_w=50.0),
                                                  "b": GpuSource(source="nvml", idle_w=60.0)})


async def test_a_gpu_shared_by_two_models_is_measured_once_and_split_between_their_requests():
    """GPU 0 draws 500 W for 1 s with 100 W idle: 500 J measured once, the 400 J above idle split by tokens."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with(shared_gpu0()), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    on_base, on_lora = monitor.request_started("base"), monitor.request_started("base-lora")
    nvml.gpus[0].set_power(500.0)
    clock.advance(1.0)
    monitor.progress(on_base, 300)
    monitor.progress(on_lora, 100)
    await monitor.sample_once()
    assert await monitor.request_finished(on_base) == pytest.approx(300.0)
    assert await monitor.request_finished(on_lora) == pytest.approx(100.0)
    assert monitor.models() == ["base+base-lora"]
    assert monitor.totals("base") is monitor.totals("base-lora")
    assert monitor.totals("base").measured_j == pytest.approx(500.0)
    assert monitor.health == {"base": "ok", "base-lora": "ok"}
    await monitor.stop()


async def test_hw_energy_of_a_gpu_named_twice_is_one_series_equal_to_its_counter():
    """A GPU named by index and by UUID is exported once: hw.energy is its counter, not twice it."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    uuid = nvml.gpus[0].uuid
    monitor = EnergyMonitor(policy_with({"a": GpuSource(source="nvml", ids=("0",)),
                                         "b": GpuSource(source="nvml", ids=(uuid,))}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    reader = InMemoryMetricReader()
    observe_gpus(MeterProvider(metric_readers=[reader]).get_meter("test"), monitor)
    data = reader.get_metrics_data()
    await monitor.stop()
    [energy] = [point for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "hw.energy" for point in m.data.data_points]
    assert energy.value == pytest.approx(nvml.gpus[0].energy_mj() / 1000.0)


# -- counters that cannot be booked as they come ---------------------------------------


async def test_one_stale_gpu_holds_the_pool_back_so_no_time_is_booked_twice(exporter, session):
    """GPU 0's counter is refreshed a sample late: the two GPUs are booked together over the 2 s, idle 400 J."""
    exporter.texts = [FIXTURE, with_more_energy(FIXTURE, {"0": 0, "1": 400_000}),
                      with_more_energy(FIXTURE, {"0": 800_000, "1": 800_000})]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0", "1"), url=exporter.url, idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    request = monitor.request_started("big")
    for _ in range(2):
        clock.advance(1.0)
        await monitor.sample_once()
    totals = monitor.totals("big")
    joules = await monitor.request_finished(request)
    await monitor.stop()
    assert (totals.measured_j, totals.idle_j, joules) == (pytest.approx(1600.0), pytest.approx(400.0),
                                                           pytest.approx(1200.0))
    assert totals.active_s + totals.idle_s == pytest.approx(2.0)


async def test_another_gpu_behind_the_same_label_starts_afresh(exporter, session):
    """The next scrape's gpu="0" has another UUID (another node behind one URL, or a renumbering exporter):
    its counter minus the last GPU's is not energy, so nothing is booked until it is read twice."""
    moved = with_more_energy(FIXTURE, {"0": 50_000_000, "1": 0}).replace(GPU0_UUID, "GPU-aaaaaaaa-0000-0000-0000-000000000000")
    exporter.texts = [FIXTURE, moved]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.totals("big").measured_j == 0.0
    await monitor.stop()


async def test_a_request_is_settled_only_once_the_energy_up_to_its_end_is_booked(exporter, session):
    """A stale sample after the request ended books nothing; the request waits for the next fresh one and gets
    its share, instead of 0 J and its energy booked as idle."""
    exporter.texts = [FIXTURE, FIXTURE, with_more_energy(FIXTURE, {"0": 400_000, "1": 400_000})]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0", "1"), url=exporter.url, idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    monitor._task = asyncio.create_task(asyncio.sleep(3600))    # stands in for start(): samples are driven here
    await monitor.sample_once()
    request = monitor.request_started("big")
    clock.advance(0.5)
    monitor.progress(request, 50)
    monitor.request_ended(request)
    finished = asyncio.create_task(monitor.request_finished(request))
    await asyncio.sleep(0)
    await monitor.sample_once()                                 # stale: the counters have not moved
    await asyncio.sleep(0)
    assert not finished.done()
    clock.advance(0.5)
    await monitor.sample_once()                                 # fresh: 800 J over the second, 200 J idle
    joules = await finished
    monitor._task.cancel()
    await monitor.stop()
    assert joules == pytest.approx(600.0)


# -- through the gateway -------------------------------------------------------------


RELOAD_ROUTES = """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
energy: {{sample_interval_s: 0.05}}
ledger: {{path: "LEDGER"}}
"""


def reload_policy(port: int, ledger, ids: str | None) -> str:
    gpus = None if ids is None else (
        '{{source: dcgm, url: "http://127.0.0.1:PORT/metrics", hostname: gpu-node-1, ids: [' + ids + '], idle_w: 100}}')
    text = models(model("small", upstream_model=None, size_b=1, latency_prior=latency(5, 20), gpus=gpus)) + RELOAD_ROUTES
    return text.replace("PORT", str(port)).replace("LEDGER", str(ledger))


def ledger_energy(harness: Harness, ledger, request_id: str | None = None, count: int = 1) -> list:
    harness.call(harness.services.background.drain(10))
    deadline = time.monotonic() + 5
    found: list = []
    while len(found) < count and time.monotonic() < deadline:
        lines = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()] if ledger.exists() else []
        found = [r["energy_j"] for r in lines if r.get("type") != "outcome"
                 and (request_id is None or r.get("request_id") == request_id)]
        time.sleep(0.05)
    return found


def wait_for(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_a_reload_moves_sampling_to_the_gpus_the_new_policy_names(tmp_path):
    """gpus: added by a reload are measured (requests get joules); moved to other GPUs, those are sampled."""
    exporter = LiveExporter().start()
    ledger = tmp_path / "ledger.jsonl"
    harness = Harness(reload_policy(exporter.port, ledger, None), sims={"small": dict(ttft_ms=5, tpot_ms=20)},
                      environ=dict(os.environ)).start()
    try:
        harness.write_policy(reload_policy(exporter.port, ledger, '"0"'))
        assert harness.holder.reload() is True
        energy = harness.services.energy
        assert wait_for(lambda: {r.gpu_id for r in energy.snapshot()} == {"0"})
        list(harness.openai().chat.completions.create(model="auto", stream=True, max_tokens=10,
                                                      messages=[{"role": "user", "content": "hi"}]))
        [joules] = ledger_energy(harness, ledger)
        assert joules is not None and joules > 0
        harness.write_policy(reload_policy(exporter.port, ledger, '"1"'))
        assert harness.holder.reload() is True
        assert wait_for(lambda: {r.gpu_id for r in energy.snapshot()} == {"1"})
    finally:
        harness.stop()


def test_requests_sharing_a_callers_request_id_each_get_their_energy(tmp_path):
    """Two concurrent streams with the same x-request-id are two entries in the energy books, not one."""
    exporter = LiveExporter().start()
    ledger = tmp_path / "ledger.jsonl"
    harness = Harness(POLICY.replace("PORT", str(exporter.port)).replace("LEDGER", str(ledger)),
                      sims={"small": dict(ttft_ms=5, tpot_ms=20)}, environ=dict(os.environ)).start()
    try:
        client = harness.openai()

        def stream(max_tokens: int) -> None:
            list(client.chat.completions.create(model="auto", stream=True, max_tokens=max_tokens,
                                                messages=[{"role": "user", "content": "x"}],
                                                extra_headers={"x-request-id": "batch-7"}))

        threads = [threading.Thread(target=stream, args=(n,)) for n in (20, 40)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(10)
        joules = ledger_energy(harness, ledger, "batch-7", count=2)
        assert len(joules) == 2 and all(j > 0 for j in joules), joules
    finally:
        harness.stop()


def test_a_nan_field_from_the_dcgm_exporter_is_read_as_absent():
    """NaN (a field the GPU cannot read) never reaches the books: the counter is absent, power is kept."""
    nan_line = next(line for line in FIXTURE.splitlines() if line.startswith("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{"))
    text = FIXTURE.replace(nan_line, nan_line.rsplit(" ", 1)[0] + " NaN")
    gpu0 = parse_exporter_text(text, "gpu-node-1")["0"]
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" not in gpu0 and gpu0["DCGM_FI_DEV_POWER_USAGE"] == 412.345


async def test_gpus_missing_at_start_are_opened_once_they_appear(caplog):
    """NVML that failed to start (a driver still loading) is tried again every REOPEN_S, quietly; once it
    answers, the model is measured and that is logged once."""
    caplog.set_level(logging.INFO, logger="gateway.energy")
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    nvml.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=50.0)}), nvml_module=nvml,
                            clock=clock)
    await monitor.open()
    assert monitor.health == {"big": "unavailable"} and monitor.request_started("big") is None
    clock.advance(REOPEN_S / 2)
    await monitor.sample_once()
    assert monitor.health == {"big": "unavailable"}
    nvml.init_error = None
    clock.advance(REOPEN_S / 2)
    await monitor.sample_once()
    assert monitor.health == {"big": "ok"} and monitor.request_started("big") is not None
    clock.advance(1.0)
    await monitor.sample_once()
    assert monitor.totals("big").measured_j == pytest.approx(200.0)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if m.startswith("no GPU")]) == 1
    assert len([m for m in said if "measured now" in m]) == 1
    await monitor.stop()


async def test_nvml_gpus_that_keep_failing_are_opened_afresh():
    """A lost GPU is read again through fresh NVML handles after REOPEN_S (a reset GPU gets new handles); they read
    the same counters, so the energy of the GPU that kept answering is booked across the reopening, not dropped."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=50.0)}), nvml_module=nvml,
                            clock=clock)
    await monitor.open()
    nvml.gpus[1].lost = True
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    inits = nvml.calls.count("nvmlInit")
    nvml.gpus[1].lost = False
    clock.advance(REOPEN_S)
    await monitor.sample_once()
    assert nvml.calls.count("nvmlInit") == inits + 1 and nvml.init_count == 1
    assert monitor.health == {"big": "ok"}
    assert monitor.totals("big").measured_j == pytest.approx(100.0 * REOPEN_S)
    await monitor.stop()


async def test_a_model_named_like_a_pools_label_is_a_pool_of_its_own():
    """Models a and b on GPU 0 and a model named "a+b" on GPU 1: three models measured, two labels, two books."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    nvml.gpus[1].set_power(300.0)
    monitor = EnergyMonitor(policy_with({"a": GpuSource(source="nvml", ids=("0",)),
                                         "b": GpuSource(source="nvml", ids=("0",)),
                                         "a+b": GpuSource(source="nvml", ids=("1",))}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    clock.advance(1.0)
    await monitor.sample_once()
    assert all(monitor.measures(model) for model in ("a", "b", "a+b"))
    await monitor.stop()
    assert monitor.models() == ['"a"+"b"', "a+b"]
    assert monitor.totals("a").measured_j == monitor.totals('"a"+"b"').measured_j == pytest.approx(100.0)
    assert monitor.totals("a+b").measured_j == pytest.approx(300.0)


async def test_a_model_with_no_energy_booked_yet_is_exported_at_zero_not_left_out():
    """Before its GPUs' first interval a model's measured and idle energy are 0 J, a value: its series is there at
    0 (left out, a dashboard reads it as no data and a rate over the first interval is lost)."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"a": GpuSource(source="nvml", ids=("0",))}), nvml_module=nvml, clock=clock)
    await monitor.open()
    reader = InMemoryMetricReader()
    observe_gpus(MeterProvider(metric_readers=[reader]).get_meter("test"), monitor)
    data = reader.get_metrics_data()
    await monitor.stop()
    values = {(m.name, point.attributes.get("gateway.model.selected")): point.value for rm in data.resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics for point in m.data.data_points}
    assert values[("gateway.energy.measured", "a")] == 0
    assert values[("gateway.energy.idle", "a")] == 0
