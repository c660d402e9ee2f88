"""SIGTERM drains within server.grace_period_s, not twice it (aiohttp waits its shutdown timeout twice), and what
is still running when it ends is told so: a 503, or in-band for a stream."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import requests
from redis.asyncio import Redis

from bench.machine import free_port
from bench.procs import http_ok
from gateway.app import build_app
from gateway.outcomes import ANONYMOUS
from gateway.policy.model import Budget, Tenant
from gateway.runtime import PolicyHolder
from gateway.server import run_server
from gateway.services import SERVICES
from gateway.supervisor import HANDLED
from gateway.tenancy.budgets_redis import RedisBudgets
from tests.support.harness import Harness
from tests.support.raw_upstream import RawUpstream, http_head
from tests.support.redis_server import RedisServer

GRACE_S = 3.0
POLICY = """version: 1
models:
  slow: {{endpoint: "http://127.0.0.1:{sim}/v1", upstream_model: sim-slow{model_fields}}}
routes:
  - name: all
    candidates: [slow]
server: {{grace_period_s: {grace}}}
"""


def wait_for(check, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


def start_slow_gateway(tmp_path, extra_policy: str = "", stderr=subprocess.DEVNULL, environ: dict | None = None,
                       grace_s: float = GRACE_S, model_fields: str = ""):
    """A simulated model at 400 ms a token and `gateway run` in front of it, both serving: (port, sim, gateway);
    `model_fields`: more of the model's fields, as ", key: value" in flow style."""
    sim_port, port = free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(sim=sim_port, grace=grace_s, model_fields=model_fields) + extra_policy)
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate-backend", "--port", str(sim_port),
                            "--model", "sim-slow", "--tpot-ms", "400", "--ttft-ms", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host",
                                "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=stderr,
                               env={**os.environ, **(environ or {})})
    wait_for(http_ok(f"http://127.0.0.1:{port}/healthz"))
    wait_for(http_ok(f"http://127.0.0.1:{sim_port}/v1/models"))
    return port, sim, gateway


def stop_processes(*processes: subprocess.Popen) -> None:
    """Kill what is still running of `processes` and reap it."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def open_stream(port: int, headers: dict[str, str] | None = None) -> tuple[threading.Thread, list[bytes]]:
    """A 200-token stream read line by line in a thread, once its first data line came: (the reader, its lines)."""
    lines: list[bytes] = []

    def stream() -> None:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        client.request("POST", "/v1/chat/completions", json.dumps({
            "model": "x", "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json", **(headers or {})})
        reply = client.getresponse()
        try:
            while line := reply.readline():
                lines.append(line)
        except (OSError, http.client.HTTPException):
            pass

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: any(line.startswith(b"data:") for line in lines))
    return reader, lines


def stop_timed(gateway: subprocess.Popen, reader: threading.Thread) -> float:
    """SIGTERM the gateway; the seconds until it exited (status 0), its stream's reader joined."""
    signalled_s = time.monotonic()
    gateway.send_signal(signal.SIGTERM)
    gateway.wait(30)
    exited_after_s = time.monotonic() - signalled_s
    reader.join(10)
    assert gateway.returncode == 0
    return exited_after_s


def test_a_stream_longer_than_the_grace_period_is_cut_at_it_and_the_gateway_exits(tmp_path):
    """A 400 ms-per-token stream of 200 tokens is in flight at SIGTERM: the gateway exits about
    grace_period_s later (it used to take twice that, past Kubernetes' and Docker's kill deadlines)."""
    port, sim, gateway = start_slow_gateway(tmp_path)
    try:
        reader, lines = open_stream(port)
        exited_after_s = stop_timed(gateway, reader)
        assert GRACE_S - 0.5 < exited_after_s < GRACE_S + 1.5, exited_after_s
        data = [line for line in lines if line.startswith(b"data:")]
        assert b'"code":"shutting_down"' in data[-1].replace(b" ", b""), data[-3:]
    finally:
        stop_processes(gateway, sim)


