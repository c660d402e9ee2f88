"""The machine the bench runs on: its description, free ports, and which cores do what."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from dataclasses import dataclass


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
