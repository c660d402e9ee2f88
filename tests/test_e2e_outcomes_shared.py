"""End to end: the outcome book shared through Redis by several gateways, and by the workers of one.

A task is booked by whichever gateway served its calls and reported through any other; every gateway's
/admin/stats shows the same numbers; Redis down never fails a request, and a report then says so (503).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.simulator import SimConfig
from tests.support import accounting
from tests.support.harness import Harness
from tests.support.policies import QUICK_STOP, models, short_timeouts, standard_model, tenants
from tests.support.redis_server import RedisServer, free_port
from tests.test_e2e_replicas import REPO_ROOT, SimulatorThread, http

ADMIN_TOKEN = "admin-secret-for-tests"
KEYS = {"alpha": "key-alpha-0001", "beta": "key-beta-0002"}
MESSAGES = [{"role": "user", "content": "Triage this ticket"}]
PRICES = ("0.10", "0.20")
POLICY = models(standard_model("small", timeouts=short_timeouts())) + """
routes:
  - name: support
    match: {{models: ["support"]}}
    candidates: [small]
""" + tenants(KEYS)


@pytest.fixture(scope="module")
def pair(module_redis_server):
    """Two gateways, each with its own simulator and process state, sharing one redis-server."""
    environ = {**os.environ, "GATEWAY_REDIS_URL": module_redis_server.url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
               "OTEL_SDK_DISABLED": "true"}
    gateways = [Harness(POLICY, {"small": dict(ttft_ms=5, tpot_ms=1)}, environ).start() for _ in range(2)]
    yield gateways
    for gateway in gateways:
        gateway.stop()


def call(gw: Harness, task: str | None, max_tokens: int, *, tenant: str = "alpha",
         workflow: str | None = None) -> tuple[str, Decimal]:
    """One chat call: (its x-request-id, its cost by hand from the simulator's usage)."""
    headers = {k: v for k, v in (("x-gateway-task-id", task), ("x-gateway-workflow", workflow)) if v}
    raw = gw.openai(api_key=KEYS[tenant]).chat.completions.with_raw_response.create(
        model="support", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers)
    usage = raw.parse().usage
    return raw.headers["x-request-id"], accounting.api_cost(usage.prompt_tokens, usage.completion_tokens, *PRICES)


def report(gw: Harness, body: dict, tenant: str = "alpha") -> tuple[int, dict]:
    return accounting.post_outcome(gw.base_url, body, api_key=KEYS[tenant])


def test_a_task_booked_through_one_gateway_is_reported_through_the_other(pair):
    """Calls of one task served by two gateways are reported once through either, at their whole cost; a lone
    request is reported through the gateway that did not serve it; both gateways' stats agree."""
    first, second = pair
    cost = call(first, "ticket-shared", 3, workflow="triage")[1] + call(second, "ticket-shared", 5)[1]
    lone_id, lone_cost = call(first, None, 2, workflow="single-shot")
    status, body = report(second, {"task_id": "ticket-shared", "outcome": "success", "value_usd": 1.5})
    assert status == 200, body
    assert (body["route"], body["workflow"], body["tenant"]) == ("support", "triage", "alpha")
    assert Decimal(body["cost_usd"]) == cost
    status, body = report(second, {"request_id": lone_id, "outcome": "failure"})
    assert status == 200, body
    assert Decimal(body["cost_usd"]) == lone_cost
    status, body = report(first, {"task_id": "ticket-shared", "outcome": "failure"})
    assert (status, body["error"]["code"]) == (409, "outcome_already_reported")
    assert report(first, {"task_id": "ticket-shared", "outcome": "success"}, tenant="beta")[0] == 404
    stats = [accounting.admin_stats(gw.base_url, ADMIN_TOKEN) for gw in pair]
    assert stats[0] == stats[1]
    triage = stats[0]["workflow"]["triage"]
    assert (triage["tasks"], triage["success"], Decimal(triage["cost_per_successful_task_usd"])) == (1, 1, cost)
    assert Decimal(triage["value_usd"]) == Decimal("1.5")
    assert Decimal(stats[0]["tenant"]["alpha"]["cost_usd"]) == cost + lone_cost


def test_redis_down_serves_requests_and_answers_reports_503(caplog):
    """With Redis gone, calls are still served and booked nowhere (one warning), and a report is 503
    store_unavailable, not a 404 that would claim the task unknown."""
    caplog.set_level(logging.WARNING)
    redis = RedisServer().start()
    environ = {**os.environ, "GATEWAY_REDIS_URL": redis.url, "OTEL_SDK_DISABLED": "true"}
    gw = Harness(POLICY + QUICK_STOP, {"small": dict(ttft_ms=5, tpot_ms=1)}, environ).start()
    try:
        call(gw, "ticket-up", 1)
        redis.stop()
        for _ in range(3):
            call(gw, "ticket-down", 1)
        status, body = report(gw, {"task_id": "ticket-up", "outcome": "success"})
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        warnings = [r.getMessage() for r in caplog.records if "outcome store unavailable" in r.getMessage()]
        assert len(warnings) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert gw.services.stores.outcomes.store_failures >= 3
    finally:
        gw.stop()
        redis.stop()


def test_workers_of_one_gateway_share_the_book(module_redis_server, tmp_path):
    """`gateway run --workers 2` with Redis: each of 20 tasks, served by either worker, is reported through
    either (no 404 unknown_id), and both workers' stats count all 20."""
    sims = SimulatorThread([SimConfig(name="sim-small", ttft_ms=5, tpot_ms=1)])
    policy = tmp_path / "policy.yaml"
    policy.write_text(models(standard_model("small", timeouts=short_timeouts())).format(small=sims.sims[0].url)
                      + "routes:\n  - {name: chat, match: {models: [auto]}, candidates: [small]}\n")
    port = free_port()
    log_path = tmp_path / "gateway.log"
    environ = {**os.environ, "GATEWAY_REDIS_URL": module_redis_server.url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
               "OTEL_SDK_DISABLED": "true"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host",
                                    "127.0.0.1", "--port", str(port), "--workers", "2"],
                                   cwd=REPO_ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log_path)
        for index in range(20):
            assert post(f"{base}/v1/chat/completions", {"model": "auto", "max_tokens": 2, "messages": MESSAGES},
                        {"x-gateway-task-id": f"task-{index}"})[0] == 200
        statuses = [post(f"{base}/v1/outcomes", {"task_id": f"task-{index}", "outcome": "success"})[0]
                    for index in range(20)]
        assert statuses == [200] * 20, log_path.read_text()
        for _ in range(4):                  # new connections: SO_REUSEPORT spreads them over the workers
            assert accounting.admin_stats(base, ADMIN_TOKEN)["route"]["chat"]["success"] == 20
    finally:
        process.terminate()
        process.wait(20)
        sims.stop()


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST on a new connection."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(base: str, process: subprocess.Popen, log_path: Path, workers: int = 2,
               timeout_s: float = 30.0) -> None:
    """Until every worker has said it listens and one answers /readyz."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if log_path.read_text().count("gateway listening") == workers and http("GET", f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready:\n{log_path.read_text()}")