def test_requests_still_running_when_the_grace_period_ends_get_a_503_and_the_ledger_says_why(tmp_path):
    """A slow non-streamed request in flight at SIGTERM outlives the grace period: its client gets a 503
    `shutting_down` it can retry elsewhere (not a dropped connection), and the ledger books it so, not as a
    client that left."""
    ledger = tmp_path / "requests.jsonl"
    port, sim, gateway = start_slow_gateway(tmp_path, f'ledger: {{path: "{ledger}"}}\n', stderr=subprocess.PIPE)
    try:
        replies: list[tuple[int, dict]] = []

        def ask() -> None:
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            client.request("POST", "/v1/chat/completions", json.dumps({
                "model": "x", "max_tokens": 200, "messages": [{"role": "user", "content": "hi"}]}),
                {"Content-Type": "application/json"})
            reply = client.getresponse()
            replies.append((reply.status, json.loads(reply.read())))

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)
        gateway.send_signal(signal.SIGTERM)
        asker.join(GRACE_S + 5)
        gateway.wait(30)
        [(status, body)] = replies
        assert (status, body["error"]["code"]) == (503, "shutting_down"), body
        [line] = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert (line["status"], line["outcome"]) == (503, "shutting_down"), line
        assert line["attempts"][-1]["error"] == "shutting_down"
        assert b"ended with 503 shutting_down" in gateway.stderr.read()
    finally:
        stop_processes(gateway, sim)


def test_a_request_whose_body_is_still_coming_when_the_drain_gives_up_on_it_gets_a_503(tmp_path):
    """A client still sending its body at SIGTERM: when aiohttp gives up on the requests left (half-way through the
    grace period, not at its end) it gets a 503 `shutting_down` it can send again, booked so in the ledger; it used
    to get its connection closed without an answer, booked as a client that left."""
    ledger, grace_s = tmp_path / "requests.jsonl", 6.0
    port, sim, gateway = start_slow_gateway(tmp_path, f'ledger: {{path: "{ledger}"}}\n', grace_s=grace_s)
    try:
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=GRACE_S + 10) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(0.3)
            signalled_s = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
            answered_after_s = time.monotonic() - signalled_s
        gateway.wait(30)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"code":"shutting_down"' in answer, answer[:300]
        assert answered_after_s < grace_s * 0.75, answered_after_s      # about grace_s / 2
        [line] = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert (line["status"], line["outcome"]) == (503, "shutting_down"), line
    finally:
        stop_processes(gateway, sim)


def test_a_frozen_redis_does_not_stretch_the_stop_past_the_grace_period(tmp_path):
    """A budgeted tenant's stream in flight at SIGTERM, Redis frozen (SIGSTOP): the stream is ended at the grace
    period, then its budget settle and limit release, which Redis will not answer, get what is left of that grace
    period (at least 1 s), not another whole one: the gateway exits within about one grace period of SIGTERM
    (it took two, past Kubernetes' and Compose's kill)."""
    key = "key-drain"
    tenant = (f"tenants:\n  acme:\n    keys_sha256: [\"{hashlib.sha256(key.encode()).hexdigest()}\"]\n"
              f"    limits: {{concurrent: 10}}\n    budget: {{usd_per_day: 100}}\n"
              f"store: {{timeout_ms: 50}}\n")
    redis = RedisServer().start()
    port, sim, gateway = start_slow_gateway(tmp_path, tenant, environ={"GATEWAY_REDIS_URL": redis.url})
    try:
        reader, lines = open_stream(port, {"Authorization": f"Bearer {key}"})
        os.kill(redis.process.pid, signal.SIGSTOP)
        exited_after_s = stop_timed(gateway, reader)
        assert exited_after_s < GRACE_S + 2.2, exited_after_s       # ledger close and telemetry flush included
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)
        redis.stop()
        stop_processes(gateway, sim)


