"""`gateway run --workers N`: a supervisor that restarts a dead worker, stops them all on SIGTERM, reports a
failure in its exit status, refuses a taken port, and brings every worker along on a reload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import importlib
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import FORK
from gateway.supervisor import Supervisor, say_serving, stop_with_parent
from gateway.telemetry.peers import WORKER_LABEL
from tests.support.prometheus import Prometheus
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
#: one model, the simulated backend on port {sim}, streaming 100 ms a token
SLOW_POLICY = """version: 1
models:
  slow: {{endpoint: "http://127.0.0.1:{sim}/v1", upstream_model: sim-slow}}
routes:
  - {{name: all, candidates: [slow]}}
server: {{grace_period_s: 8}}
"""


class Workers:
    """`python -m gateway run --workers N` on a free port, its log in a file."""

    def __init__(self, policy: Path, workers: int = 2, *, session: bool = False,
                 environ: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.port, self.workers = free_port(), workers
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = policy.with_suffix(".log")
        env = {**{k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "OTEL_SDK_DISABLED": "true",
               "PYTHONUNBUFFERED": "1", **(environ or {})}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(workers), *args], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=session)

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
                kill(pid)


def kill(pid: int) -> None:
    """SIGKILL to a process that may be exiting on its own meanwhile (a worker whose supervisor died)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop_from_spawn() -> None:
    """SIGTERM to this thread, from a `spawn` the supervisor calls with its signals held: handled as soon as the
    spawn returns. Sent to the process instead, the kernel may hand it to another thread of the test process,
    whose handler can run after the supervisor began its next start."""
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):     # gone, or reaped between the open and the read
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
        assert "2 workers without Redis" in gateway.text() and "energy" not in gateway.text()
        first, second = gateway.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: gateway.text().count("gateway listening") == 3, gateway.text)
        assert f"worker 0 (pid {first}) was killed by SIGKILL" in gateway.text()
        replacement = set(gateway.pids()) - {second}
        assert len(replacement) == 1 and first not in replacement
        assert admin_policy(gateway.base_url)["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    finally:
        gateway.stop()


def test_a_replacement_worker_keeps_the_gateways_start_up_settings(tmp_path):
    """The policy file's ledger path changed after start-up, then a worker died: its replacement serves the file
    as it is now, but writes the ledger every other worker writes (as it would Redis and telemetry), and says
    the change waits for a restart."""
    started_ledger, edited_ledger = tmp_path / "started.jsonl", tmp_path / "edited.jsonl"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + f'ledger: {{path: "{started_ledger}"}}\n')
    gateway = Workers(policy).wait_serving()
    try:
        policy.write_text(POLICY + f'ledger: {{path: "{edited_ledger}"}}\n')
        first, _ = gateway.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: gateway.text().count("gateway listening") == 3, gateway.text)
        assert "this worker runs with the gateway's start-up values" in gateway.text()
        for _ in range(8):              # fresh connections: both workers answer some
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(
                    f"{gateway.base_url}/v1/chat/completions", data=b"{}", headers={"Connection": "close"}), timeout=5)
        wait_for(lambda: started_ledger.exists() and len(started_ledger.read_text().splitlines()) == 8,
                 lambda: started_ledger.read_text() if started_ledger.exists() else "no ledger")
        assert not edited_ledger.exists()
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


def test_serving_with_no_workers_is_refused_not_an_exit_0():
    """`serve(workers=0)` from Python (the command line refuses it first) raises, rather than start a supervisor
    of no workers that exits 0 at once, serving nothing."""
    from gateway.server import serve

    with pytest.raises(ValueError, match="workers is 1 or more, got 0"):
        serve(REPO / "gateway" / "data" / "demo.yaml", host="127.0.0.1", port=0, workers=0)


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


def test_the_port_the_parent_holds_refuses_any_bind_but_its_workers_even_before_one_listens():
    """Before any worker listens, the parent's hold on the port refuses another process's bind, also one with
    SO_REUSEADDR as aiohttp binds, while a worker's SO_REUSEPORT bind shares it."""
    from gateway.server import ListenError, claim_port, listen_sockets

    held = claim_port("127.0.0.1", 0)
    port = held[0].getsockname()[1]
    try:
        try:
            taken = listen_sockets("127.0.0.1", port)
        except ListenError as exc:
            assert "address already in use" in str(exc), exc
        else:
            for sock in taken:
                sock.close()
            raise AssertionError("another socket bound the port the parent holds")
        for sock in listen_sockets("127.0.0.1", port, reuse_port=True, listen=False):
            sock.close()
    finally:
        for sock in held:
            sock.close()


def test_an_empty_host_listens_on_every_address_on_one_port():
    """`--host ''` binds IPv4 and IPv6 (each its own socket, IPv6 only) on one port, also for port 0 (any
    free one): a client reaches the gateway on 127.0.0.1 and on ::1 alike, at the port it was told."""
    from gateway.server import listen_sockets

    sockets = listen_sockets("", 0)
    try:
        port = sockets[0].getsockname()[1]
        assert {sock.family for sock in sockets} == {socket.AF_INET, socket.AF_INET6}
        assert {sock.getsockname()[1] for sock in sockets} == {port}, sockets
        for address in ("127.0.0.1", "::1"):
            socket.create_connection((address, port), timeout=5).close()
    finally:
        for sock in sockets:
            sock.close()


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


