"""End to end: three real gateway processes sharing one real redis-server enforce one tenant's limits and budget."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from gateway.simulator import SimConfig, start_simulators
from gateway.tenancy.keys import new_key
from tests.support.redis_server import RedisServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
TENANTS = ("burst", "conc", "spender")
KEYS = {name: new_key() for name in TENANTS}
ADMIN_TOKEN = "admin-" + new_key()[0]
BURST_RPM = 10
CONCURRENT = 3
HELLO = [{"role": "user", "content": "Hello there"}]

POLICY = """
version: 1
server: {grace_period_s: 2}
# generous for a loaded CI machine: a store call slower than this is a store failure, which `allow` admits
store: {timeout_ms: 500, on_store_failure: allow}
models:
  small:
    endpoint: @small@
    upstream_model: sim-small
    price: {input_per_mtok: 0.10, output_per_mtok: 0.20}
    latency_prior: {ttft_ms: 5, tpot_ms: 1}
  slow:
    endpoint: @slow@
    upstream_model: sim-slow
    price: {input_per_mtok: 0.10, output_per_mtok: 0.20}
    latency_prior: {ttft_ms: 1500, tpot_ms: 1}
routes:
  - {name: chat-default, match: {models: ["auto"]}, candidates: [small]}
  - {name: slow, match: {models: ["slow"]}, candidates: [slow]}
tenants:
  burst: {keys_sha256: ["@burst@"], limits: {requests_per_minute: @rpm@}}
  conc: {keys_sha256: ["@conc@"], limits: {concurrent: @concurrent@}}
  spender: {keys_sha256: ["@spender@"], budget: {usd_per_day: 0.000002}}
"""


class SimulatorThread:
    """Simulated models served from their own event loop thread, for gateways in other processes."""

    def __init__(self, configs: list[SimConfig]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sims = asyncio.run_coroutine_threadsafe(start_simulators(configs), self.loop).result(10)

    def stop(self) -> None:
        async def stop_all():
            for sim in self.sims:
                await sim.stop()
        asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class GatewayProcess:
    """`python -m gateway run` as a real subprocess; its stdout and stderr go to a file."""

    def __init__(self, policy_path: Path, environ: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / f"gateway-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--policy", str(policy_path),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO_ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gateway exited early:\n{self.log_text()}"
            try:
                if http("GET", f"{self.base_url}/readyz")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"gateway on port {self.port} not ready:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM, then wait for the drain; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def openai(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=KEYS[tenant][0],
                                  max_retries=0, timeout=30)


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP call; error statuses are returned, not raised."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Fleet:
    """A redis-server, the simulators, and the gateway processes started against them."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-replicas-"))
        self.redis = RedisServer().start()
        self.sims = SimulatorThread([SimConfig(name="sim-small", ttft_ms=5, tpot_ms=1),
                                     SimConfig(name="sim-slow", ttft_ms=1500, tpot_ms=1)])
        policy = POLICY.replace("@small@", self.sims.sims[0].url).replace("@slow@", self.sims.sims[1].url)
        policy = policy.replace("@rpm@", str(BURST_RPM)).replace("@concurrent@", str(CONCURRENT))
        for name, (_, key_sha256) in KEYS.items():
            policy = policy.replace(f"@{name}@", key_sha256)
        self.policy_path = self.workdir / "policy.yaml"
        self.policy_path.write_text(policy)
        self.environ = {**os.environ, "GATEWAY_REDIS_URL": self.redis.url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                        "GATEWAY_LOG_LEVEL": "DEBUG", "OTEL_SDK_DISABLED": "true",
                        "PYTHONUNBUFFERED": "1"}
        self.gateways: list[GatewayProcess] = []
        self.stopped: list[GatewayProcess] = []

    def start_gateways(self, count: int) -> list[GatewayProcess]:
        started = [GatewayProcess(self.policy_path, self.environ, self.workdir) for _ in range(count)]
        self.gateways.extend(started)
        return [gateway.wait_ready() for gateway in started]

    def stop_gateways(self) -> list[int]:
        codes = [gateway.stop() for gateway in self.gateways]
        self.stopped.extend(self.gateways)
        self.gateways = []
        return codes

    def close(self) -> None:
        self.stop_gateways()
        self.sims.stop()
        self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def tenants(self, gateway: GatewayProcess) -> dict[str, dict]:
        status, body = http("GET", f"{gateway.base_url}/admin/tenants", {"x-admin-token": ADMIN_TOKEN})
        assert status == 200
        return {entry["tenant"]: entry for entry in body["tenants"]}


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.start_gateways(3)
        yield fleet
    finally:
        fleet.close()


