"""Audit of GPU energy books: what a finance dashboard would read wrong (each test fails on the code it found)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import urllib.request

import pytest

from gateway.energy import EnergyMonitor
from gateway.energy.dcgm import DcgmSource
from gateway.policy.model import GpuSource
from tests import test_energy_sources
from tests.support.fake_pynvml import ManualClock, two_gpus
from tests.support.harness import Harness
from tests.support.policies import latency, model, models
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, chunk, http_head, sse
from tests.test_e2e_energy import LiveExporter
from tests.test_energy_sources import FIXTURE, policy_with, with_more_energy

#: the shared fixtures: a DCGM exporter stand-in and one aiohttp session
exporter, session = test_energy_sources.exporter, test_energy_sources.session


def without_gpu(text: str, gpu: str) -> str:
    """The exporter text without any series of GPU `gpu` (it fell off the bus: the exporter no longer lists it)."""
    return "\n".join(line for line in text.splitlines() if f'gpu="{gpu}"' not in line) + "\n"


def driven(monitor: EnergyMonitor) -> None:
    """Stand in for start(): samples are driven by the test, requests wait for their books."""
    monitor._task = asyncio.create_task(asyncio.sleep(3600))


@contextlib.asynccontextmanager
async def sampling(monitor: EnergyMonitor):
    """The monitor opened and driven by the test's `sample_once` calls; stopped after."""
    await monitor.open()
    driven(monitor)
    try:
        yield monitor
    finally:
        monitor._task.cancel()
        await monitor.stop()


async def test_a_gpu_gone_from_an_every_gpu_dcgm_pool_leaves_its_requests_without_joules(exporter, session):
    """A pool naming every GPU of an exporter (no ids) whose GPU 1 drops out of the scrape is failing, and a
    request running then has no joules, not GPU 0's alone as if they were the whole."""
    texts = [FIXTURE, with_more_energy(FIXTURE, {"0": 100_000, "1": 100_000}),
             without_gpu(with_more_energy(FIXTURE, {"0": 200_000, "1": 200_000}), "1")]
    exporter.texts = list(texts)
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", url=exporter.url, hostname="gpu-node-1", idle_w=0.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    async with sampling(monitor):
        await monitor.sample_once()
        request = monitor.request_started("big")
        clock.advance(1.0)
        await monitor.sample_once()         # both GPUs: 200 J booked
        clock.advance(1.0)
        monitor.request_ended(request)
        await monitor.sample_once()         # GPU 1 gone
        joules = await asyncio.wait_for(monitor.request_finished(request), 5)
        assert monitor.health == {"big": "failing"}, monitor.reasons
        assert joules is None


async def test_a_gpu_back_in_an_every_gpu_dcgm_pool_does_not_book_its_absence(exporter, session):
    """When a GPU that dropped out of the exporter's text for a while is listed again, what it used meanwhile is
    not booked (nor given to the requests in flight on its return)."""
    texts = [FIXTURE, without_gpu(with_more_energy(FIXTURE, {"0": 100_000, "1": 0}), "1"),
             with_more_energy(FIXTURE, {"0": 200_000, "1": 10_000_000})]
    exporter.texts = list(texts)
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", url=exporter.url, hostname="gpu-node-1", idle_w=0.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    await monitor.open()
    try:
        await monitor.sample_once()
        clock.advance(1.0)
        await monitor.sample_once()         # GPU 1 missing: GPU 0's 100 J
        clock.advance(1.0)
        await monitor.sample_once()         # GPU 1 back, 10,000 J on from its last reading two samples ago
        assert monitor.totals("big").measured_j < 1000.0, monitor.totals("big")
    finally:
        await monitor.stop()


def on_host(text: str, host: str, uuid_prefix: str) -> str:
    """The exporter text as another host's exporter would write it: its Hostname and its GPUs' UUIDs."""
    return text.replace('Hostname="gpu-node-1"', f'Hostname="{host}"').replace('UUID="GPU-', f'UUID="GPU-{uuid_prefix}')