@contextlib.contextmanager
def slow_stream(tmp_path: Path, workers: int = 2):
    """The gateway (its own process group) on a simulated backend that streams a token every 100 ms, with a
    15-token stream under way; yields the gateway and the stream's lines so far."""
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate-backend", "--port", str(sim_port),
                            "--model", "sim-slow", "--tpot-ms", "100", "--ttft-ms", "1"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    policy = tmp_path / "policy.yaml"
    policy.write_text(SLOW_POLICY.format(sim=sim_port))
    gateway = Workers(policy, workers, session=True)
    lines: list[bytes] = []

    def stream() -> None:
        client = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        client.request("POST", "/v1/chat/completions", json.dumps({
            "model": "auto", "stream": True, "max_tokens": 15, "messages": [{"role": "user", "content": "hi"}]}),
            {"Content-Type": "application/json"})
        reply = client.getresponse()
        with contextlib.suppress(OSError, http.client.HTTPException):
            while line := reply.readline():
                lines.append(line)

    reader = threading.Thread(target=stream)
    try:
        gateway.wait_serving()
        wait_for(lambda: _connects(sim_port))
        reader.start()
        wait_for(lambda: any(line.startswith(b"data:") for line in lines), gateway.text)
        yield gateway, lines
    finally:
        if gateway.process.poll() is None:
            os.killpg(gateway.process.pid, signal.SIGKILL)
            gateway.process.wait()
        sim.kill()
        sim.wait()
        if reader.is_alive():
            reader.join(10)


def _connects(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_the_whole_group_lets_a_stream_finish_and_exits_0(tmp_path):
    """SIGTERM to the whole process group (systemd's KillMode=control-group), so each worker gets it twice (its
    own and the parent's), cuts no drain: the stream in flight ends with [DONE] and the exit status is 0."""
    with slow_stream(tmp_path) as (gateway, lines):
        os.killpg(gateway.process.pid, signal.SIGTERM)
        gateway.process.wait(15)
        wait_for(lambda: any(b"[DONE]" in line for line in lines), lambda: (lines[-3:], gateway.text()))
        assert gateway.process.returncode == 0, gateway.text()
        assert "killed by" not in gateway.text()


def test_sighup_during_the_drain_kills_no_worker(tmp_path):
    """SIGHUP to the workers while they drain (their reload handler gone) is ignored: the stream ends, exit 0."""
    with slow_stream(tmp_path) as (gateway, lines):
        workers = gateway.pids()
        gateway.process.send_signal(signal.SIGTERM)
        wait_for(lambda: gateway.text().count("shutting down") == 2, gateway.text)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):     # the one with no request in flight is done
                os.kill(pid, signal.SIGHUP)
        gateway.process.wait(15)
        assert any(b"[DONE]" in line for line in lines), lines[-3:]
        assert gateway.process.returncode == 0, gateway.text()


def test_sigint_twice_to_the_parent_exits_0_without_a_traceback(tmp_path):
    """A second SIGINT to the parent while the workers drain (an impatient Ctrl-C) is not passed on: the
    stream in flight ends with [DONE], exit 0, no traceback."""
    with slow_stream(tmp_path) as (gateway, lines):
        gateway.process.send_signal(signal.SIGINT)
        wait_for(lambda: gateway.text().count("shutting down") == 2, gateway.text)
        gateway.process.send_signal(signal.SIGINT)
        gateway.process.wait(15)
        assert any(b"[DONE]" in line for line in lines), lines[-3:]
        assert gateway.process.returncode == 0 and "Traceback" not in gateway.text(), gateway.text()
        assert "SIGINT: already stopping" in gateway.text()


def sleep_until_sigterm(ready_fd: int) -> None:
    """A worker that says it serves, then waits for SIGTERM and exits 0."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    say_serving(ready_fd)
    time.sleep(30)
    os._exit(0)


def serve_then_mark(ready_fd: int, marker: Path) -> None:
    """sleep_until_sigterm, leaving `marker` once it has said it serves."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    say_serving(ready_fd)
    marker.touch()
    time.sleep(30)
    os._exit(0)


def fail_once_marked(marker: Path) -> None:
    """Exit 1, once `marker` is there (so the supervisor reads the other worker's word before this exit)."""
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os._exit(1)


def serve_once_marked_then_fail(ready_fd: int, marker: Path) -> None:
    """Once `marker` is there (another worker said it serves), say this one serves too, then exit 1."""
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    say_serving(ready_fd)
    time.sleep(0.05)
    os._exit(1)


def test_a_replacement_that_keeps_failing_leaves_the_serving_worker_be(tmp_path):
    """Past the crash limit, while another worker serves, the failing one is retried at the longest back-off
    and nothing is stopped; the exit status still reports its failure."""
    starts: list[float] = []
    serving = tmp_path / "serving"

    def spawn(slot: int):
        starts.append(time.monotonic())
        process = FORK.Process(target=serve_then_mark if slot == 0 else fail_once_marked,
                               args=(supervisor.ready_fd, serving) if slot == 0 else (serving,))
        process.start()
        return process

    supervisor = Supervisor(spawn, 2, crash_limit=3, crash_window_s=10, backoff_s=0.01, max_backoff_s=0.1)
    stopped = threading.Event()

    def stop_once_retried() -> None:
        """SIGTERM once the failing worker was started 7 times (forking a test process that has grown over a whole
        suite, on a busy machine, can take 0.2 s a start: a fixed time would count the machine's speed)."""
        deadline_s = time.monotonic() + 30
        while len(starts) < 8 and time.monotonic() < deadline_s and not stopped.is_set():
            time.sleep(0.01)
        if not stopped.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_retried, daemon=True)
    stopper.start()
    try:
        assert supervisor.run() == 1
    finally:
        stopped.set()
        stopper.join()
    assert len(starts) >= 8                 # the serving worker once, the failing one again and again
    assert min(b - a for a, b in zip(starts[4:], starts[5:])) >= 0.09     # at the longest back-off