def test_background_work_at_exit_gets_what_is_left_of_the_grace_period(tmp_path):
    """A charge Redis could not take when its request ended (Redis down) is retried at exit for what is left of
    the grace period, not only its 1 s minimum: Redis back 1.5 s after SIGTERM, the next retry lands it, and the
    gateway exits once it has."""
    key, grace_s = "key-charge", 5.0
    tenant = (f"tenants:\n  acme:\n    keys_sha256: [\"{hashlib.sha256(key.encode()).hexdigest()}\"]\n"
              f"    budget: {{usd_per_day: 100}}\nstore: {{timeout_ms: 200}}\n")
    redis = RedisServer().start()
    port, sim, gateway = start_slow_gateway(tmp_path, tenant, environ={"GATEWAY_REDIS_URL": redis.url},
                                            grace_s=grace_s, model_fields=", price: {input_per_mtok: 1000000}")
    try:
        redis.stop()
        answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, headers={
            "Authorization": f"Bearer {key}"}, json={"model": "x", "max_tokens": 1, "messages": [
                {"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text          # on_store_failure allow: served, charged later
        signalled_s = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        redis.start()
        gateway.wait(30)
        assert gateway.returncode == 0 and time.monotonic() - signalled_s < grace_s + 2
        spent = asyncio.run(spent_today(redis.url, "acme"))
        assert spent > 0, "the charge was given up before Redis came back"
    finally:
        redis.stop()
        stop_processes(gateway, sim)


def test_background_work_of_a_gateway_stopped_without_a_server_gets_the_whole_grace_period():
    """A gateway app cleaned up directly (embedded, with no `gateway run` counting a grace period from SIGTERM)
    gives its background work at exit the whole grace period (15 s by default), not only the 1 s minimum."""
    harness = Harness().start()
    finished: list[str] = []

    async def slow_charge() -> None:
        await asyncio.sleep(1.5)
        finished.append("charged")

    async def spawn() -> None:
        harness.services.background.spawn(slow_charge(), name="budget-charge")

    harness.call(spawn())
    harness.stop()
    assert finished == ["charged"]


async def spent_today(url: str, tenant: str) -> Decimal:
    """What `tenant` has spent today, as the gateway's budget store reads it from Redis."""
    client = Redis.from_url(url)
    try:
        state = await RedisBudgets(client).read(Tenant(tenant, budget=Budget(usd_per_day=Decimal(100))))
        return state.spent_day_usd
    finally:
        await client.aclose()


def test_readyz_says_draining_with_a_503_once_the_gateway_shuts_down():
    """/readyz answers 200 `ready` with the policy's hash while serving, and 503 `draining` once the application's
    shutdown has begun, so a load balancer stops sending it new requests; /healthz stays 200."""
    harness = Harness().start()
    try:
        ready = requests.get(f"{harness.base_url}/readyz", timeout=10)
        assert (ready.status_code, ready.json()) == \
            (200, {"status": "ready", "policy_sha256": harness.holder.current.policy.content_sha256})
        harness.call(harness.app.shutdown())
        draining = requests.get(f"{harness.base_url}/readyz", timeout=10)
        assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
        assert requests.get(f"{harness.base_url}/healthz", timeout=10).status_code == 200
    finally:
        harness.stop()


def test_stop_signals_and_a_sighup_during_the_drain_are_ignored_and_said_once(tmp_path):
    """A further SIGTERM, SIGINT or SIGHUP while the gateway drains (systemd's to the whole group, a second Ctrl-C)
    is logged once and ignored: it cuts no drain, reloads no policy, and the gateway exits 0."""
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        port, sim, gateway = start_slow_gateway(tmp_path, stderr=stderr)
    try:
        reader, lines = open_stream(port)
        gateway.send_signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in log.read_text())
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy.read_text() + "\n# edited during the drain: a SIGHUP now must not load it\n")
        for again in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            gateway.send_signal(again)
        gateway.wait(30)
        reader.join(10)
        said = log.read_text()
        assert gateway.returncode == 0, said
        assert said.count("ignored: already draining") == 1 and "policy reloaded" not in said, said
        data = [line for line in lines if line.startswith(b"data:")]
        assert b'"code":"shutting_down"' in data[-1].replace(b" ", b""), data[-3:]     # drained to the end
    finally:
        stop_processes(gateway, sim)


async def test_the_signal_handlers_from_before_the_server_are_back_once_it_has_drained():
    """After the drain, SIGTERM, SIGINT and SIGHUP have the handlers they had before the server (a worker's: exit 0
    at once, ignore a reload), not their default actions, which would kill a worker still closing its ledger."""
    def before(_signum, _frame) -> None:
        pass

    previous = {sig: signal.signal(sig, before) for sig in HANDLED}
    try:
        demo = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"
        app = build_app(PolicyHolder.from_file(demo, {"OTEL_SDK_DISABLED": "true"}))
        ready, stop = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(run_server(app, "127.0.0.1", free_port(), ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 30)
        stop.set()
        await server
        assert {sig: signal.getsignal(sig) for sig in HANDLED} == {sig: before for sig in HANDLED}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def serve_raw_model(tmp_path, raw: RawUpstream):
    """A gateway served in this loop, its one model `raw` waited for up to 60 s, a grace period of 2 s: (its app, its
    port, the server's task, the event that stops it)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""version: 1
models:
  raw: {{endpoint: "{raw.url}", upstream_model: fake, timeouts: {{first_byte_s: 60, total_s: 60}}}}
routes: [{{name: all, candidates: [raw]}}]
server: {{grace_period_s: 2}}
""")
    app = build_app(PolicyHolder.from_file(policy, {"OTEL_SDK_DISABLED": "true"}))
    port = free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 30)
    return app, port, server, stop