async def test_a_gpu_named_by_uuid_is_found_on_any_host_of_the_exporters_text(exporter, session):
    """Text holding the GPUs of two hosts (a federating endpoint): a GPU named by its UUID, with no hostname,
    is the GPU with that UUID, whichever host lists it, not "not in the output"."""
    second = on_host(FIXTURE, "gpu-node-2", "b")
    exporter.texts = [FIXTURE + "\n".join(l for l in second.splitlines() if not l.startswith("#")) + "\n"]
    uuid = "GPU-b5fd4f087-86f3-7a43-b711-4771313afc50"
    [reading] = await DcgmSource(exporter.url, (uuid,), None, session).read()
    assert not reading.failed, reading.error
    assert (reading.uuid, reading.host) == (uuid, "gpu-node-2")


async def test_gpu_0_of_two_hosts_is_not_read_as_one_gpu_made_of_both(exporter, session):
    """With two hosts in the text and no hostname, GPU 0's reading is never one host's energy counter under
    another's UUID: a GPU whose energy counter is blank on the first host is not given the second host's."""
    first = re.sub(r'^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{gpu="0".*\}) \d+$', r"\g<1> 9223372036854775794",
                   FIXTURE, flags=re.M)
    second = on_host(with_more_energy(FIXTURE, {"0": 7_000_000_000, "1": 0}), "gpu-node-2", "b")
    exporter.texts = [first + "\n".join(l for l in second.splitlines() if not l.startswith("#")) + "\n"]
    readings = await DcgmSource(exporter.url, ("0",), None, session).read()
    mixed = [r for r in readings if not r.failed and r.uuid == "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
             and r.energy_mj == 4817294001 + 7_000_000_000]
    assert not mixed, readings


def gpu_field(text: str, field: str, gpu: str, value: object) -> str:
    """The exporter text with GPU `gpu`'s `field` replaced by `value`."""
    return re.sub(rf'^({field}\{{gpu="{gpu}".*\}}) \S+$', rf"\g<1> {value}", text, flags=re.M)


async def test_a_counter_that_went_back_with_no_power_to_book_it_by_leaves_the_request_without_joules(
        exporter, session):
    """GPU 1's counter goes back (its GPU was reset) while its power is blank: its interval cannot be measured, so
    a request running on both GPUs then has no joules, rather than GPU 0's alone reported as the whole."""
    base = gpu_field(FIXTURE, "DCGM_FI_DEV_POWER_USAGE", "1", 140737488355328)   # DCGM_FP64_BLANK
    reset = gpu_field(with_more_energy(base, {"0": 200_000, "1": 0}), "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "1",
                      1000)
    exporter.texts = [base, with_more_energy(base, {"0": 100_000, "1": 100_000}), reset,
                      with_more_energy(reset, {"0": 100_000, "1": 100_000})]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0", "1"), url=exporter.url, hostname="gpu-node-1", idle_w=0.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}), session=session, clock=clock)
    async with sampling(monitor):
        await monitor.sample_once()
        clock.advance(1.0)
        await monitor.sample_once()
        request = monitor.request_started("big")
        clock.advance(1.0)
        await monitor.sample_once()         # GPU 1's counter went back, and no power to book it by
        monitor.request_ended(request)
        clock.advance(1.0)
        await monitor.sample_once()
        joules = await asyncio.wait_for(monitor.request_finished(request), 5)
        assert joules is None, joules