def test_a_worker_that_served_counts_as_serving_after_another_says_it_serves_too(tmp_path, caplog):
    """Each worker's word that it serves is kept: a second worker that says so, then keeps failing, does not
    make the supervisor forget the first still serves, so the crash limit retries it rather than stop both."""
    caplog.set_level(logging.INFO, logger="gateway")
    serving = tmp_path / "serving"
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        if starts.count(1) == 5:                # retried past the crash limit: stop
            stop_from_spawn()
        process = FORK.Process(target=serve_then_mark if slot == 0 else serve_once_marked_then_fail,
                               args=(supervisor.ready_fd, serving))
        process.start()
        return process

    supervisor = Supervisor(spawn, 2, crash_limit=3, crash_window_s=30, backoff_s=0.01, max_backoff_s=0.05)
    assert supervisor.run() == 1
    assert "serving on: restarting worker 1" in caplog.text and "stopping all workers" not in caplog.text, \
        caplog.text


def serve_and_mark_once_marked(ready_fd: int, marker: Path, serving: Path) -> None:
    """Once `marker` is there, say this worker serves and leave `serving`; then wait for SIGTERM, exit 0."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    say_serving(ready_fd)
    serving.touch()
    time.sleep(30)
    os._exit(0)


def test_workers_that_say_they_serve_in_one_read_all_count_as_serving(tmp_path, caplog):
    """Two workers' words that they serve, read from the pipe at once: each is counted, so when the first of
    them dies and its replacements keep failing, the crash limit retries them, the second serving on, rather
    than stop both."""
    caplog.set_level(logging.INFO, logger="gateway")
    first, second = tmp_path / "first", tmp_path / "second"
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        if starts.count(0) == 4:                # retried past the crash limit: stop
            stop_from_spawn()
        if slot == 1:
            process = FORK.Process(target=serve_and_mark_once_marked, args=(supervisor.ready_fd, first, second))
        elif starts.count(0) == 1:
            process = FORK.Process(target=serve_then_mark, args=(supervisor.ready_fd, first))
        else:
            process = FORK.Process(target=os._exit, args=(1,))
        process.start()
        if slot == 1:           # both words written before the supervisor reads the pipe; then the first dies
            wait_for(second.exists)
            kill(supervisor.slots[0].process.pid)
        return process

    supervisor = Supervisor(spawn, 2, crash_limit=2, crash_window_s=30, backoff_s=0.01, max_backoff_s=0.05)
    assert supervisor.run() == 128 + signal.SIGKILL
    assert "serving on: restarting worker 0" in caplog.text and "stopping all workers" not in caplog.text, \
        caplog.text


def test_a_worker_that_served_then_keeps_failing_alone_reaches_the_crash_limit(tmp_path, caplog):
    """A worker that said it serves, then died, no longer counts as serving: its replacements failing at once
    reach the crash limit and stop the gateway, rather than being retried for ever with nothing serving."""
    caplog.set_level(logging.INFO, logger="gateway")
    marker = tmp_path / "marker"
    marker.touch()
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        if len(starts) == 6:                    # retried past the crash limit: stop
            stop_from_spawn()
        process = FORK.Process(target=serve_once_marked_then_fail, args=(supervisor.ready_fd, marker)) \
            if len(starts) == 1 else FORK.Process(target=os._exit, args=(1,))
        process.start()
        return process

    supervisor = Supervisor(spawn, 1, crash_limit=3, crash_window_s=30, backoff_s=0.01, max_backoff_s=0.05)
    assert supervisor.run() == 1
    assert len(starts) == 3 and "3 worker exits within 30 s: stopping all workers" in caplog.text, caplog.text


def test_the_exit_status_is_the_first_failures_not_a_later_ones():
    """A worker that exits 3, is restarted and exits 5 leaves the status of the first failure, 3: the one that
    started the trouble, as the README says."""
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        target, args = {1: (os._exit, (3,)), 2: (os._exit, (5,))}.get(len(starts),
                                                                     (sleep_until_sigterm, (supervisor.ready_fd,)))
        if len(starts) == 3:
            stop_from_spawn()
        process = FORK.Process(target=target, args=args)
        process.start()
        return process

    supervisor = Supervisor(spawn, 1, backoff_s=0.01)
    assert supervisor.run() == 3
    assert len(starts) == 3


def exit_on_sigterm(ready_fd: int, status: int) -> None:
    """A worker that says it serves, then exits `status` on SIGTERM (a stop that fails: a flush that broke)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    say_serving(ready_fd)
    time.sleep(30)
    os._exit(0)


