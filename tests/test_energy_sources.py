"""GPU sampling through a fake NVML and a real HTTP server serving DCGM exporter text."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import threading
import time
from pathlib import Path

import aiohttp
import pynvml
import pytest
from aiohttp import web

from gateway.energy import DcgmSource, EnergyMonitor, EnergyUnavailable, NvmlSource
from gateway.energy.command import format_table, main as gpu_command
from gateway.energy.readings import GpuReading
from gateway.policy.model import Energy, GpuSource, Model, Policy
from tests.support.fake_pynvml import FakeNvml, ManualClock, two_gpus

FIXTURE = (Path(__file__).parent / "fixtures" / "dcgm_metrics.txt").read_text()
GPU0_UUID = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"


def policy_with(gpus: dict[str, GpuSource], interval_s: float = 0.25) -> Policy:
    """A policy whose models are served by the given GPUs."""
    models = {name: Model(name=name, endpoint="http://127.0.0.1:1/v1", upstream_model=name, gpus=source)
              for name, source in gpus.items()}
    return Policy(version=1, models=models, routes=(), energy=Energy(sample_interval_s=interval_s))


def with_more_energy(text: str, extra_mj: dict[str, int]) -> str:
    """The exporter text with each GPU's energy counter advanced by `extra_mj[gpu]`."""
    def bump(match: re.Match) -> str:
        return f"{match[1]}{int(match[3]) + extra_mj[match[2]]}"
    return re.sub(r'^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{gpu="(\d+)".*\} )(\d+)$', bump, text, flags=re.M)


class Exporter:
    """A real HTTP server on 127.0.0.1 answering /metrics with scripted texts or statuses."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status, text="exporter broken")
        text = self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def start(self) -> Exporter:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/metrics"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def exporter():
    """A DCGM exporter stand-in serving the fixture text."""
    server = await Exporter().start()
    server.texts = [FIXTURE]
    yield server
    await server.stop()


@pytest.fixture
async def session():
    """One aiohttp client session, as the gateway shares it."""
    async with aiohttp.ClientSession() as client:
        yield client


# -- NVML ------------------------------------------------------------------------


def test_nvml_reads_counter_power_utilization_and_memory_in_gateway_units():
    """NVML's mJ, mW, percent and bytes become a reading in mJ, W, fractions and bytes."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=250.0)
    nvml.gpus[1].utilization_pct = 42
    source = NvmlSource(("1",), nvml, clock=clock)
    source.open()
    [reading] = source.read()
    assert (reading.gpu_id, reading.uuid, reading.name) == ("1", nvml.gpus[1].uuid, "NVIDIA H100 80GB HBM3")
    assert reading.energy_mj == nvml.gpus[1].energy_mj()
    assert (reading.power_w, reading.utilization) == (250.0, 0.42)
    assert reading.memory_utilization == pytest.approx(0.5 / 80)
    assert reading.hw_attributes()["hw.type"] == "gpu"
    assert reading.hw_values()["hw.power"] == 250.0
    source.close()
    assert nvml.init_count == 0


def test_nvml_finds_a_gpu_by_uuid_and_rejects_one_that_is_not_there():
    """GPUs are named by index or UUID; a missing one makes the source unavailable and releases NVML."""
    clock = ManualClock()
    nvml = two_gpus(clock)
    by_uuid = NvmlSource((nvml.gpus[0].uuid,), nvml, clock=clock)
    by_uuid.open()
    assert by_uuid.read()[0].uuid == nvml.gpus[0].uuid
    by_uuid.close()
    with pytest.raises(EnergyUnavailable, match="no GPU '5'"):
        NvmlSource(("5",), nvml, clock=clock).open()
    assert nvml.init_count == 0


def test_nvml_without_library_raises_energy_unavailable_from_the_nvml_error():
    """nvmlInit failing with LIBRARY_NOT_FOUND is translated, keeping the NVML error as the cause."""
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(EnergyUnavailable, match="NVML Shared Library Not Found") as caught:
        NvmlSource((), nvml).open()
    assert isinstance(caught.value.__cause__, pynvml.NVMLError_LibraryNotFound)


def test_nvml_refuses_an_index_one_past_the_last_gpu_naming_how_many_it_sees():
    """On a host of two GPUs, GPU "2" is refused as missing (saying NVML sees 2), and NVML is released."""
    clock = ManualClock()
    nvml = two_gpus(clock)
    with pytest.raises(EnergyUnavailable, match=r"no GPU '2' on this host \(NVML sees 2\)"):
        NvmlSource(("2",), nvml, clock=clock).open()
    assert nvml.init_count == 0


