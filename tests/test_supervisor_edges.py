"""Edges of running the gateway: a stop while workers start, a start that cannot open its stores, the admin
surface's refusals, and background work at shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.server import FORK
from gateway.supervisor import Supervisor
from tests.test_workers import ADMIN_TOKEN, POLICY, REPO, alive, kill, sleep_until_sigterm, stop_from_spawn


def test_a_stop_while_workers_start_starts_no_more_of_them():
    """A SIGTERM that arrives while the first of four workers starts stops the start-up there: the other three are
    never forked (a Ctrl-C after `--workers 64` does not wait for 63 more starts)."""
    started: list[int] = []

    def spawn(slot: int):
        if slot == 0:
            stop_from_spawn()
        process = FORK.Process(target=sleep_until_sigterm, args=(supervisor.ready_fd,))
        process.start()
        started.append(process.pid)
        return process

    supervisor = Supervisor(spawn, 4, grace_period_s=1.0, kill_margin_s=2.0)
    try:
        assert supervisor.run() == 0
    finally:
        for pid in started:
            if alive(pid):
                kill(pid)
    assert len(started) == 1, started


def run_gateway(policy: Path, *args: str, env: dict[str, str] | None = None,
                timeout_s: float = 20) -> subprocess.CompletedProcess:
    """`python -m gateway run` on a free port until it exits by itself."""
    environ = {**{k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}, "OTEL_SDK_DISABLED": "true",
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
                           "--port", "0", *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_redis_url_that_cannot_be_used_stops_the_start_in_one_line(tmp_path, workers):
    """A GATEWAY_REDIS_URL the Redis client refuses (an unknown scheme) stops the start with exit 1 and one
    line naming the problem, not a traceback and an unclosed-session warning; the URL itself is not printed.
    With workers, the supervisor says it once before forking any (each worker failed in turn until the crash
    limit)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    done = run_gateway(policy, "--workers", workers, env={"GATEWAY_REDIS_URL": "bogus://:s3cret@redis.internal:6379"})
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot use the Redis" in errors[0] and "scheme" in errors[0], done.stderr
    assert "s3cret" not in done.stderr


def test_a_refused_admin_reload_answers_in_openai_error_shape(tmp_path):
    """POST /admin/policy/reload of an invalid file is a 422 that the OpenAI SDK reads as an error: an `error`
    object (type, code, the located problem as its message) beside the reload status, the old policy serving."""
    import openai

    from tests.support.harness import Harness

    harness = Harness(environ={**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}).start()
    try:
        serving = harness.holder.current.policy.content_sha256
        harness.policy_path.write_text(harness.policy_path.read_text() + "\nnot_a_key: 1\n")
        client = openai.OpenAI(base_url=harness.base_url, api_key=ADMIN_TOKEN, max_retries=0, timeout=10)
        try:
            client.post("/admin/policy/reload", cast_to=object)
            raise AssertionError("the reload was accepted")
        except openai.UnprocessableEntityError as exc:
            refused = exc
        body = refused.response.json()
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_policy"
        assert f"{harness.policy_path}:" in body["error"]["message"] and "not_a_key" in body["error"]["message"]
        assert (refused.type, refused.code) == ("invalid_request_error", "invalid_policy")     # the SDK's reading
        assert (body["reloaded"], body["sha256"], body["last_error"]) == (False, serving, body["error"]["message"])
    finally:
        harness.stop()


async def test_a_failed_background_task_is_logged_with_where_it_failed(caplog):
    """A background task's failure is logged at ERROR with its traceback (the function that raised), not only
    the exception's repr, so the log says where a cache write or a budget charge broke."""
    from gateway.tasks import BackgroundTasks

    async def write_to_the_cache() -> None:
        await asyncio.sleep(0)
        raise KeyError("slot")

    background = BackgroundTasks()
    background.spawn(write_to_the_cache(), name="cache-write")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        await background.drain(timeout_s=1.0)
    [record] = [record for record in caplog.records if "cache-write" in record.getMessage()]
    assert record.levelname == "ERROR" and "KeyError" in record.getMessage()
    assert "write_to_the_cache" in caplog.text and "Traceback" in caplog.text, caplog.text


async def test_background_work_cut_at_the_drain_deadline_is_said_by_name(caplog):
    """Work still running when the drain's deadline passes is cancelled and logged at WARNING, by task name and
    count, so a shutdown that dropped a budget charge or a limits release says so."""
    from gateway.tasks import BackgroundTasks

    background = BackgroundTasks()
    background.spawn(asyncio.sleep(30), name="limits-release")
    background.spawn(asyncio.sleep(30), name="budget-charge")
    background.spawn(asyncio.sleep(0), name="cache-write")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        await background.drain(timeout_s=0.1)
    [record] = [record for record in caplog.records if record.levelname == "WARNING"]
    said = record.getMessage()
    assert "2 background task(s)" in said and "budget-charge" in said and "limits-release" in said, said
    assert "cache-write" not in said and len(background) == 0