async def attempt(client: openai.AsyncOpenAI, model: str = "auto") -> str:
    """'ok' when served, else the OpenAI error code of the refusal."""
    try:
        await client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        return "ok"
    except openai.APIStatusError as exc:
        return exc.code


async def test_three_replicas_admit_exactly_the_rate_limit(fleet):
    """A burst of 3x the limit spread evenly over three processes admits exactly requests_per_minute (tolerance 0)."""
    clients = [gateway.openai("burst") for gateway in fleet.gateways]
    outcomes = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(3 * BURST_RPM)))
    # the tolerance is 0 while the store answers within timeout_ms; a timed-out call would be admitted
    assert not [g.port for g in fleet.gateways if "store unavailable" in g.log_text()]
    assert outcomes.count("ok") == BURST_RPM
    assert outcomes.count("rate_limit_exceeded") == 2 * BURST_RPM
    for gateway in fleet.gateways:      # every replica sees the same shared window
        assert fleet.tenants(gateway)["burst"]["usage"]["requests"] == BURST_RPM
    for client in clients:
        await client.close()


async def test_three_replicas_share_one_concurrency_limit(fleet):
    """Slow requests spread over three processes never hold more than `concurrent` slots, and all are given back."""
    clients = [gateway.openai("conc") for gateway in fleet.gateways]
    outcomes = await asyncio.gather(*(attempt(clients[i % 3], "slow") for i in range(3 * CONCURRENT)))
    assert outcomes.count("ok") == CONCURRENT
    assert outcomes.count("rate_limit_exceeded") == 2 * CONCURRENT
    assert all(fleet.tenants(g)["conc"]["usage"]["concurrent"] == 0 for g in fleet.gateways)
    for client in clients:
        await client.close()


async def test_budget_survives_a_restart_of_every_replica(fleet):
    """Spend charged through one replica keeps the budget refusing after every process is replaced (the budget
    covers one request's predicted cost, not two)."""
    first, second = fleet.gateways[0], fleet.gateways[1]
    client = first.openai("spender")
    assert await attempt(client) == "ok"
    await client.close()
    deadline = time.monotonic() + 10
    while float(fleet.tenants(second)["spender"]["spend"]["spent_day_usd"]) == 0:
        assert time.monotonic() < deadline, "the charge never reached the shared store"
        await asyncio.sleep(0.05)
    assert fleet.stop_gateways() == [0, 0, 0]
    [fresh] = await asyncio.to_thread(fleet.start_gateways, 1)
    client = fresh.openai("spender")
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="auto", messages=HELLO, max_tokens=2)
    await client.close()
    assert caught.value.code == "budget_exceeded"
    spend = fleet.tenants(fresh)["spender"]["spend"]
    assert 0 < float(spend["spent_day_usd"]) <= 0.000002     # refused before it could overspend


async def test_no_key_or_hash_in_process_output(fleet):
    """The replicas' whole log output, at DEBUG, never holds a raw key, a key hash or the admin token."""
    if not fleet.gateways:
        await asyncio.to_thread(fleet.start_gateways, 1)
    gateway = fleet.gateways[0]
    for tenant in TENANTS:
        await attempt(gateway.openai(tenant))
    for bad in (new_key()[0], KEYS["burst"][1]):
        client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=bad, max_retries=0)
        assert await attempt(client) == "invalid_api_key"
    http("GET", f"{gateway.base_url}/admin/tenants", {"Authorization": f"Bearer {KEYS['burst'][0]}"})
    fleet.stop_gateways()
    logs = {g.port: g.log_text() for g in fleet.stopped}
    assert len(logs) >= 4
    secrets_ = [secret for pair in KEYS.values() for secret in pair] + [ADMIN_TOKEN]
    for port, text in logs.items():
        assert "gateway listening" in text
        assert "Traceback" not in text, text
        leaked = [secret[:12] for secret in secrets_ if secret in text]
        assert not leaked, f"secrets in the log of the gateway on port {port}: {leaked}"
