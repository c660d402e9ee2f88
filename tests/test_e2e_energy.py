"""End to end: GPU energy measured from a DCGM exporter, attributed to requests, priced and exported."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web

from gateway.cost import energy_cost_usd, token_cost_usd
from gateway.context import Usage
from tests.support.fake_pynvml import real_nvml_works
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, price
from tests.support.redis_server import free_port
from tests.test_ledger import wait_for

FIXTURE = (Path(__file__).parent / "fixtures" / "dcgm_metrics.txt").read_text()
POWER_W = 400.0


class LiveExporter:
    """A DCGM exporter stand-in whose energy counters grow at POWER_W per GPU, in real time."""

    def __init__(self) -> None:
        self.started_s = time.monotonic()
        self.port = free_port()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def text(self) -> str:
        grown_mj = int(POWER_W * (time.monotonic() - self.started_s) * 1000)
        def bump(match: re.Match) -> str:
            return f"{match.group(1)} {int(match.group(2)) + grown_mj}"
        return re.sub(r"^(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{.*\}) (\d+)$", bump, FIXTURE, flags=re.M)

    def _serve(self) -> None:
        import asyncio

        async def metrics(_request):
            return web.Response(text=self.text())

        async def main():
            app = web.Application()
            app.router.add_get("/metrics", metrics)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            await asyncio.Event().wait()

        asyncio.run(main())

    def start(self) -> "LiveExporter":
        self.thread.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("exporter did not start")


#: the exporter's two GPUs, found by the DCGM hostname label, each drawing 100 W when idle
DCGM_GPUS = '{{source: dcgm, url: "http://127.0.0.1:PORT/metrics", hostname: gpu-node-1, ids: ["0", "1"], idle_w: 100}}'


def measured_model(**fields: object) -> str:
    """The one model, `small`, on the exporter's GPUs, with energy at 0.30 USD per kWh."""
    return model("small", upstream_model=None, size_b=1, **fields, energy_usd_per_kwh=0.30,
                 latency_prior=latency(5, 20), gpus=DCGM_GPUS)


