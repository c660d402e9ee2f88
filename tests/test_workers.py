"""`gateway run --workers N`: a supervisor that restarts a dead worker, stops them all on SIGTERM, reports a
failure in its exit status, refuses a taken port, and brings every worker along on a reload."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.server import FORK
from gateway.supervisor import Supervisor
from tests.support.redis_server import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "admin-secret-token"
POLICY = """version: 1
models:
  small: {endpoint: "http://127.0.0.1:9/v1", upstream_model: sim-small}
routes:
  - {name: first, match: {models: [auto]}, candidates: [small]}
server: {grace_period_s: 2}
"""


class Workers:
    """`python -m gateway run --workers N` on a free port, its log in a file."""

    def __init__(self, policy: Path, workers: int = 2) -> None:
        self.port, self.workers = free_port(), workers
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = policy.with_suffix(".log")
        env = {**{k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "OTEL_SDK_DISABLED": "true",
               "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(workers)], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        """The live workers, in start order."""
        listed = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return sorted(int(pid) for pid in listed.split() if alive(int(pid)))

    def wait_serving(self, listening: int | None = None) -> "Workers":
        """Until `listening` workers (default: all) have said they listen."""
        wait_for(lambda: self.text().count("gateway listening") >= (listening or self.workers), self.text)
        return self

    def stop(self) -> None:
        workers = self.pids()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, explain=lambda: "", timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.02)


def admin_policy(base_url: str, method: str = "GET", path: str = "/admin/policy") -> dict:
    """One admin call on a fresh connection (so that it may reach any worker)."""
    request = urllib.request.Request(f"{base_url}{path}", method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_a_killed_worker_is_logged_and_restarted(tmp_path):
    """A worker killed by SIGKILL is logged with its pid and signal and replaced by a new one that serves.
    (Without Redis, the start says each worker keeps its own cache, limits, budgets and outcomes.)"""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy).wait_serving()
    try:
        assert "2 workers without Redis" in gateway.text()
        first, second = gateway.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: gateway.text().count("gateway listening") == 3, gateway.text)
        assert f"worker 0 (pid {first}) was killed by SIGKILL" in gateway.text()
        replacement = set(gateway.pids()) - {second}
        assert len(replacement) == 1 and first not in replacement
        assert admin_policy(gateway.base_url)["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    finally:
        gateway.stop()


def test_sigterm_after_a_worker_died_stops_the_others_and_exits_non_zero(tmp_path):
    """SIGTERM right after a worker died stops every other worker, and the exit status is 128 + SIGKILL."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy, workers=3).wait_serving()
    try:
        first, *others = gateway.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not alive(first))
        gateway.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gateway.process.wait(10)
        assert not any(alive(pid) for pid in others), gateway.text()
        assert gateway.process.returncode == 128 + signal.SIGKILL
    finally:
        gateway.stop()


def test_workers_that_keep_dying_stop_the_supervisor_with_their_status():
    """A worker that exits at once each time is restarted with a back-off until the crash limit stops it all."""
    started: list[float] = []

    def spawn(_slot: int):
        started.append(time.monotonic())
        process = FORK.Process(target=os._exit, args=(3,))
        process.start()
        return process

    supervisor = Supervisor(spawn, 1, crash_limit=3, crash_window_s=10, backoff_s=0.05)
    assert supervisor.run() == 3
    assert len(started) == 3
    assert started[1] - started[0] >= 0.05 and started[2] - started[1] >= 0.1         # the back-off doubles


def test_a_port_taken_by_other_workers_is_refused_in_one_line():
    """A port another process listens on with SO_REUSEPORT (another gateway's workers) is not shared: the
    gateway exits 1 with one line."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", "gateway/data/demo.yaml",
                                    "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]), "--workers", "2"],
                                   cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = gateway.communicate(timeout=15)
        finally:
            if gateway.poll() is None:
                os.killpg(gateway.pid, signal.SIGKILL)      # it shares the port: it and its workers
                gateway.communicate()
    assert gateway.returncode == 1
    assert stderr.count("\n") == 1 and "cannot listen on 127.0.0.1" in stderr and "address already in use" in stderr


def test_sighup_while_workers_start_kills_none_of_them(tmp_path):
    """SIGHUP sent to the parent again and again while its workers start up leaves every worker serving."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy)
    try:
        wait_for(lambda: gateway.pids() or gateway.process.poll() is not None, gateway.text)
        while gateway.text().count("gateway listening") < 2 and gateway.process.poll() is None:
            gateway.process.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        assert gateway.process.poll() is None and len(gateway.pids()) == 2, gateway.text()
        assert "was killed by SIGHUP" not in gateway.text()
    finally:
        gateway.stop()


def test_an_admin_reload_reaches_every_worker_once(tmp_path):
    """POST /admin/policy/reload of an edit the file watchers cannot see (same size, same mtime) reaches every
    worker, and each reloads it once: the announcing worker's own SIGHUP reload is a no-op, not announced again."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy, workers=3).wait_serving()
    try:
        info = policy.stat()
        policy.write_text(POLICY.replace("name: first", "name: other"))
        os.utime(policy, ns=(info.st_atime_ns, info.st_mtime_ns))
        new_sha = hashlib.sha256(policy.read_bytes()).hexdigest()
        assert admin_policy(gateway.base_url, "POST", "/admin/policy/reload")["sha256"] == new_sha
        wait_for(lambda: gateway.text().count("policy reloaded") >= 3, gateway.text, timeout_s=5)
        assert {admin_policy(gateway.base_url)["sha256"] for _ in range(30)} == {new_sha}
        time.sleep(0.3)
        assert gateway.text().count("policy reloaded") == 3 and gateway.text().count("SIGHUP:") == 1
    finally:
        gateway.stop()