def test_nvml_that_sees_no_gpu_is_unavailable():
    """A driver that loads but lists no device leaves nothing to measure: EnergyUnavailable, NVML released."""
    nvml = FakeNvml()
    with pytest.raises(EnergyUnavailable, match="no GPU: NVML sees no device"):
        NvmlSource((), nvml).open()
    assert nvml.init_count == 0


def test_a_gpus_product_name_is_its_hw_model():
    """A reading's `hw.*` attributes carry the GPU's product name as `hw.model`, beside its id and type."""
    clock = ManualClock()
    source = NvmlSource(("0",), two_gpus(clock), clock=clock)
    source.open()
    [reading] = source.read()
    source.close()
    assert reading.hw_attributes()["hw.model"] == "NVIDIA H100 80GB HBM3"


def test_closing_a_source_twice_leaves_another_sources_nvml_open():
    """NVML counts initialisations: a source closed twice shuts down only its own, so another one still reads."""
    clock = ManualClock()
    nvml = two_gpus(clock)
    first, second = NvmlSource(("0",), nvml, clock=clock), NvmlSource(("1",), nvml, clock=clock)
    first.open()
    second.open()
    first.close()
    first.close()
    [reading] = second.read()
    assert not reading.failed and nvml.init_count == 1
    second.close()
    assert nvml.init_count == 0


async def test_monitor_splits_counter_energy_three_to_one_by_tokens():
    """Energy-counter deltas above idle go 3:1 to two requests that processed 300 and 100 tokens."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=100.0)}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    a, b = monitor.request_started("big"), monitor.request_started("big")
    for gpu in nvml.gpus:
        gpu.set_power(400.0)
    clock.advance(1.0)
    monitor.progress(a, 300)
    monitor.progress(b, 100)
    await monitor.sample_once()
    assert await monitor.request_finished(a) == pytest.approx(450.0)
    assert await monitor.request_finished(b) == pytest.approx(150.0)
    totals = monitor.totals("big")
    assert (totals.measured_j, totals.idle_j) == (pytest.approx(800.0), pytest.approx(200.0))
    await monitor.stop()


async def test_power_only_fallback_when_the_energy_counter_is_not_supported():
    """With the counter NOT_SUPPORTED the energy is mean power times dt, and the counter is not asked again."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=200.0)
    for gpu in nvml.gpus:
        gpu.energy_supported = False
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=0.0)}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    clock.advance(0.5)
    for gpu in nvml.gpus:
        gpu.set_power(300.0)
    await monitor.sample_once()
    assert all(r.energy_mj is None and r.power_w == 300.0 for r in monitor.snapshot())
    assert monitor.totals("big").measured_j == pytest.approx(2 * 250.0 * 0.5)
    assert nvml.calls.count("nvmlDeviceGetTotalEnergyConsumption") == 2
    await monitor.stop()


