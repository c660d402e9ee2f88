"""End to end: hot reload (admin endpoint, holder, file watcher, SIGHUP), a bad edit under load, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.runtime import PolicyHolder
from gateway.server import watch_policy
from gateway.services import SERVICES
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, standard_model, tenants
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "admin-secret-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

MODELS = models(
    standard_model("small"),
    standard_model("medium"),
    model("slow", size_b=1, latency_prior=latency(5, 50)),
) + """
server: {{grace_period_s: 10}}
"""
#: auto -> small
POLICY_A = MODELS + """
routes:
  - name: default
    match: {{models: [auto]}}
    candidates: [small, medium]
  - name: slow
    match: {{models: [slow]}}
    candidates: [slow]
"""
#: auto -> medium, and no route for `slow`
POLICY_B = MODELS + """
routes:
  - name: default
    match: {{models: [auto]}}
    candidates: [medium]
"""
#: policy B with a hair-trigger breaker
POLICY_C = POLICY_B + """
routing: {{breaker: {{failure_threshold: 1, open_s: 0.3}}}}
"""
#: unknown model in a route
POLICY_BAD = POLICY_A.replace("candidates: [small, medium]", "candidates: [smal, medium]")

SIMS = {"small": dict(ttft_ms=5, tpot_ms=1), "medium": dict(ttft_ms=10, tpot_ms=2),
        "slow": dict(ttft_ms=5, tpot_ms=50)}


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY_A, SIMS, environ={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    yield harness
    harness.stop()


@pytest.fixture
def policy_a(gw):
    """Each test starts (and ends) on policy A."""
    gw.write_policy(POLICY_A)
    assert gw.call(reload(gw.holder))
    yield
    gw.write_policy(POLICY_A)
    gw.call(reload(gw.holder))


async def reload(holder: PolicyHolder) -> bool:
    """holder.reload() on the gateway's own loop."""
    return holder.reload()