def test_a_failure_while_stopping_does_not_replace_an_earlier_crashs_status():
    """A worker that exits 3 unasked, then its replacement failing its stop with status 5: the exit status
    stays 3, the first failure's, as it does when the second failure is a crash."""
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        if len(starts) == 2:
            stop_from_spawn()
        target, args = (os._exit, (3,)) if len(starts) == 1 else (exit_on_sigterm, (supervisor.ready_fd, 5))
        process = FORK.Process(target=target, args=args)
        process.start()
        return process

    supervisor = Supervisor(spawn, 1, backoff_s=0.01, grace_period_s=1.0, kill_margin_s=5.0)
    assert supervisor.run() == 3
    assert len(starts) == 2


def test_exits_further_apart_than_the_crash_window_never_reach_the_crash_limit(caplog):
    """Only the exits within crash_window_s count towards the crash limit, and each restart waits the first
    back-off again: a worker failing now and then is restarted every time, never stopped for good."""
    caplog.set_level(logging.INFO, logger="gateway")
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        if len(starts) == 4:
            stop_from_spawn()
        process = FORK.Process(target=os._exit, args=(3,))
        process.start()
        return process

    supervisor = Supervisor(spawn, 1, crash_limit=2, crash_window_s=0.1, backoff_s=0.2)
    assert supervisor.run() == 3
    assert len(starts) == 4 and "stopping all workers" not in caplog.text, caplog.text
    restarts = [record.getMessage() for record in caplog.records if record.getMessage().startswith("restarting")]
    assert restarts == ["restarting worker 0 in 0.2 s"] * 3, restarts


def drain_then_mark(ready_fd: int, marker: Path, drain_s: float = 0.3) -> None:
    """A worker that says it serves and, on SIGTERM, drains for `drain_s`, leaves `marker` and exits 0."""
    def drain(*_) -> None:
        time.sleep(drain_s)
        marker.touch()
        os._exit(0)

    signal.signal(signal.SIGTERM, drain)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    say_serving(ready_fd)
    time.sleep(30)
    os._exit(0)


def test_a_sighup_while_the_workers_stop_is_not_passed_on(tmp_path, caplog):
    """A SIGHUP to the supervisor after a stop was passed on reaches no worker (a draining worker reloads
    nothing): it is not said as a reload, and the stop ends as usual, status 0."""
    caplog.set_level(logging.INFO, logger="gateway")
    drained = tmp_path / "drained"

    def spawn(_slot: int):
        process = FORK.Process(target=drain_then_mark, args=(supervisor.ready_fd, drained, 2.0))
        process.start()
        return process

    def stop_then_hang_up() -> None:
        wait_for(lambda: "worker 0 started" in caplog.text)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: "SIGTERM: stopping" in caplog.text)
        os.kill(os.getpid(), signal.SIGHUP)      # the worker drains 2 s: the supervisor is still running

    supervisor = Supervisor(spawn, 1, grace_period_s=5.0)
    signaller = threading.Thread(target=stop_then_hang_up, daemon=True)
    signaller.start()
    assert supervisor.run() == 0
    signaller.join(5)
    assert drained.exists() and "reload the policy" not in caplog.text, caplog.text


def test_a_restart_falling_due_while_the_workers_stop_starts_no_worker(tmp_path, caplog):
    """A worker that died just before a stop is not restarted when its back-off ends during the stop: a worker
    started then would never get the stop, and be killed at the deadline."""
    caplog.set_level(logging.INFO, logger="gateway")
    drained = tmp_path / "drained"
    starts: list[int] = []

    def spawn(slot: int):
        starts.append(slot)
        process = FORK.Process(target=drain_then_mark if slot else os._exit,
                               args=(supervisor.ready_fd, drained, 2.5) if slot else (3,))
        process.start()
        return process

    def stop_once_restart_is_due() -> None:
        wait_for(lambda: "restarting worker 0 in 1.0 s" in caplog.text)
        os.kill(os.getpid(), signal.SIGTERM)

    supervisor = Supervisor(spawn, 2, backoff_s=1.0, grace_period_s=1.0, kill_margin_s=2.0)
    signaller = threading.Thread(target=stop_once_restart_is_due, daemon=True)
    signaller.start()
    assert supervisor.run() == 3
    signaller.join(5)
    assert starts == [0, 1] and drained.exists(), caplog.text


def test_a_supervisor_that_fails_lets_its_workers_drain_before_killing_them(tmp_path):
    """After an unexpected error the supervisor's SIGTERM gives each worker its stop's time (grace periods and
    margin) to drain; it does not kill one that is draining at once."""
    drained = tmp_path / "drained"
    started: list[int] = []

    def spawn(slot: int):
        if len(started) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")      # fork() at a pid limit
        process = FORK.Process(target=drain_then_mark if slot else os._exit,
                               args=(supervisor.ready_fd, drained) if slot else (3,))
        process.start()
        started.append(process.pid)
        return process

    supervisor = Supervisor(spawn, 2, backoff_s=0.01, grace_period_s=2.0, kill_margin_s=2.0)
    with contextlib.suppress(BlockingIOError):
        supervisor.run()
        raise AssertionError("run() returned")
    for pid in started:
        if alive(pid):
            kill(pid)
    assert drained.exists()


def test_workers_that_keep_exiting_0_unasked_stop_the_supervisor_with_status_1(caplog):
    """A worker exiting 0 when nobody asked is a failure, logged as the exit it was: the crash limit stops all
    with status 1, not 0."""
    def spawn(_slot: int):
        process = FORK.Process(target=os._exit, args=(0,))
        process.start()
        return process

    assert Supervisor(spawn, 1, crash_limit=3, crash_window_s=10, backoff_s=0.01).run() == 1
    assert re.search(r"worker 0 \(pid \d+\) exited with status 0$", caplog.text, re.MULTILINE), caplog.text