async def test_a_lost_gpu_is_failing_while_the_other_gpu_is_still_measured(caplog):
    """GPU_IS_LOST on one GPU marks the model failing once; the other GPU's energy is still booked."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=0.0)}), nvml_module=nvml, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    nvml.gpus[1].lost = True
    for _ in range(2):
        clock.advance(1.0)
        await monitor.sample_once()
    assert monitor.health == {"big": "failing"}
    lost = [r for r in monitor.snapshot() if r.failed]
    assert [(r.gpu_id, r.error) for r in lost] == [("1", "NVML: GPU is lost")]
    assert monitor.totals("big").measured_j == pytest.approx(2 * 100.0)
    assert len([r for r in caplog.records if "failing" in r.getMessage()]) == 1
    await monitor.stop()


async def test_no_nvml_library_leaves_the_monitor_running_unavailable_with_one_log(caplog):
    """Without the NVML library the monitor starts, says so once for all models, and requests get None."""
    caplog.set_level(logging.WARNING, logger="gateway.energy")
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    policy = policy_with({"a": GpuSource(source="nvml", ids=("0",)), "b": GpuSource(source="nvml", ids=("1",))})
    monitor = EnergyMonitor(policy, nvml_module=nvml)
    await monitor.start()
    await monitor.sample_once()
    assert monitor.request_started("a") is None
    assert monitor.health == {"a": "unavailable", "b": "unavailable"}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("no GPU: energy not measured for models a, b")
    await monitor.stop()


async def test_sampling_loop_runs_every_interval_off_the_event_loop_thread():
    """At a 0.01 s interval the loop books energy, NVML runs in a worker thread, stop releases NVML, start again works."""
    nvml = two_gpus(clock=time.monotonic, power_w=300.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", idle_w=50.0)}, interval_s=0.01),
                            nvml_module=nvml)
    await monitor.start()
    await asyncio.sleep(0.05)           # the first readings are in: a request before them would not be whole
    request = monitor.request_started("big")
    for tokens in range(1, 11):
        monitor.progress(request, tokens * 10)
        await asyncio.sleep(0.01)
    joules = await monitor.request_finished(request)
    await monitor.stop()
    totals = monitor.totals("big")
    assert joules is not None and joules > 0
    assert math.isclose(totals.attributed_j + totals.idle_j, totals.measured_j)
    assert threading.get_ident() not in nvml.call_threads
    assert nvml.init_count == 0
    await monitor.start()
    await asyncio.sleep(0.03)
    assert monitor.health == {"big": "ok"} and nvml.init_count == 1
    await monitor.stop()
    assert nvml.init_count == 0


# -- DCGM ------------------------------------------------------------------------


async def test_dcgm_exporter_text_drives_the_same_attribution(exporter, session):
    """Two scrapes with growing counters give 800 J, 200 J idle and a 3:1 split of the rest."""
    exporter.texts = [FIXTURE, with_more_energy(FIXTURE, {"0": 300_000, "1": 500_000})]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0", "1"), url=exporter.url, hostname="gpu-node-1", idle_w=100.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    await monitor.sample_once()
    a, b = monitor.request_started("big"), monitor.request_started("big")
    clock.advance(1.0)
    monitor.progress(a, 300)
    monitor.progress(b, 100)
    await monitor.sample_once()
    assert await monitor.request_finished(a) == pytest.approx(450.0)
    assert await monitor.request_finished(b) == pytest.approx(150.0)
    gpu0 = monitor.snapshot()[0]
    assert (gpu0.uuid, gpu0.name, gpu0.host) == (GPU0_UUID, "NVIDIA H100 80GB HBM3", "gpu-node-1")
    assert (gpu0.power_w, gpu0.utilization) == (412.345, 0.87)
    assert (gpu0.memory_used_bytes, gpu0.memory_total_bytes) == (73403 * 2**20, 81559 * 2**20)
    assert monitor.health == {"big": "ok"}
    await monitor.stop()


async def test_dcgm_waits_out_a_counter_the_exporter_has_not_refreshed(exporter, session):
    """An unchanged counter at full power is not booked as zero; the next change covers both intervals."""
    exporter.texts = [FIXTURE, FIXTURE, with_more_energy(FIXTURE, {"0": 800_000, "1": 800_000})]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0", "1"), url=exporter.url, idle_w=0.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    for _ in range(2):
        await monitor.sample_once()
        clock.advance(1.0)
    assert monitor.totals("big").idle_s == 0.0
    await monitor.sample_once()
    totals = monitor.totals("big")
    assert (totals.measured_j, totals.idle_s) == (pytest.approx(1600.0), 2.0)
    await monitor.stop()


async def test_dcgm_matches_gpus_by_hostname_and_uuid(exporter, session):
    """GPUs are picked by `gpu` or `UUID` label on the right `Hostname`; another host's GPU is a failed reading."""
    [by_uuid] = await DcgmSource(exporter.url, (GPU0_UUID,), "gpu-node-1", session).read()
    assert (by_uuid.failed, by_uuid.energy_mj) == (False, 4817294001)
    [elsewhere] = await DcgmSource(exporter.url, ("0",), "gpu-node-2", session).read()
    assert elsewhere.failed and "not in the DCGM exporter output" in elsewhere.error
    every = await DcgmSource(exporter.url, (), None, session).read()
    assert [r.gpu_id for r in every] == ["0", "1"]


async def test_dcgm_scrape_failures_mark_the_model_failing_without_raising(exporter, session):
    """An exporter answering 500, or not listening at all, gives failing health and no exception."""
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session)
    await monitor.open()
    exporter.status = 500
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"} and "500" in monitor.reasons["big"]
    exporter.status = 200
    await monitor.sample_once()
    assert monitor.health == {"big": "ok"}
    await exporter.stop()
    await monitor.sample_once()
    assert monitor.health == {"big": "failing"} and "scrape" in monitor.reasons["big"]
    await monitor.stop()


async def test_an_exporter_answering_404_is_a_failed_scrape_naming_the_status(exporter, session):
    """A wrong path on the exporter (404 with a text body) is reported as the failed scrape it is, with its status."""
    exporter.status = 404
    [reading] = await DcgmSource(exporter.url, ("0",), None, session).read()
    assert reading.failed and "DCGM scrape of" in reading.error and "404" in reading.error