POLICY = models(measured_model(price=price(0.10, 0.20))) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
energy: {{sample_interval_s: 0.05}}
telemetry: {{prometheus: true}}
ledger: {{path: "LEDGER"}}
"""


def measured_gateway(policy: str, ledger_dir: Path, **environ: str) -> Harness:
    """A started gateway on `policy` (its PORT the live exporter's, its LEDGER in `ledger_dir`), the simulated
    `small` behind it, `environ` added to its environment; its ledger's path is `ledger_path`."""
    exporter = LiveExporter().start()
    ledger = ledger_dir / "ledger.jsonl"
    harness = Harness(policy.replace("PORT", str(exporter.port)).replace("LEDGER", str(ledger)),
                      sims={"small": dict(ttft_ms=5, tpot_ms=20)}, environ={**os.environ, **environ}).start()
    harness.ledger_path = ledger
    return harness


@pytest.fixture(scope="module")
def energy_gw(tmp_path_factory):
    harness = measured_gateway(POLICY, tmp_path_factory.mktemp("energy"))
    yield harness
    harness.stop()


def ledger_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_requests_on_measured_gpus_get_joules_and_pay_for_them(energy_gw):
    """A streamed request on DCGM-measured GPUs gets attributed joules, and their price joins its cost."""
    client = energy_gw.openai()
    stream = client.chat.completions.create(model="auto", stream=True, max_tokens=20,
                                            messages=[{"role": "user", "content": "power"}])
    chunks = list(stream)
    assert chunks
    energy_gw.call(energy_gw.services.background.drain(10))
    deadline = time.monotonic() + 5
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = [r for r in ledger_lines(energy_gw.ledger_path) if r.get("type") != "outcome"]
        if records:
            break
        time.sleep(0.05)
    record = records[-1]
    assert record["energy_j"] is not None and record["energy_j"] > 0
    assert record["attempts"][-1]["energy_j"] == record["energy_j"]     # the one attempt's joules are the request's
    # two GPUs at 400 W with a 100 W idle each: at most 600 W of active power for this one request
    assert record["energy_j"] < 600 * record["latency_s"] * 3
    model = energy_gw.holder.current.policy.models["small"]
    usage = Usage(input_tokens=record["input_tokens"], output_tokens=record["output_tokens"])
    expected = token_cost_usd(model, usage) + energy_cost_usd(model, record["energy_j"])
    assert abs(Decimal(record["cost_usd"]) - expected) < Decimal("1e-12")


def test_the_cost_metric_adds_what_the_ledger_charged_energy_included(energy_gw):
    """gateway.cost adds each attempt's cost with its GPU energy priced in, as the ledger charges the request: a
    measured request's attempts add up to its cost, and the /metrics total is the sum of the ledger's costs."""
    client = energy_gw.openai()
    list(client.chat.completions.create(model="auto", stream=True, max_tokens=20, messages=[
        {"role": "user", "content": "meter"}], extra_headers={"x-request-id": "metered"}))
    energy_gw.call(energy_gw.services.background.drain(10))
    wait_for(lambda: any(r.get("request_id") == "metered" for r in ledger_lines(energy_gw.ledger_path)))
    records = [r for r in ledger_lines(energy_gw.ledger_path) if r.get("type") != "outcome"]
    (metered,) = [r for r in records if r["request_id"] == "metered"]
    assert metered["energy_j"] > 0
    assert sum(Decimal(attempt["cost_usd"]) for attempt in metered["attempts"]) == Decimal(metered["cost_usd"])
    body = urllib.request.urlopen(f"{energy_gw.base_url}/metrics", timeout=5).read().decode()
    exported = [float(value) for value in re.findall(r"^gateway_cost_USD_total\{[^}]*\} (\S+)$", body, re.M)]
    assert exported and sum(exported) == pytest.approx(float(sum(Decimal(r["cost_usd"]) for r in records)), rel=1e-9)


def test_a_non_streamed_request_beside_a_stream_gets_its_share(energy_gw):
    """A non-streamed answer shows no token progress until it ends; running beside a stream of the same
    length, it still gets about half of the active energy (on a real H100, with no such rule, 9 of 12
    non-streamed requests in a mixed load were booked no energy at all)."""
    client = energy_gw.openai()
    ask = dict(model="auto", max_tokens=40, messages=[{"role": "user", "content": "share"}])

    def streamed() -> None:
        list(client.chat.completions.create(**ask, stream=True, extra_headers={"x-request-id": "mixed-stream"}))

    thread = threading.Thread(target=streamed)
    thread.start()
    client.chat.completions.create(**ask, extra_headers={"x-request-id": "mixed-whole"})
    thread.join(10)
    energy_gw.call(energy_gw.services.background.drain(10))
    joules = {}
    deadline = time.monotonic() + 5
    while len(joules) < 2 and time.monotonic() < deadline:
        joules = {r["request_id"]: r["energy_j"] for r in ledger_lines(energy_gw.ledger_path)
                  if r.get("request_id") in ("mixed-stream", "mixed-whole")}
        time.sleep(0.05)
    assert joules["mixed-stream"] > 0 and joules["mixed-whole"] > 0
    assert 0.25 < joules["mixed-whole"] / (joules["mixed-whole"] + joules["mixed-stream"]) < 0.75, joules


def test_attributed_plus_idle_equals_measured(energy_gw):
    """Across all the traffic so far, the monitor's attributed and idle energy add up to what it measured."""
    totals = energy_gw.services.energy.totals("small")
    assert totals.measured_j > 0
    assert totals.attributed_j + totals.idle_j == pytest.approx(totals.measured_j, rel=1e-9)
    assert totals.idle_j > 0


def test_gpu_readings_are_exported_as_hw_metrics(energy_gw):
    """The Prometheus endpoint carries hw.power, hw.energy and hw.gpu.utilization per GPU, and the idle ratio."""
    body = urllib.request.urlopen(f"{energy_gw.base_url}/metrics", timeout=5).read().decode()
    assert re.search(r'^hw_power_watts\{.*hw_id="GPU-5fd4f087', body, re.M)
    assert re.search(r"^hw_energy_joules_total\{", body, re.M)
    assert re.search(r'^hw_gpu_utilization(_ratio)?\{.*hw_type="gpu"', body, re.M)
    assert re.search(r'^gateway_energy_idle_to_active(_ratio)?\{.*gateway_model_selected="small"', body, re.M)


def test_no_gpu_on_this_machine_is_said_once_and_the_gateway_serves(caplog):
    """A policy asking for NVML on a machine with no GPU and no NVML library starts, says so once, and serves."""
    import logging

    if real_nvml_works():
        pytest.skip("this machine has a working NVML")
    policy = models(model("small", upstream_model=None, gpus="{{source: nvml, ids: [0]}}")) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
"""
    caplog.set_level(logging.INFO)
    harness = Harness(policy, sims={"small": dict(ttft_ms=1, tpot_ms=1)}, environ=dict(os.environ)).start()
    try:
        reply = harness.openai().chat.completions.create(model="auto", max_tokens=3,
                                                         messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert harness.services.energy.health["small"] == "unavailable"
        said = [r for r in caplog.records if "no GPU" in r.getMessage() or "NVML" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]
    finally:
        harness.stop()


BUDGET_POLICY = models(measured_model()) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
tenants:
  metered: {{keys_sha256: ["KEYHASH"], budget: {{usd_per_day: 100}}}}
energy: {{sample_interval_s: 0.05}}
ledger: {{path: "LEDGER"}}
"""


def test_energy_cost_is_charged_to_the_tenants_budget(tmp_path):
    """A model priced by energy alone: the request's energy cost, known after it ends, is charged to the budget."""
    from gateway.tenancy.keys import new_key

    exporter = LiveExporter().start()
    key, key_hash = new_key()
    ledger = tmp_path / "ledger.jsonl"
    policy = BUDGET_POLICY.replace("PORT", str(exporter.port)).replace("LEDGER", str(ledger))
    harness = Harness(policy.replace("KEYHASH", key_hash), sims={"small": dict(ttft_ms=5, tpot_ms=20)},
                      environ=dict(os.environ)).start()
    try:
        chunks = list(harness.openai(api_key=key).chat.completions.create(
            model="auto", stream=True, max_tokens=20, messages=[{"role": "user", "content": "power"}]))
        assert chunks
        deadline = time.monotonic() + 5
        records: list[dict] = []
        while not records and time.monotonic() < deadline:
            harness.call(harness.services.background.drain(10))
            records = [r for r in ledger_lines(ledger) if r.get("type") != "outcome"] if ledger.exists() else []
            time.sleep(0.05)
        harness.call(harness.services.background.drain(10))
        cost_usd = Decimal(records[-1]["cost_usd"])
        assert cost_usd > 0                                    # all of it energy: the model has no token price
        tenant = harness.holder.current.policy.tenants["metered"]
        spent = harness.call(harness.services.stores.budgets.usage(tenant))
        assert spent.spent_day_usd == cost_usd.quantize(Decimal("1e-9"))
    finally:
        harness.stop()


ENERGY_SLA_POLICY = models(
    measured_model(price=price(0.10, 0.20)),
    model("large", upstream_model=None, size_b=70, energy_usd_per_kwh=0.30, latency_prior=latency(5, 20),
          gpus=DCGM_GPUS),
) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small, large]
    sla: {{max_energy_j: 1}}