async def test_a_stored_response_call_still_running_when_the_drain_ends_gets_a_503(tmp_path):
    """A call on a stored response (served outside the pipeline) whose model server hangs at SIGTERM: its client
    gets a 503 `shutting_down` within the grace period, as a generating call's does, not a connection cut."""
    raw = RawUpstream().start()
    raw.script = [(b"", 60.0)]                  # the server takes the call and never answers it
    try:
        app, port, server, stop = await serve_raw_model(tmp_path, raw)
        await app[SERVICES].stores.pins.remember(ANONYMOUS, "resp_slow", "raw", 600)
        async with aiohttp.ClientSession() as session:
            asked = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/v1/responses/resp_slow"))
            while not raw.requests:
                await asyncio.sleep(0.02)
            started = time.monotonic()
            stop.set()
            async with await asyncio.wait_for(asked, 10) as reply:
                body = await reply.json()
            await asyncio.wait_for(server, 10)
        assert (reply.status, body["error"]["code"]) == (503, "shutting_down"), body
        assert reply.headers["x-request-id"] and time.monotonic() - started < 2.5
    finally:
        raw.stop()


async def test_a_stored_response_stream_still_running_when_the_drain_ends_is_told_in_band(tmp_path):
    """A background response read on as a stream (`GET /v1/responses/{id}?stream=true`) whose server goes on at
    SIGTERM: its client is told `shutting_down` in-band, within the grace period, after the events it had."""
    raw = RawUpstream().start()
    head = http_head(200, {"Content-Type": "text/event-stream"})
    event = b'event: response.in_progress\ndata: {"type": "response.in_progress", "sequence_number": 1}\n\n'
    raw.script = [(head + event, 0.0), (b"", 60.0)]
    try:
        app, port, server, stop = await serve_raw_model(tmp_path, raw)
        await app[SERVICES].stores.pins.remember(ANONYMOUS, "resp_slow", "raw", 600)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/responses/resp_slow?stream=true") as reply:
                first = await reply.content.readuntil(b"\n\n")
                started = time.monotonic()
                stop.set()
                rest = await asyncio.wait_for(reply.content.read(), 10)
            await asyncio.wait_for(server, 10)
        assert reply.status == 200 and first == event
        assert b'"code":"shutting_down"' in rest.replace(b" ", b"") and time.monotonic() - started < 2.5, rest
    finally:
        raw.stop()
