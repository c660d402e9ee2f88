"""A real 3-master Redis Cluster on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import free_port

MASTERS = 3


def cluster_binaries() -> tuple[str, str] | None:
    """Paths of redis-server and redis-cli, or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


@dataclass
class RedisCluster:
    """Three cluster-enabled redis-server processes joined with `redis-cli --cluster create`."""

    ports: list[int]
    #: explicit cluster-bus ports (redis >= 7): the default, port + 10000, overflows for high free ports
    bus_ports: list[int]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="redis-cluster-")))
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls) -> RedisCluster:
        """A cluster (not started yet) whose client and bus ports are all free and distinct."""
        ports = [free_port() for _ in range(2 * MASTERS)]      # distinct: free_port never repeats
        return cls(ports=ports[:MASTERS], bus_ports=ports[MASTERS:])

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def url(self) -> str:
        """A URL of one node; a cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout_s: float = 20.0) -> RedisCluster:
        """Start the nodes, create the cluster, and wait until every node reports cluster_state:ok."""
        binaries = cluster_binaries()
        if binaries is None:
            raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster")
        server, cli = binaries
        try:
            for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
                self.processes.append(self._start_node(server, port, bus_port))
            deadline = time.monotonic() + timeout_s
            for port in self.ports:
                self._wait(cli, port, ["PING"], "PONG", deadline)
            self._create(cli)
            for port in self.ports:
                self._wait(cli, port, ["CLUSTER", "INFO"], "cluster_state:ok", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, server: str, port: int, bus_port: int) -> subprocess.Popen:
        """One cluster-enabled node; its log goes to `workdir/PORT/redis.log`."""
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            [server, "--port", str(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
             "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no", "--dir", str(node_dir),
             "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _create(self, cli: str) -> None:
        """Assign the 16384 slots across the masters (no replicas)."""
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        result = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                                 "--cluster-yes"], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")

    @staticmethod
    def _wait(cli: str, port: int, command: list[str], expected: str, deadline: float) -> None:
        """Poll one node with redis-cli until its reply contains `expected`."""
        reply = ""
        while time.monotonic() < deadline:
            result = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *command],
                                    capture_output=True, text=True, timeout=5)
            reply = result.stdout
            if expected in reply:
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis node {port} never answered {expected!r} to {command}; last reply: {reply!r}")

    def stop(self) -> None:
        """Kill every node and remove the working directory."""
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