def test_a_supervisor_that_fails_stops_and_reaps_its_workers_first():
    """An exception out of the supervisor (here a fork failing on restart) reaches the caller only after
    every live worker got SIGTERM and exited: none is left running unsupervised."""
    started: list[int] = []

    def spawn(slot: int):
        if len(started) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")      # fork() at a pid limit
        process = FORK.Process(target=sleep_until_sigterm if slot else os._exit,
                               args=(supervisor.ready_fd,) if slot else (3,))
        process.start()
        started.append(process.pid)
        return process

    supervisor = Supervisor(spawn, 2, backoff_s=0.01)
    with contextlib.suppress(BlockingIOError):
        supervisor.run()
        raise AssertionError("run() returned")
    left = [pid for pid in started if alive(pid)]
    for pid in left:
        kill(pid)
    assert not left


def pipes(pid: int) -> set[str]:
    """The pipes a process holds open, by inode."""
    targets = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return {target for target in targets if target.startswith("pipe:")}


def test_a_worker_holds_no_pipe_of_the_parent_or_its_siblings(tmp_path):
    """A worker keeps none of the parent's descriptors but its socket: the only pipe two workers share is the
    one they tell the supervisor they serve through, and the parent's claim on the port is not in them."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy).wait_serving()
    try:
        first, second = gateway.pids()
        assert len(pipes(first) & pipes(second)) == 1
        sockets = [os.readlink(f"/proc/{second}/fd/{fd}") for fd in os.listdir(f"/proc/{second}/fd")]
        parent = gateway.process.pid
        parent = {os.readlink(f"/proc/{parent}/fd/{fd}") for fd in os.listdir(f"/proc/{parent}/fd")}
        assert not {target for target in sockets if target.startswith("socket:")} & parent
    finally:
        gateway.stop()


def test_a_replacement_takes_no_connection_before_it_serves(tmp_path):
    """While a dead worker's replacement fails at start (the policy on disk now invalid), every connection
    reaches the serving worker: the replacement's socket does not listen, so none waits there to be reset."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy).wait_serving()
    try:
        policy.write_text("version: 1\nmodels: {}\n")
        first = gateway.pids()[0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not alive(first))
        failures, deadline = [], time.monotonic() + 2.5
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{gateway.base_url}/healthz", timeout=3) as reply:
                    reply.read()
            except OSError as exc:
                failures.append(repr(exc))
        assert "the policy file is invalid: this worker waits for a valid one" in gateway.text()
        assert not failures, failures[:3]
    finally:
        gateway.stop()


def test_a_replacement_started_on_an_invalid_file_waits_for_a_valid_one_then_serves(tmp_path):
    """A worker that dies while the file holds an edit the workers refused is replaced by one that waits, alive,
    for a valid file, not one that exits into the supervisor's crash limit (which left the gateway a worker
    short for good, or stopped it); once the file is fixed it serves; a stop ends its wait at once."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy).wait_serving()
    try:
        policy.write_text("version: 1\nmodels: {}\n")
        first, second = gateway.pids()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "waits for a valid one" in gateway.text())
        time.sleep(2.5)                             # several polls: still one replacement, alive and waiting
        assert gateway.text().count("waits for a valid one") == 1
        assert "worker exits within" not in gateway.text()
        replacement = next(pid for pid in gateway.pids() if pid != second)
        os.kill(replacement, signal.SIGTERM)        # a stop ends the wait at once
        wait_for(lambda: not alive(replacement), timeout_s=3)
        wait_for(lambda: len(gateway.pids()) == 2)  # replaced again, waiting again
        policy.write_text(POLICY + "\n")           # fixed: the waiting replacement serves
        wait_for(lambda: gateway.text().count("gateway listening") == 3, gateway.text, timeout_s=15)
    finally:
        gateway.stop()


def ignore_sigterm(ready_fd: int) -> None:
    """A worker whose stop hangs: it says it serves, then ignores SIGTERM (a stuck flush, a blocked thread)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    say_serving(ready_fd)
    time.sleep(30)
    os._exit(0)


def test_a_worker_that_hangs_after_sigterm_is_killed_past_grace_and_margin(caplog):
    """A worker still running three grace periods (reloads, requests, background work) plus the kill margin
    after SIGTERM is killed (SIGKILL), logged at ERROR with its pid, and the supervisor exits 128 + SIGKILL; the
    worker that stopped in time is not killed."""
    caplog.set_level(logging.INFO, logger="gateway")
    started: list[int] = []

    def spawn(slot: int):
        process = FORK.Process(target=ignore_sigterm if slot else sleep_until_sigterm, args=(supervisor.ready_fd,))
        process.start()
        started.append(process.pid)
        return process

    supervisor = Supervisor(spawn, 2, grace_period_s=0.3, kill_margin_s=0.2)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        begun = time.monotonic()
        assert supervisor.run() == 128 + signal.SIGKILL
        took_s = time.monotonic() - begun
    finally:
        timer.cancel()
    left = [pid for pid in started if alive(pid)]
    for pid in left:
        kill(pid)
    assert not left
    assert 1.5 <= took_s < 4.5, took_s     # SIGTERM at 0.5 s, the kill at 0.5 + 3 × 0.3 + 0.2 = 1.6 s
    hung = started[1]
    killed = [record for record in caplog.records if record.levelname == "ERROR" and f"(pid {hung})" in record.message]
    assert sum("still running" in record.message for record in killed) == 1, caplog.text     # killed once
    assert f"worker 1 (pid {hung}) was killed by SIGKILL while stopping" in caplog.text
    assert f"worker 0 (pid {started[0]}) stopped" in caplog.text