async def test_a_request_before_the_idle_power_is_learned_has_no_joules_not_0_j():
    """With no idle_w, a request served in the first second after start (no 1 s of power seen yet, so all of it is
    booked idle) has no joules: 0 J on GPUs drawing 300 W is not a measurement, and would be priced and taught to
    the router as one."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=300.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", ids=("0",))}), nvml_module=nvml, clock=clock)
    async with sampling(monitor):
        await monitor.sample_once()
        request = monitor.request_started("big")
        clock.advance(0.25)
        await monitor.sample_once()
        monitor.request_ended(request)
        clock.advance(0.25)
        await monitor.sample_once()
        joules = await asyncio.wait_for(monitor.request_finished(request), 5)
        assert joules is None, joules


async def test_a_request_that_ended_during_a_stale_counter_leaves_its_share_to_nobody_else(exporter, session):
    """While GPU 0's counter is not refreshed (exporter `-c` above the settle time), request A runs 1 s and gives
    up waiting for its books (no joules). When the counter moves, A's second is not handed to B, which ran 0.1 s
    at the end: B gets its own time's share, about 0.1 / 1.1 of the active energy, not all of it."""
    stale = FIXTURE
    moved = with_more_energy(FIXTURE, {"0": 1_100_000, "1": 1_100_000})      # 1,100 J over the 1.1 s gap
    exporter.texts = [stale]
    clock = ManualClock()
    gpus = GpuSource(source="dcgm", ids=("0",), url=exporter.url, hostname="gpu-node-1", idle_w=0.0)
    monitor = EnergyMonitor(policy_with({"big": gpus}, interval_s=0.01), session=session, clock=clock)
    async with sampling(monitor):
        await monitor.sample_once()
        a = monitor.request_started("big")
        clock.advance(1.0)
        monitor.request_ended(a)
        await monitor.sample_once()                     # counter not refreshed: nothing booked
        assert await asyncio.wait_for(monitor.request_finished(a), 5) is None   # gave up after settle_timeout_s
        b = monitor.request_started("big")
        clock.advance(0.1)
        monitor.request_ended(b)
        exporter.texts = [moved]
        await monitor.sample_once()                     # the counter moves: 1.1 s booked at once
        joules = await asyncio.wait_for(monitor.request_finished(b), 5)
        assert joules is None or joules < 0.5 * 1100.0, joules       # (its share by time: 100 J)


# -- end to end: a gateway measuring a scripted model server's GPUs through a live DCGM exporter stand-in ----------

CHUNKS, CHUNK_GAP_S = 30, 0.02


