"""The machine the bench runs on: its description, free ports, and which cores do what."""

from __future__ import annotations

import os
import platform
import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    """What the results are labelled with: absolute figures only mean something on this machine."""

    nproc: int
    cpu_model: str
    python: str
    kernel: str

    @classmethod
    def describe(cls) -> Machine:
        return cls(nproc=os.cpu_count() or 1, cpu_model=cpu_model(), python=platform.python_version(),
                   kernel=platform.release())

    def label(self) -> str:
        return f"{self.nproc} × {self.cpu_model}, Python {self.python}, Linux {self.kernel}"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first `model name` in /proc/cpuinfo, or the platform's processor string."""
    try:
        with open(cpuinfo, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


#: the lowest port handed out: above the well-known and registered services most hosts run
PORT_FLOOR = 10_000
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never the same one twice in a process.

    It is picked below the kernel's ephemeral range: a port from that range can be taken by any outgoing
    connection (a client's local port) between this check and the bind of the process meant to listen
    on it, which then fails with "address already in use".
    """
    ceiling = _ephemeral_floor()
    for _ in range(200 if ceiling - PORT_FLOOR > 1000 else 0):
        port = random.randrange(PORT_FLOOR, ceiling)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:                    # no room below the range: let the kernel pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_floor() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass(frozen=True)
class Cores:
    """Which CPUs the load generator side and the server under test are pinned to (empty: unpinned)."""

    load: tuple[int, ...]
    server: tuple[int, ...]
    every: tuple[int, ...]

    @classmethod
    def plan(cls) -> Cores:
        """Load generator on the first core, the server on the rest; no pinning on one core or without taskset."""
        every = tuple(sorted(os.sched_getaffinity(0)))
        if len(every) < 2 or shutil.which("taskset") is None:
            return cls(load=(), server=(), every=())
        return cls(load=every[:1], server=every[1:], every=every)

    @property
    def scaling(self) -> tuple[int, ...]:
        """Where multi-worker gateways run: the server cores when there are two, else every core."""
        return self.server if len(self.server) >= 2 else self.every

    def describe(self) -> str:
        if not self.every:
            return "unpinned (one core or no taskset)"
        return f"load generator, nginx, sinks on CPU {_cpus(self.load)}; server under test on CPU {_cpus(self.server)}"


def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def taskset_prefix(cpus: tuple[int, ...]) -> list[str]:
    """`taskset -c CPUS` to put in front of a command, or nothing when unpinned."""
    return ["taskset", "-c", _cpus(cpus)] if cpus else []