def test_sigkill_to_the_supervisor_stops_its_workers(tmp_path):
    """Workers whose supervisor is killed by SIGKILL (the OOM killer, `kill -9`) get SIGTERM from the kernel and
    exit, leaving no orphan serving on the port."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy).wait_serving()
    workers = gateway.pids()
    try:
        assert len(workers) == 2
        gateway.process.kill()
        gateway.process.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), gateway.text, timeout_s=8)
        assert gateway.text().count("shutting down") == 2, gateway.text()     # SIGTERM, not SIGKILL: each drained
    finally:
        for pid in workers:
            if alive(pid):
                kill(pid)
        gateway.stop()


def test_workers_whose_supervisor_was_killed_take_the_metrics_folder_with_them(tmp_path):
    """With Prometheus on, the parent makes the workers' metrics folder and removes it at exit; killed by
    SIGKILL it cannot, so each worker removes its socket as it stops and the last one out the folder."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "telemetry: {prometheus: true}\n")
    gateway = Workers(policy, environ={"OTEL_SDK_DISABLED": "false"}).wait_serving()
    workers = gateway.pids()
    try:
        folder = Path(re.search(r"through their sockets in (\S+)\)", gateway.text()).group(1))
        wait_for(lambda: len(list(folder.glob("*.sock"))) == 2, gateway.text)
        gateway.process.kill()
        gateway.process.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), gateway.text, timeout_s=8)
        assert not folder.exists(), list(folder.iterdir())
    finally:
        for pid in workers:
            if alive(pid):
                kill(pid)
        gateway.stop()


def test_a_stopped_gateway_removes_the_metrics_folder_a_killed_worker_left_a_socket_in(tmp_path):
    """A worker killed by SIGKILL leaves its socket in the workers' folder, and its replacement never serves (it
    waits for a valid policy file) to replace it: the last worker out cannot remove the folder, so the parent
    removes it at exit, leaving nothing in TMPDIR."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "telemetry: {prometheus: true}\n")
    gateway = Workers(policy, environ={"OTEL_SDK_DISABLED": "false"}).wait_serving()
    try:
        folder = Path(re.search(r"through their sockets in (\S+)\)", gateway.text()).group(1))
        wait_for(lambda: len(list(folder.glob("*.sock"))) == 2, gateway.text)
        policy.write_text("version: 1\nmodels: {}\n")
        first = gateway.pids()[0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "waits for a valid one" in gateway.text(), gateway.text)
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(30)
        assert not folder.exists(), list(folder.iterdir())
    finally:
        gateway.stop()


def exit_5_unless_stopped(parent_pid: int) -> None:
    """A worker's start whose supervisor (said to be `parent_pid`) may be gone already."""
    stop_with_parent(parent_pid)
    os._exit(5)


def test_a_worker_whose_supervisor_died_before_it_started_exits_at_once():
    """A worker that finds its parent is not the supervisor that forked it (that one died before the
    parent-death signal was set) exits 0 at once instead of serving as an orphan."""
    for parent_pid, status in ((os.getpid(), 5), (os.getpid() + 1_000_000, 0)):
        process = FORK.Process(target=exit_5_unless_stopped, args=(parent_pid,))
        process.start()
        process.join(5)
        assert process.exitcode == status


def test_a_crash_limit_stop_while_starting_starts_no_more_workers(caplog):
    """The first slots cannot start and reach the crash limit, which stops everything: the slots after them are
    not started (a worker forked then would never get the stop, and be killed at the deadline)."""
    caplog.set_level(logging.INFO, logger="gateway")
    started: list[int] = []

    def spawn(slot: int):
        if slot < 3:
            return None
        process = FORK.Process(target=sleep_until_sigterm, args=(supervisor.ready_fd,))
        process.start()
        started.append(process.pid)
        return process

    supervisor = Supervisor(spawn, 4, crash_limit=3, grace_period_s=1.0, kill_margin_s=1.0)
    begun = time.monotonic()
    assert supervisor.run() == 1
    assert time.monotonic() - begun < 2
    for pid in started:
        kill(pid)
    assert started == [], caplog.text


