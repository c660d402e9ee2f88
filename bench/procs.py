"""Child processes of a bench run: started pinned, waited for, measured through /proc, stopped."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import taskset_prefix

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchSetupError(RuntimeError):
    """A process the bench needs did not start or did not become ready."""


@dataclass
class Proc:
    """One child process and the log file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of the process's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to its own process group if it has not exited within `timeout_s`."""
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def spawn(name: str, argv: Sequence[str], *, cpus: tuple[int, ...], logdir: Path,
          env: Mapping[str, str] | None = None) -> Proc:
    """Start `argv` pinned to `cpus`, in its own session, output to `logdir/name.log`."""
    log_path = logdir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen([*taskset_prefix(cpus), *argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None,
                                 start_new_session=True)
    return Proc(name, popen, log_path)


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def wait_until(proc: Proc, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `ready` until it is true; raise with the process's output if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchSetupError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchSetupError(f"{proc.name} not ready after {timeout_s:.0f} s:\n{proc.tail()}")


def port_open(port: int) -> Callable[[], bool]:
    """A readiness check: something accepts TCP connections on 127.0.0.1:port."""
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    return check


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 2xx."""
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError):
            return False
    return check


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from VmRSS in /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchSetupError(f"no VmRSS for process {pid}")


def cpu_s(pid: int, thread_id: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads."""
    path = f"/proc/{pid}/task/{thread_id}/stat" if thread_id is not None else f"/proc/{pid}/stat"
    with open(path, encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pin_threads(pid: int, cpus: tuple[int, ...]) -> None:
    """Move every thread of a running process onto `cpus` (no-op when unpinned)."""
    if not cpus:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            continue                    # the thread ended meanwhile


def raise_fd_limit() -> None:
    """Allow as many open files as the hard limit permits (1,000 streams need a few thousand sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