energy: {{sample_interval_s: 0.05}}
"""


class FailingExporter(LiveExporter):
    """The DCGM stand-in, until it starts to serve a body no parser reads."""

    broken = False

    def text(self) -> str:
        return "not a metric\n" if self.broken else super().text()


def test_a_failing_sampler_teaches_the_router_nothing():
    """Joules booked by a sampler that is failing are not a measurement: learning 0 J a token from them would
    let the route's max_energy_j pass every model."""
    exporter = FailingExporter().start()
    harness = Harness(ENERGY_SLA_POLICY.replace("PORT", str(exporter.port)),
                      sims={"small": dict(ttft_ms=5, tpot_ms=20), "large": dict(ttft_ms=5, tpot_ms=20)},
                      environ=dict(os.environ)).start()
    try:
        exporter.broken = True
        deadline = time.monotonic() + 5
        while harness.services.energy.health.get("small") != "failing" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert harness.services.energy.health["small"] == "failing"
        client = harness.openai()
        for _ in range(2):
            reply = client.chat.completions.with_raw_response.create(
                model="auto", max_tokens=20, messages=[{"role": "user", "content": "power"}])
            assert reply.headers["x-gateway-model"] == "small"
            harness.call(harness.services.background.drain(10))
        assert harness.services.fleet.estimates.joules_per_output_token("small") is None
    finally:
        harness.stop()