def admin(base_url: str, method: str, path: str) -> tuple[int, dict]:
    """One admin call with the admin token: (status, JSON body), error statuses included."""
    request = urllib.request.Request(f"{base_url}{path}", method=method, headers=ADMIN, data=b"" if
                                     method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def client(gw):
    """One SDK client per harness (creating one costs tens of milliseconds)."""
    return gw.openai()


def served_by(gw, alias: str = "auto") -> str:
    raw = client(gw).chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    return raw.headers["x-gateway-model"]


def test_admin_reload_swaps_the_policy(gw, policy_a):
    """POST /admin/policy/reload validates the edited file and swaps it; GET /admin/policy shows its hash."""
    assert served_by(gw) == "small"
    old_sha = admin(gw.base_url, "GET", "/admin/policy")[1]["sha256"]
    gw.write_policy(POLICY_B)
    status, body = admin(gw.base_url, "POST", "/admin/policy/reload")
    assert (status, body["reloaded"]) == (200, True)
    assert body["sha256"] == file_sha(gw.policy_path) != old_sha
    assert admin(gw.base_url, "GET", "/admin/policy")[1]["sha256"] == file_sha(gw.policy_path)
    assert served_by(gw) == "medium"


def test_admin_endpoints_need_the_admin_token(gw):
    """The reload endpoint refuses a caller without the admin token."""
    request = urllib.request.Request(f"{gw.base_url}/admin/policy/reload", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 401


def test_holder_reload_swaps_the_policy(gw, policy_a):
    """PolicyHolder.reload() (what SIGHUP and the watcher call) swaps to the edited file."""
    gw.write_policy(POLICY_B)
    assert gw.call(reload(gw.holder)) is True
    assert gw.holder.current.policy.content_sha256 == file_sha(gw.policy_path)
    assert served_by(gw) == "medium"


def test_invalid_edit_keeps_the_old_policy_and_reports(gw, policy_a):
    """An invalid file answers 422 with file:line errors, keeps serving the old policy, and shows last_error."""
    good_sha = gw.holder.current.policy.content_sha256
    gw.write_policy(POLICY_BAD)
    status, body = admin(gw.base_url, "POST", "/admin/policy/reload")
    assert (status, body["reloaded"]) == (422, False)
    assert body["sha256"] == good_sha
    assert f"{gw.policy_path}:" in body["last_error"] and "unknown model 'smal'" in body["last_error"]
    shown = admin(gw.base_url, "GET", "/admin/policy")[1]
    assert shown["last_error"] == body["last_error"] and shown["failed_reloads"] >= 1
    assert served_by(gw) == "small"
    gw.write_policy(POLICY_B)
    status, body = admin(gw.base_url, "POST", "/admin/policy/reload")
    assert (status, body["last_error"]) == (200, None)



def test_admin_policy_counts_failed_reloads_apart_from_reloads(gw, policy_a):
    """A refused edit adds one to GET /admin/policy's failed_reloads and nothing to its reloads."""
    before = admin(gw.base_url, "GET", "/admin/policy")[1]
    gw.write_policy(POLICY_BAD)
    assert admin(gw.base_url, "POST", "/admin/policy/reload")[0] == 422
    after = admin(gw.base_url, "GET", "/admin/policy")[1]
    assert (after["reloads"], after["failed_reloads"]) == (before["reloads"], before["failed_reloads"] + 1)


def test_admin_policy_lists_models_by_name_and_routes_in_policy_order(gw, policy_a):
    """GET /admin/policy names the models sorted (the file lists small, medium, slow) and the routes in the
    order they are matched."""
    shown = admin(gw.base_url, "GET", "/admin/policy")[1]
    assert shown["models"] == ["medium", "slow", "small"]
    assert shown["routes"] == ["default", "slow"]
    assert shown["source"] == str(gw.policy_path) and shown["tenants"] == []


def test_an_invalid_edit_undone_is_logged_as_valid_again(gw, policy_a, caplog):
    """A bad edit is logged as an error; putting the served file back is logged too (the error must not stay the
    log's last word on the policy), and clears last_error."""
    gw.write_policy(POLICY_BAD)
    with caplog.at_level("INFO", "gateway"):
        assert admin(gw.base_url, "POST", "/admin/policy/reload")[0] == 422
        gw.write_policy(POLICY_A)
        assert admin(gw.base_url, "POST", "/admin/policy/reload")[1]["last_error"] is None
    said = [record.getMessage() for record in caplog.records if "policy" in record.getMessage()]
    assert said[-1].startswith(f"policy file {gw.policy_path} is valid again")


def test_a_reload_asking_to_share_estimates_without_redis_says_it_cannot(gw, policy_a, caplog):
    """routing.share_estimates turned on by a reload, on a gateway without Redis, is warned of as at start-up."""
    gw.write_policy(POLICY_A + "routing: {{share_estimates: true}}\n")
    with caplog.at_level("WARNING", "gateway"):
        assert admin(gw.base_url, "POST", "/admin/policy/reload")[0] == 200
    assert any("routing.share_estimates: no Redis is configured" in record.getMessage()
               for record in caplog.records)

def test_a_reload_warns_of_a_setting_that_takes_no_effect_as_start_up_does(gw, policy_a, caplog):
    """A reload to a policy with advice (a route no candidate can serve) logs it at WARNING, as start-up would:
    an edit that silently refuses every request on a route is said when it is applied."""
    gw.write_policy(POLICY_A.replace("    candidates: [slow]\n", "    candidates: [slow]\n    sla: {{min_tier: 9}}\n"))
    with caplog.at_level("WARNING", "gateway"):
        assert admin(gw.base_url, "POST", "/admin/policy/reload")[0] == 200
    assert any(record.levelname == "WARNING" and "routes.slow.sla.min_tier: 9" in record.getMessage()
               for record in caplog.records), caplog.text


def test_a_reload_says_which_settings_wait_for_a_restart(gw, policy_a, caplog):
    """A reload that changes the ledger and the grace period (read once at start-up) applies the rest, and the
    log and GET /admin/policy name those two as taking effect on restart; reverting them clears it."""
    ledger = gw.workdir / "ledger.jsonl"
    gw.write_policy(POLICY_B.replace("grace_period_s: 10", "grace_period_s: 12") + f"ledger: {{{{path: {ledger}}}}}\n")
    with caplog.at_level("WARNING", "gateway"):
        status, body = admin(gw.base_url, "POST", "/admin/policy/reload")
    assert status == 200 and body["reloaded"] and served_by(gw) == "medium"
    assert "ledger, server.grace_period_s take effect on restart" in body["last_error"]
    assert admin(gw.base_url, "GET", "/admin/policy")[1]["last_error"] == body["last_error"]
    assert any(record.levelname == "WARNING" and "ledger, server.grace_period_s take effect on restart"
               in record.getMessage() for record in caplog.records)
    gw.write_policy(POLICY_B)
    assert admin(gw.base_url, "POST", "/admin/policy/reload")[1]["last_error"] is None



def test_a_budget_a_reload_gives_a_tenant_counts_what_it_spent_before_it():
    """A tenant without a budget spends (the admin API shows it); a reload gives it a day budget below that spend:
    its next request is refused with budget_exceeded, not admitted as if it had spent nothing."""
    free = POLICY_A + tenants({"team": "key-team"})
    capped = free.replace("keys_sha256:", "budget: {{usd_per_day: 0.0000001}}, keys_sha256:")
    harness = Harness(free, SIMS, environ={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    try:
        team = harness.openai(api_key="key-team")
        for _ in range(2):
            team.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        (entry,) = admin(harness.base_url, "GET", "/admin/tenants")[1]["tenants"]
        assert float(entry["spend"]["spent_day_usd"]) > 0.0000001
        harness.write_policy(capped)
        assert harness.call(reload(harness.holder))
        with pytest.raises(openai.RateLimitError) as refused:
            team.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert refused.value.code == "budget_exceeded"
    finally:
        harness.stop()


def test_a_store_key_prefix_edit_waits_for_a_restart_and_the_cache_keeps_its_entries(gw, policy_a):
    """A reload that changes store.key_prefix is said to take effect on restart, and does: the cache still finds
    what it stored under the start-up prefix (it went cold at once before)."""
    cached = POLICY_A.replace("    candidates: [small, medium]\n",
                              "    candidates: [small, medium]\n    cache: {{enabled: true}}\n")
    gw.write_policy(cached)
    assert gw.call(reload(gw.holder))
    messages = [{"role": "user", "content": f"prefix {time.time_ns()}"}]

    def cache_status() -> str:
        raw = client(gw).chat.completions.with_raw_response.create(
            model="auto", messages=messages, max_tokens=3, temperature=0)
        return raw.headers["x-gateway-cache"]

    assert cache_status() == "stored"
    gw.write_policy(cached + "store: {{key_prefix: gwnew}}\n")
    status, body = admin(gw.base_url, "POST", "/admin/policy/reload")
    assert status == 200 and "store takes effect on restart" in body["last_error"]
    assert cache_status() == "hit"

def test_reload_applies_new_breaker_settings(gw, policy_a):
    """After a reload to a policy with failure_threshold 1, a single failure opens the circuit."""
    breakers = gw.services.fleet.breakers
    gw.write_policy(POLICY_C)
    assert gw.call(reload(gw.holder))
    gw.sim_config("medium", error_rate=1.0)
    try:
        with pytest.raises(openai.InternalServerError):
            served_by(gw)
        assert breakers.state("medium") == "open"
    finally:
        gw.sim_config("medium", error_rate=0.0)
    assert wait_for(lambda: breakers.state("medium") == "half_open", timeout_s=3)
    assert served_by(gw) == "medium"
    assert breakers.state("medium") == "closed"


def test_in_flight_stream_finishes_on_its_policy(gw, policy_a):
    """A stream started before a reload that removes its route finishes whole; new requests see the new policy."""
    stream = client(gw).chat.completions.create(model="slow", stream=True, max_tokens=12,
                                                 messages=[{"role": "user", "content": "Go"}])
    chunks = iter(stream)
    words = [next(chunks).choices[0].delta.content]
    gw.write_policy(POLICY_B)
    assert gw.call(reload(gw.holder))
    words += [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len([w for w in words if w]) == 12
    with pytest.raises(openai.NotFoundError):
        served_by(gw, "slow")


async def test_watch_policy_reloads_on_change(tmp_path):
    """gateway.server.watch_policy reloads an edited file and keeps the old policy on an invalid edit."""
    urls = {"small": "http://127.0.0.1:9/v1", "medium": "http://127.0.0.1:9/v1", "slow": "http://127.0.0.1:9/v1"}
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_A.format(**urls))
    holder = PolicyHolder.from_file(path, {})
    watcher = asyncio.create_task(watch_policy(holder, interval_s=0.02))
    try:
        path.write_text(POLICY_B.format(**urls))
        assert await wait_async(lambda: holder.current.policy.content_sha256 == file_sha(path))
        good_sha = holder.current.policy.content_sha256
        path.write_text(POLICY_BAD.format(**urls))
        assert await wait_async(lambda: holder.status.last_error is not None)
        assert holder.current.policy.content_sha256 == good_sha
        os.replace(_written(tmp_path / "next.yaml", POLICY_A.format(**urls)), path)   # a ConfigMap-style swap
        assert await wait_async(lambda: holder.current.policy.content_sha256 == file_sha(path))
        assert holder.status.last_error is None
    finally:
        watcher.cancel()


#: the simulators' URLs for a holder read straight from a file, with no gateway or simulator running
NO_SIMS = {"small": "http://127.0.0.1:9/v1", "medium": "http://127.0.0.1:9/v1", "slow": "http://127.0.0.1:9/v1"}


async def test_the_file_watcher_does_not_serve_a_file_caught_half_written(tmp_path):
    """An edit written in place in two parts (`cp`, a shell redirect, a slow disk), the first of them a valid
    policy by itself (cut at the end of a line: one tenant of two): the watcher waits until the file has stayed
    the same for a moment, so it never serves the half (the second tenant answered 401 meanwhile), and then serves
    the whole."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    served: list[int] = []
    holder.listeners.append(lambda runtime: served.append(len(runtime.policy.tenants)))
    watcher = asyncio.create_task(watch_policy(holder, interval_s=0.02))
    try:
        with path.open("w") as policy:
            policy.write(POLICY_A.format(**NO_SIMS) + 'tenants:\n  alpha: {keys_sha256: ["' + "a" * 64 + '"]}\n')
            policy.flush()
            await asyncio.sleep(0.1)
            policy.write('  beta: {keys_sha256: ["' + "b" * 64 + '"]}\n')
        assert await wait_async(lambda: served[-1:] == [2]), f"the whole file was not served: {served}"
        assert served == [2]
    finally:
        watcher.cancel()


async def test_the_file_watcher_outlives_a_reload_that_fails_unexpectedly(tmp_path, caplog):
    """A reload that raises (here a listener of the new policy) is logged and the watcher watches on: the next
    edit of the file is served, rather than hot reload stopping for good until a restart."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    told: list[str] = []

    def fails_once(runtime) -> None:
        told.append(runtime.policy.content_sha256)
        if len(told) == 1:
            raise RuntimeError("a listener broke")

    holder.listeners.append(fails_once)
    watcher = asyncio.create_task(watch_policy(holder, interval_s=0.02))
    try:
        path.write_text(POLICY_B.format(**NO_SIMS))
        assert await wait_async(lambda: len(told) == 1)
        assert await wait_async(lambda: "failed unexpectedly" in caplog.text)
        os.replace(_written(tmp_path / "next.yaml", POLICY_A.format(**NO_SIMS)), path)
        assert await wait_async(lambda: holder.current.policy.content_sha256 == file_sha(path)), caplog.text
        assert len(told) == 2
    finally:
        watcher.cancel()


def test_a_reload_that_changes_telemetry_says_it_waits_for_a_restart(tmp_path):
    """Telemetry is set up once at start-up: a reload that turns Prometheus on names telemetry as pending."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    path.write_text(POLICY_A.format(**NO_SIMS) + "telemetry: {prometheus: true}\n")
    assert holder.reload() is True
    assert holder.status.restart_pending == ("telemetry",)


def test_a_failed_reload_is_not_read_again_until_the_file_changes(tmp_path):
    """A bad edit is read once: the holder remembers that version, so the watcher does not retry it every second."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    path.write_text(POLICY_BAD.format(**NO_SIMS))
    assert holder.changed_on_disk()
    assert holder.reload() is False
    assert not holder.changed_on_disk() and holder.status.failures == 1


def test_a_file_swapped_in_with_the_same_size_and_mtime_is_seen_as_changed(tmp_path):
    """A new file renamed over the policy (a ConfigMap swap, an rsync keeping mtimes) is a new version even when
    its size and mtime match the old one's: its inode tells it apart, so the watcher reloads it."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    old = path.stat()
    edited = _written(tmp_path / "next.yaml", POLICY_A.format(**NO_SIMS).replace("grace_period_s: 10",
                                                                                 "grace_period_s: 11"))
    os.utime(edited, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(edited, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert holder.changed_on_disk()
    assert holder.reload() is True and holder.current.policy.content_sha256 == file_sha(path)


def test_a_failed_reload_shows_its_error_not_the_settings_waiting_for_a_restart(tmp_path):
    """After a reload left a setting waiting for a restart, a failed reload's last_error (the admin API's 422
    message) says why it failed, not that the previous reload succeeded."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder.from_file(path, {})
    path.write_text(POLICY_A.format(**NO_SIMS) + "telemetry: {prometheus: true}\n")
    assert holder.reload() is True and "takes effect on restart" in holder.status.last_error
    path.write_text(POLICY_BAD.format(**NO_SIMS))
    assert holder.reload() is False
    assert "unknown model 'smal'" in holder.status.last_error, holder.status.last_error


def test_a_worker_started_after_a_restart_only_edit_says_the_setting_waits_for_a_restart(tmp_path):
    """A replacement worker reads a file whose telemetry changed since the gateway started: it runs the gateway's
    start-up settings, and its GET /admin/policy names telemetry as waiting for a restart, as its siblings' do."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    started = PolicyHolder.from_file(path, {}).current.policy
    path.write_text(POLICY_A.format(**NO_SIMS) + "telemetry: {prometheus: true}\n")
    holder = PolicyHolder.from_file(path, {})
    holder.start_with(started)
    assert holder.started is started and holder.status.restart_pending == ("telemetry",)
    assert "telemetry takes effect on restart" in holder.status.last_error


async def test_a_worker_started_after_a_store_edit_opens_the_stores_the_gateway_started_with(tmp_path, redis_server):
    """A replacement worker reading a file that now names a Redis opens the stores the gateway started with (in
    memory here), as its siblings run: no worker counts rate limits and budgets apart from the others."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    started = PolicyHolder.from_file(path, {}).current.policy
    path.write_text(POLICY_A.format(**NO_SIMS) + f"store: {{redis_url: '{redis_server.url}'}}\n")
    environ = {"OTEL_SDK_DISABLED": "true"}
    holder = PolicyHolder.from_file(path, environ)
    holder.start_with(started)
    app = build_app(holder, environ=environ)
    runner = web.AppRunner(app)
    await runner.setup()                    # start-up: the services are opened
    try:
        assert app[SERVICES].stores.redis is None
    finally:
        await runner.cleanup()


def test_a_policy_not_read_from_a_file_is_not_reported_reloaded(tmp_path):
    """A holder given its policy, not a file (an embedding tool's), answers a reload with False and says why,
    so the admin API answers 422, not 200 reloaded."""
    path = _written(tmp_path / "policy.yaml", POLICY_A.format(**NO_SIMS))
    holder = PolicyHolder(PolicyHolder.from_file(path, {}).current, {})
    assert holder.reload() is False
    assert holder.status.last_error == "the policy was not loaded from a file"


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def wait_async(predicate, timeout_s: float = 5.0) -> bool:
    """Poll `predicate` on the event loop until it holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while not (ok := predicate()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return ok


async def test_bad_policy_edit_during_load_drops_no_request(gw, policy_a):
    """200 concurrent requests all succeed while the file is swapped good, bad, good, and reloaded each time."""
    client = gw.async_openai()
    gate = asyncio.Semaphore(16)
    finished = threading.Event()
    outcomes: list[tuple[int, str]] = []

    async def one(i: int) -> str:
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=5)
            raw.parse()
            return raw.headers["x-gateway-model"]

    def swap() -> None:
        versions = [POLICY_B, POLICY_BAD, POLICY_A, POLICY_BAD]
        turn = 0
        while not finished.is_set():
            gw.write_policy(versions[turn % len(versions)])
            outcomes.append(admin(gw.base_url, "POST", "/admin/policy/reload")[0])
            turn += 1
            time.sleep(0.01)

    swapper = asyncio.create_task(asyncio.to_thread(swap))
    try:
        served = await asyncio.gather(*(one(i) for i in range(200)))
    finally:
        finished.set()
        await swapper
        await client.close()
    assert len(served) == 200 and set(served) <= {"small", "medium"}
    assert 200 in outcomes and 422 in outcomes
    assert gw.holder.current.policy.content_sha256 in {_sha_of(gw, POLICY_A), _sha_of(gw, POLICY_B)}


def _sha_of(gw, template: str) -> str:
    urls = {name: sim.url for name, sim in gw.sims.items()}
    return hashlib.sha256(template.format(**urls).encode()).hexdigest()


# --- the real `gateway run` process -------------------------------------------------------------



class GatewayProcess:
    """`python -m gateway run` in a subprocess, on a free port."""

    def __init__(self, policy: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "OTEL_SDK_DISABLED": "true"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
             "--port", str(self.port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the gateway process did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture
def process_policy(gw, tmp_path) -> Path:
    urls = {name: sim.url for name, sim in gw.sims.items()}
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_A.format(**urls))
    return path


def test_sighup_reloads_the_policy(process_policy):
    """SIGHUP makes a running `gateway run` reload its file; GET /admin/policy shows the new hash."""
    gateway = GatewayProcess(process_policy)
    try:
        gateway.wait_ready()
        before = admin(gateway.base_url, "GET", "/admin/policy")[1]["sha256"]
        assert before == file_sha(process_policy)
        # an edit of the same size with the old mtime: the file watcher cannot see it, only SIGHUP can
        info = process_policy.stat()
        text = process_policy.read_text()
        process_policy.write_text(text.replace("grace_period_s: 10", "grace_period_s: 11"))
        os.utime(process_policy, ns=(info.st_atime_ns, info.st_mtime_ns))
        time.sleep(1.2)                                 # past one watcher tick
        assert admin(gateway.base_url, "GET", "/admin/policy")[1]["sha256"] == before
        gateway.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: admin(gateway.base_url, "GET", "/admin/policy")[1]["sha256"]
                        == file_sha(process_policy) != before)
    finally:
        gateway.stop()


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return ok


def test_sigterm_drains_in_flight_stream_and_exits_zero(process_policy):
    """On SIGTERM the in-flight slow stream finishes, new connections are refused, and the exit code is 0."""
    gateway = GatewayProcess(process_policy)
    try:
        gateway.wait_ready()
        client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="k", max_retries=0, timeout=20)
        stream = client.chat.completions.create(model="slow", stream=True, max_tokens=30,
                                                messages=[{"role": "user", "content": "Go"}])
        chunks = iter(stream)
        words = [next(chunks).choices[0].delta.content]
        gateway.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: _refused(gateway.port), timeout_s=5)
        words += [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len([w for w in words if w]) == 30
        assert gateway.process.wait(15) == 0
    finally:
        gateway.stop()


def _refused(port: int) -> bool:
    """Whether a new TCP connection to the port is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_reload_results_are_counted_in_metrics():
    """A failed reload shows in gateway.policy.reloads{result=failed}; a good one in result=ok."""
    import re

    harness = Harness(environ={**os.environ, "GATEWAY_PROMETHEUS": "1"}).start()
    try:
        good = harness.policy_path.read_text()
        harness.policy_path.write_text(good + "\nnot_a_key: 1\n")
        assert harness.holder.reload() is False
        harness.policy_path.write_text(good.replace("ttl_s: 60", "ttl_s: 61"))
        assert harness.holder.reload() is True
        text = urllib.request.urlopen(f"{harness.base_url}/metrics", timeout=5).read().decode()
        assert re.search(r'^gateway_policy_reloads_total\{[^}]*result="failed"[^}]*\} 1\.0$', text, re.M)
        assert re.search(r'^gateway_policy_reloads_total\{[^}]*result="ok"[^}]*\} 1\.0$', text, re.M)
    finally:
        harness.stop()


def test_a_reload_of_a_tenants_section_left_empty_keeps_the_keyed_policy_serving(tmp_path):
    """An edit that comments out every tenant (leaving `tenants:` empty) would turn API keys off on reload, and
    anyone could call from then on: the reload fails, and the policy with keys serves on."""
    keyed = POLICY_A.format(**NO_SIMS) + "tenants:\n  team: {keys_sha256: [\"" + "a" * 64 + "\"]}\n"
    path = _written(tmp_path / "policy.yaml", keyed)
    holder = PolicyHolder.from_file(path, {})
    path.write_text(keyed.replace("  team:", "#  team:"))
    assert holder.reload() is False
    assert not holder.current.identity.open and "tenants: written but empty" in holder.status.error


def test_a_reload_that_removes_every_tenant_warns_that_the_gateway_now_runs_open(tmp_path, caplog):
    """A reload that deletes the tenants section turns API keys off: from then on anyone may call, so the reload
    says so at WARNING, as start-up does for a policy without tenants."""
    keyed = POLICY_A.format(**NO_SIMS) + "tenants:\n  team: {keys_sha256: [\"" + "a" * 64 + "\"]}\n"
    path = _written(tmp_path / "policy.yaml", keyed)
    holder = PolicyHolder.from_file(path, {})
    path.write_text(POLICY_A.format(**NO_SIMS))
    with caplog.at_level("WARNING", "gateway"):
        assert holder.reload() is True
    assert holder.current.identity.open
    assert any(record.levelname == "WARNING" and "runs open" in record.getMessage()
               for record in caplog.records), caplog.text