async def test_a_failed_scrape_reports_each_gpu_last_seen_when_none_were_named(exporter, session):
    """Reading every GPU of an exporter: once it fails, each GPU it last listed is a failed reading, by its id."""
    source = DcgmSource(exporter.url, (), None, session)
    assert [r.gpu_id for r in await source.read()] == ["0", "1"]
    exporter.status = 500
    failed = await source.read()
    assert [r.gpu_id for r in failed] == ["0", "1"] and all("500" in r.error for r in failed)


async def test_a_gpu_read_from_any_host_is_labelled_with_the_exporters_hostname(exporter, session):
    """With no hostname configured, a reading still says which host its GPU is on: the exporter's `Hostname`."""
    [reading] = await DcgmSource(exporter.url, ("0",), None, session).read()
    assert (reading.failed, reading.host) == (False, "gpu-node-1")


async def test_unparseable_exporter_text_is_a_failed_reading(exporter, session):
    """A page that is not Prometheus text (a proxy's HTML error page) is reported, not raised."""
    exporter.texts = ["<html>bad gateway</html>\n"]
    [reading] = await DcgmSource(exporter.url, ("0",), None, session).read()
    assert reading.failed and "unparseable" in reading.error


# -- gateway gpu -----------------------------------------------------------------


def test_gpu_command_says_clearly_when_there_is_no_nvml(capsys):
    """`gateway gpu --once` without the NVML library says why on stderr and exits 1."""
    out = io.StringIO()
    code = gpu_command(["--once"], nvml_module=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), out=out)
    assert code == 1
    assert out.getvalue() == ""
    assert capsys.readouterr().err == "gateway gpu: no GPU can be measured: NVML not available: NVML Shared Library " \
                                      "Not Found\n"


def test_gpu_command_prints_a_table_of_this_hosts_gpus():
    """`gateway gpu --once` prints one row per GPU with power, utilization and memory."""
    nvml = two_gpus(ManualClock(), power_w=123.4)
    out = io.StringIO()
    assert gpu_command(["--once"], nvml_module=nvml, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["MODEL", "GPU", "NAME", "POWER_W", "ENERGY_J", "UTIL", "MEM_GiB", "STATUS"]
    assert len([line for line in lines if "NVIDIA H100 80GB HBM3" in line and "123.4" in line]) == 2


def test_gpu_command_once_exits_0_for_gpus_measured_by_power_alone():
    """GPUs without an energy counter are still measured (by their power): `gateway gpu --once` exits 0."""
    nvml = two_gpus(ManualClock(), power_w=123.4)
    for gpu in nvml.gpus:
        gpu.energy_supported = False
    out = io.StringIO()
    assert gpu_command(["--once"], nvml_module=nvml, out=out) == 0
    assert len([line for line in out.getvalue().splitlines() if "123.4" in line]) == 2


def test_gpu_table_explains_only_the_models_it_shows_no_gpu_for():
    """Below the table, a line says why for each model none of whose GPUs could be read, not for the others."""
    readings = [GpuReading(gpu_id="0", timestamp_s=1.0, power_w=300.0, model="small"),
                GpuReading(gpu_id="1", timestamp_s=1.0, error="NVML: GPU is lost", model="small")]
    table = format_table(readings, {"small": "GPU 1: NVML: GPU is lost", "large": "no DCGM exporter url"})
    assert "large: no DCGM exporter url" in table
    assert "small: GPU 1" not in table


def test_gpu_command_once_exits_1_when_no_gpu_could_be_read(tmp_path):
    """`gateway gpu --policy P --once` whose only DCGM exporter cannot be scraped prints why and exits 1."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
models:
  small:
    endpoint: http://127.0.0.1:1/v1
    gpus: {source: dcgm, url: "http://127.0.0.1:1/metrics", ids: ["0"]}
routes:
  - name: default
    candidates: [small]
""")
    out = io.StringIO()
    assert gpu_command(["--policy", str(policy), "--once"], out=out) == 1
    assert "DCGM scrape of http://127.0.0.1:1/metrics failed" in out.getvalue()


@pytest.mark.parametrize("interval", ["-1", "0", "nan", "inf", "soon"])
def test_gpu_command_refuses_an_interval_that_is_not_a_positive_number_of_seconds(interval, capsys):
    """`gateway gpu --interval` of 0, below 0 or not finite is a usage error: exit 2, naming the option."""
    with pytest.raises(SystemExit) as exit_:
        gpu_command(["--interval", interval, "--once"], nvml_module=two_gpus(ManualClock()), out=io.StringIO())
    assert exit_.value.code == 2
    assert "--interval" in capsys.readouterr().err