def test_max_energy_j_moves_traffic_off_a_model_measured_above_it():
    """The router learns joules per output token from measured answers: once `small` is measured above the
    route's max_energy_j it is dropped for `energy`, and the next request goes to the unmeasured `large`."""
    exporter = LiveExporter().start()
    harness = Harness(ENERGY_SLA_POLICY.replace("PORT", str(exporter.port)),
                      sims={"small": dict(ttft_ms=5, tpot_ms=20), "large": dict(ttft_ms=5, tpot_ms=20)},
                      environ={**os.environ, "GATEWAY_ADMIN_TOKEN": "energy-admin"}).start()
    try:
        client = harness.openai()
        ask = dict(model="auto", max_tokens=20, messages=[{"role": "user", "content": "power"}])
        first = client.chat.completions.with_raw_response.create(**ask)
        assert first.headers["x-gateway-model"] == "small"      # not measured yet: not held to the limit
        estimates = harness.services.fleet.estimates
        deadline = time.monotonic() + 20      # the answer's samples, read on a loaded machine
        while estimates.joules_per_output_token("small") is None and time.monotonic() < deadline:
            harness.call(harness.services.background.drain(10))
            time.sleep(0.05)
        per_token_j = estimates.joules_per_output_token("small")
        output_tokens = first.parse().usage.completion_tokens
        # two GPUs at 400 W, 100 W idle each, for the answer's time: far above 1 J for 20 tokens
        assert per_token_j is not None and per_token_j * output_tokens > 1
        # read before `large` serves: its own answer is measured in the background once it ends
        shown = {entry["model"]: entry for entry in harness.http(
            "GET", f"{harness.base_url}/admin/models", headers={"x-admin-token": "energy-admin"})["models"]}
        assert shown["small"]["joules_per_output_token"] == pytest.approx(per_token_j, rel=1e-5)
        assert shown["large"]["joules_per_output_token"] is None
        second = client.chat.completions.with_raw_response.create(**ask)
        assert second.headers["x-gateway-model"] == "large"
    finally:
        harness.stop()


def one_request_on_failing_gpus(harness: Harness, ledger: Path, failing: str) -> dict:
    """Once `failing`'s GPUs are failing, one chat request; its ledger line, once written."""
    deadline = time.monotonic() + 5
    while harness.services.energy.health.get(failing) != "failing" and time.monotonic() < deadline:
        time.sleep(0.05)
    harness.openai().chat.completions.create(model="auto", max_tokens=10, messages=[{"role": "user", "content": "power"}])
    harness.call(harness.services.background.drain(10))
    deadline = time.monotonic() + 5
    records: list[dict] = []
    while not records and time.monotonic() < deadline:
        time.sleep(0.05)
        records = [r for r in ledger_lines(ledger) if r.get("type") != "outcome"] if ledger.exists() else []
    [record] = records
    return record