def test_a_sigterm_while_a_failed_supervisor_stops_its_workers_does_not_end_it_first(tmp_path):
    """After an unexpected error the supervisor stops its workers, killing a hung one at the deadline; a SIGTERM
    meanwhile (its handlers are gone by then) waits, so it does not die first and leave the hung worker behind."""
    pids = tmp_path / "pids"
    script = f"""
import os, signal, sys, time
from gateway.server import FORK
from gateway.supervisor import Supervisor, say_serving
from tests.test_workers import ignore_sigterm
started = []
def spawn(slot):
    if len(started) == 2:
        raise BlockingIOError(11, "fork failed")
    process = FORK.Process(target=ignore_sigterm if slot else os._exit, args=(supervisor.ready_fd,) if slot else (3,))
    process.start()
    started.append(process.pid)
    open({str(pids)!r}, "w").write(" ".join(map(str, started)))
    return process
supervisor = Supervisor(spawn, 2, backoff_s=0.2, grace_period_s=0.5, kill_margin_s=1.0)
supervisor.run()
"""
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout_s=10)
        time.sleep(0.5)                     # the restart fell due and raised: the workers are being stopped
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        hung = int(pids.read_text().split()[1])
        assert "BlockingIOError" in process.stderr.read()     # it ended on its error, not on the SIGTERM
        assert process.returncode == 1
        wait_for(lambda: not alive(hung), timeout_s=5)
    finally:
        if process.poll() is None:
            process.kill()
        if pids.exists():
            for pid in map(int, pids.read_text().split()):
                if alive(pid):
                    kill(pid)


def test_a_sigterm_while_a_worker_starts_is_handled_once_it_serves(tmp_path, capfd):
    """A stop signal during a worker's start-up (the supervisor's stop, or the parent-death signal) waits,
    blocked, until the worker handles it: the worker exits 0, without a traceback, wherever start-up was.
    Here it arrives while uvloop sets up its signal handling."""
    from gateway.policy.load import load_policy
    from gateway.server import _worker_process, claim_port, listen_sockets
    from gateway.supervisor import HANDLED, blocked_signals

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    held = claim_port("127.0.0.1", 0)
    ready_r, ready_w = os.pipe()

    def worker(*args) -> None:
        os.environ.pop("GATEWAY_REDIS_URL", None)
        os.environ["OTEL_SDK_DISABLED"] = "true"
        # uvloop, imported now if not before, keeps socket.socketpair as it finds it; that function makes each end
        # of the pair with socket.socket, read when it is called
        importlib.import_module("uvloop")
        real = socket.socket

        class Signalled(real):          # the first socket made: one end of uvloop's signal set-up, as the worker's
            def __init__(self, *a, **kw):       # loop starts
                socket.socket = real
                os.kill(os.getpid(), signal.SIGTERM)
                super().__init__(*a, **kw)

        socket.socket = Signalled
        _worker_process(*args)

    try:
        sockets = listen_sockets("127.0.0.1", held[0].getsockname()[1], reuse_port=True, listen=False)
        with blocked_signals(HANDLED):
            process = FORK.Process(target=worker, args=(policy, load_policy(policy), "127.0.0.1", sockets, [ready_r],
                                                        ready_w, os.getpid()))
            process.start()
        for sock in sockets:
            sock.close()
        process.join(20)
        err = capfd.readouterr().err
        assert process.exitcode == 0, f"exit {process.exitcode}\n{err[-2500:]}"
        assert "Traceback" not in err, err[-2500:]
    finally:
        for sock in held:
            sock.close()
        os.close(ready_r)
        os.close(ready_w)


def worker_without_redis(*args) -> None:
    """`_worker_process` with the environment the Workers class gives a gateway: no Redis, no telemetry export."""
    from gateway.server import _worker_process

    os.environ.pop("GATEWAY_REDIS_URL", None)
    os.environ["OTEL_SDK_DISABLED"] = "true"
    _worker_process(*args)


def worker_slow_to_listen(*args) -> None:
    """`worker_without_redis` whose sockets start listening 0.5 s late (a slow start, as seen from outside)."""
    from aiohttp import web

    start = web.SockSite.start

    async def late_start(site) -> None:
        await asyncio.sleep(0.5)
        await start(site)

    web.SockSite.start = late_start
    worker_without_redis(*args)


def test_a_worker_tells_the_supervisor_its_pid_once_it_serves(tmp_path):
    """A worker writes its pid to the ready pipe once it listens, not before (so the supervisor counts it as
    serving, and keeps it up past a sibling's crash limit, only once it does), then drains on SIGTERM and exits 0."""
    from gateway.policy.load import load_policy
    from gateway.server import claim_port, listen_sockets
    from gateway.supervisor import HANDLED, PID_BYTES, blocked_signals

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    held = claim_port("127.0.0.1", 0)
    ready_r, ready_w = os.pipe()
    process = None
    try:
        sockets = listen_sockets("127.0.0.1", held[0].getsockname()[1], reuse_port=True, listen=False)
        with blocked_signals(HANDLED):
            process = FORK.Process(target=worker_slow_to_listen, args=(
                policy, load_policy(policy), "127.0.0.1", sockets, [ready_r], ready_w, os.getpid()))
            process.start()
        for sock in sockets:
            sock.close()
        told, _, _ = select.select([ready_r], [], [], 30)
        assert told, "the worker never said it serves"
        assert int.from_bytes(os.read(ready_r, PID_BYTES), "little") == process.pid
        socket.create_connection(("127.0.0.1", held[0].getsockname()[1]), timeout=5).close()     # it listens
        process.terminate()
        process.join(20)
        assert process.exitcode == 0
    finally:
        if process is not None and process.exitcode is None:
            kill(process.pid)
        for sock in held:
            sock.close()
        os.close(ready_r)
        os.close(ready_w)