def reasoning_chunk(text: str) -> bytes:
    """A chat chunk carrying reasoning, as vLLM streams a reasoning model's thinking (`reasoning_content`)."""
    delta = {"reasoning_content": text}
    return json.dumps({"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode()


def tool_call_chunk(arguments: str) -> bytes:
    """A chat chunk carrying a piece of a tool call's arguments."""
    call = {"index": 0, "function": {"arguments": arguments}}
    return json.dumps({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}).encode()


def answer_for(body: bytes) -> list[tuple[bytes, float]]:
    """A token per chunk, CHUNKS of them CHUNK_GAP_S apart: text, reasoning or tool-call arguments by what was
    asked; `fail` works for 0.4 s and answers 500."""
    asked = json.loads(body)["messages"][-1]["content"]
    if asked == "fail":
        error = b'{"error": {"message": "out of memory", "type": "server_error"}}'
        return [(http_head(500, {"Content-Type": "application/json"}, len(error)) + error, 0.4)]
    make = {"think": reasoning_chunk, "tool": tool_call_chunk}.get(asked, chunk)
    events = [(SSE_HEAD + sse(chunk("", role=True)), 0.0)]
    events += [(sse(make("w")), CHUNK_GAP_S) for _ in range(CHUNKS)]
    events += [(sse(chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    return events


E2E_POLICY = models(
    "  gpu:\n    endpoint: RAW\n    upstream_model: fake\n    size_b: 1\n"
    "    latency_prior: {{ttft_ms: 5, tpot_ms: 20}}\n    energy_usd_per_kwh: 0.30\n"
    "    timeouts: {{connect_s: 1, first_byte_s: 2, total_s: 10}}\n"
    '    gpus: {{source: dcgm, url: "http://127.0.0.1:PORT/metrics", hostname: gpu-node-1, ids: ["0", "1"], '
    "idle_w: 100}}\n",
    model("medium", size_b=8, latency_prior=latency(10, 2))) + """
routes:
  - name: chat
    match: {{models: ["gpu"]}}
    candidates: [gpu]
    fallback: [medium]
energy: {{sample_interval_s: 0.05}}
telemetry: {{prometheus: true}}
ledger: {{path: "LEDGER"}}
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A gateway whose model `gpu` (a scripted server on two DCGM-measured GPUs at 400 W) falls back to
    `medium` (simulated, no GPUs measured); its ledger's path is `ledger_path`."""
    exporter = LiveExporter().start()
    raw = RawUpstream().start()
    raw.script_for = answer_for
    ledger = tmp_path_factory.mktemp("energy-audit") / "ledger.jsonl"
    policy = E2E_POLICY.replace("PORT", str(exporter.port)).replace("LEDGER", str(ledger)).replace("RAW", raw.url)
    harness = Harness(policy, sims={"medium": dict(ttft_ms=1, tpot_ms=1)}).start()
    harness.ledger_path = ledger
    yield harness
    harness.stop()
    raw.stop()


def ledger_of(harness: Harness, *request_ids: str) -> dict[str, dict]:
    """The ledger lines of `request_ids`, once all are written (5 s at most)."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 5
    while len(found) < len(request_ids) and time.monotonic() < deadline:
        harness.call(harness.services.background.drain(10))
        if harness.ledger_path.exists():
            found = {r["request_id"]: r for line in harness.ledger_path.read_text().splitlines() if line.strip()
                     for r in [json.loads(line)] if r.get("request_id") in request_ids}
        time.sleep(0.02)
    return found


@pytest.mark.parametrize("kind", ["think", "tool"])
def test_a_stream_of_reasoning_or_tool_calls_gets_its_share_beside_a_stream_of_text(measured, kind):
    """Two streams of the same length at the same pace on the same GPUs, one of text and one of reasoning (or of
    a tool call's arguments), get about the same joules: every chunk is a token the GPU made, whatever its field."""
    client = measured.openai()
    ids = {"text": f"pair-text-{kind}", kind: f"pair-{kind}"}

    def streamed(asked: str) -> None:
        list(client.chat.completions.create(model="gpu", stream=True, messages=[{"role": "user", "content": asked}],
                                            extra_headers={"x-request-id": ids[asked]}))

    threads = [threading.Thread(target=streamed, args=(asked,)) for asked in ("text", kind)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    lines = ledger_of(measured, *ids.values())
    joules = {asked: lines[request_id]["energy_j"] for asked, request_id in ids.items()}
    assert all(j is not None and j > 0 for j in joules.values()), joules
    assert 0.33 < joules[kind] / (joules[kind] + joules["text"]) < 0.67, joules


def test_the_joules_of_an_attempt_that_failed_are_exported_under_the_model_that_used_them(measured):
    """A request whose measured model worked 0.4 s and failed (500) before `medium` (no GPUs) answered it: its
    joules are the failed attempt's, and gateway.energy shows them under `gpu`, as gateway.cost shows each
    attempt's cost under its model, never under `medium`, whose GPUs are not measured at all."""
    measured.openai().chat.completions.create(model="gpu", messages=[{"role": "user", "content": "fail"}],
                                              extra_headers={"x-request-id": "fell-back"})
    line = ledger_of(measured, "fell-back")["fell-back"]
    assert line["model"] == "medium" and line["energy_j"] is not None and line["energy_j"] > 0, line
    body = urllib.request.urlopen(f"{measured.base_url}/metrics", timeout=5).read().decode()
    exported: dict[str, float] = {}
    for name, value in re.findall(r'^gateway_energy_joules_total\{[^}]*gateway_model_selected="([^"]+)"[^}]*\} (\S+)$',
                                  body, re.M):
        exported[name] = exported.get(name, 0.0) + float(value)
    assert "medium" not in exported and exported.get("gpu", 0.0) >= line["energy_j"], exported