def test_a_request_on_gpus_that_cannot_be_read_records_no_energy_not_0_j(tmp_path):
    """With the model's exporter serving nothing readable, the ledger's energy_j is null and no energy is priced."""
    exporter = FailingExporter().start()
    exporter.broken = True
    ledger = tmp_path / "ledger.jsonl"
    harness = Harness(POLICY.replace("PORT", str(exporter.port)).replace("LEDGER", str(ledger)),
                      sims={"small": dict(ttft_ms=5, tpot_ms=20)}, environ=dict(os.environ)).start()
    try:
        record = one_request_on_failing_gpus(harness, ledger, "small")
    finally:
        harness.stop()
    assert record["energy_j"] is None
    model = harness.holder.current.policy.models["small"]
    usage = Usage(input_tokens=record["input_tokens"], output_tokens=record["output_tokens"])
    assert Decimal(record["cost_usd"]) == token_cost_usd(model, usage)


def test_no_energy_is_priced_when_one_attempts_joules_are_not_whole(tmp_path):
    """`small` (readable GPUs) fails with a 500 and `large` (its exporter serving nothing readable) answers: the
    request's energy is unknown, so none of it is priced, not even the failed attempt's whole joules (it was
    priced: a cost with energy in it beside `energy_j: null`)."""
    readable, broken = LiveExporter().start(), FailingExporter().start()
    broken.broken = True
    ledger = tmp_path / "ledger.jsonl"
    policy = models(
        measured_model(price=price(0.10, 0.20)),
        model("large", upstream_model=None, size_b=70, price=price(0.10, 0.20), energy_usd_per_kwh=0.30,
              latency_prior=latency(5, 20), gpus=DCGM_GPUS.replace("PORT", "BROKEN")),
    ) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
    fallback: [large]
energy: {{sample_interval_s: 0.05}}
ledger: {{path: "LEDGER"}}
"""
    harness = Harness(policy.replace("PORT", str(readable.port)).replace("BROKEN", str(broken.port))
                      .replace("LEDGER", str(ledger)),
                      sims={"small": dict(ttft_ms=50, tpot_ms=20, error_rate=1.0), "large": dict(ttft_ms=5, tpot_ms=20)},
                      environ=dict(os.environ)).start()
    try:
        record = one_request_on_failing_gpus(harness, ledger, "large")
    finally:
        harness.stop()
    assert record["energy_j"] is None and [a["model"] for a in record["attempts"]] == ["small", "large"]
    usage = Usage(input_tokens=record["input_tokens"], output_tokens=record["output_tokens"])
    assert Decimal(record["cost_usd"]) == token_cost_usd(harness.holder.current.policy.models["large"], usage)
    assert record["attempts"][0]["cost_usd"] == "0"     # the failed attempt's own line: its joules unpriced too


def test_a_background_response_on_measured_gpus_pays_the_energy_of_its_whole_generation(tmp_path):
    """Its create call is answered at once, its tokens generated after: the joules attributed to it run from the
    create call to when its end was seen (about 0.8 s here, at 600 W of active power), not the create call's few
    milliseconds, and their price joins its cost once it is booked."""
    policy = POLICY.replace('match: {{models: ["auto"]}}', 'match: {{models: ["auto"], endpoints: [responses]}}')
    harness = measured_gateway(policy, tmp_path)
    try:
        created = harness.openai().responses.with_raw_response.create(
            model="auto", input="power", max_output_tokens=40, background=True)
        rid = created.headers["x-request-id"]
        deadline = time.monotonic() + 10
        records: list[dict] = []
        while time.monotonic() < deadline and not records:
            time.sleep(0.05)
            records = [r for r in ledger_lines(harness.ledger_path) if r.get("request_id") == rid]
        [record] = records
    finally:
        harness.stop()
    assert record["background"] == "incomplete" and record["output_tokens"] == 40
    generation_s = record["attempts"][0]["duration_s"]
    assert generation_s > 0.78 > record["latency_s"]
    assert 600 * 0.78 * 0.5 < record["energy_j"] < 600 * generation_s * 1.5, (record["energy_j"], generation_s)
    model = harness.holder.current.policy.models["small"]
    usage = Usage(input_tokens=record["input_tokens"], output_tokens=record["output_tokens"])
    expected = token_cost_usd(model, usage) + energy_cost_usd(model, record["energy_j"])
    assert abs(Decimal(record["cost_usd"]) - expected) < Decimal("1e-12")