def test_a_stop_while_a_worker_waits_for_a_valid_policy_exits_0(tmp_path):
    """A worker started on a policy file made invalid meanwhile waits for a valid one; a SIGTERM, even one sent
    before the wait began, ends it with status 0, a stop asked for, not a failure."""
    from gateway.policy.load import load_policy
    from gateway.server import listen_sockets
    from gateway.supervisor import HANDLED, blocked_signals

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    started = load_policy(policy)
    policy.write_text("version: 1\nmodels: {}\n")
    ready_r, ready_w = os.pipe()
    sockets = listen_sockets("127.0.0.1", 0, reuse_port=True, listen=False)
    try:
        with blocked_signals(HANDLED):
            process = FORK.Process(target=worker_without_redis, args=(
                policy, started, "127.0.0.1", sockets, [ready_r], ready_w, os.getpid()))
            process.start()
        process.terminate()                 # held, blocked, until the wait for a valid file lets it in
        process.join(20)
        assert process.exitcode == 0
    finally:
        for sock in sockets:
            sock.close()
        os.close(ready_r)
        os.close(ready_w)


def test_workers_without_redis_on_measured_gpus_share_their_energy_through_their_folder(tmp_path):
    """Each worker samples the policy's GPUs; without Redis they share the GPUs' energy out through their private
    folder (checked against a fake GPU in test_bench_gpu_energy.py): start-up says where, not that the books add
    up N times, and the folder goes at exit."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("upstream_model: sim-small}", "upstream_model: sim-small, gpus: {source: nvml}}"))
    gateway = Workers(policy).wait_serving()
    try:
        text = gateway.text()
        assert "without Redis: the cache, limits, budgets and outcomes are each worker's own" in text
        assert "each worker books the whole energy" not in text
        folder = Path(re.search(r"share the energy of the GPUs they sample through (\S+)", text).group(1))
        assert folder.is_dir() and folder.stat().st_mode & 0o777 == 0o700
        assert list(folder.glob("*.sock")) == []                # Prometheus is off: no metrics sockets
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(30) == 0, gateway.text()
        assert not folder.exists()
    finally:
        gateway.stop()


def test_workers_with_redis_and_prometheus_off_make_no_folder(tmp_path, redis_server):
    """With Redis (their GPU energy words go there) and no metrics sockets, the workers need no folder: none is
    made, so a parent killed by SIGKILL leaves none behind (nothing in the workers would have removed it)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + f"store: {{redis_url: '{redis_server.url}'}}\n")
    gateway = Workers(policy, environ={"TMPDIR": str(tmpdir)}).wait_serving()
    workers = gateway.pids()
    try:
        assert list(tmpdir.glob("gateway-workers-*")) == []
        gateway.process.kill()
        gateway.process.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), gateway.text, timeout_s=10)
        assert list(tmpdir.glob("gateway-workers-*")) == []
    finally:
        gateway.stop()


def test_prometheus_scraping_several_workers_counts_every_request_once(tmp_path):
    """With --workers 2 each scrape reaches one worker, which gathers the other's series too: a real Prometheus
    scraping the port sums gateway_requests_total to the requests sent, scrape after scrape, one series per
    worker (labelled gateway_worker), whichever worker it reached; the workers' socket folder is private and
    gone once the gateway stops."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "telemetry: {prometheus: true}\n")
    gateway = Workers(policy, environ={"OTEL_SDK_DISABLED": "false"}).wait_serving()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{gateway.port}")
    try:
        folder = Path(re.search(r"through their sockets in (\S+)\)", gateway.text()).group(1))
        assert folder.stat().st_mode & 0o777 == 0o700
        served = set()
        for _ in range(20):             # a connection each: the kernel spreads them over the workers
            request = urllib.request.Request(f"{gateway.base_url}/v1/chat/completions", method="POST",
                                             data=b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}',
                                             headers={"Content-Type": "application/json", "Connection": "close"})
            with contextlib.suppress(urllib.error.HTTPError):      # the model's port is closed: a 502
                urllib.request.urlopen(request, timeout=5)
        for _ in range(10):
            with urllib.request.urlopen(f"{gateway.base_url}/metrics", timeout=5) as response:
                text = response.read().decode()
            per_worker = {labels[WORKER_LABEL]: value for name, labels, value in scraped(text)
                          if name == "gateway_requests_total"}
            served.add(tuple(sorted(per_worker)))
            assert sum(per_worker.values()) == 20 and len(per_worker) == 2, text
        assert served == {("0", "1")}
        prometheus.wait_ready()
        total = "sum(gateway_requests_total)"
        assert prometheus.wait_for(total, {(): 20.0}) == {(): 20.0}
        assert prometheus.query(f"count by ({WORKER_LABEL}) (gateway_requests_total)") == {
            ((WORKER_LABEL, "0"),): 1.0, ((WORKER_LABEL, "1"),): 1.0}
        time.sleep(2.5)                 # more scrapes, each reaching either worker: the sum holds
        assert prometheus.query(total) == {(): 20.0}
        assert prometheus.query("min(min_over_time(up[5s]))") == {(): 1.0}      # every scrape was taken whole
    finally:
        prometheus.stop()
        gateway.process.terminate()
        gateway.process.wait(10)
        gateway.stop()
    assert not folder.exists()


def scraped(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample of an exposition, failing on one written twice."""
    found = [(sample.name, sample.labels, sample.value)
             for family in text_string_to_metric_families(text) for sample in family.samples]
    keys = [(name, tuple(sorted(labels.items()))) for name, labels, _ in found]
    assert len(keys) == len(set(keys)), "a sample written twice"
    return found
