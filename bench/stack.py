"""Every process a bench run needs, started on demand (all at once), checked, and stopped at the end.

Upstreams: nginx (canned answers), the OTLP sink, simulated models, redis-server.
Contenders: the baseline proxy and several gateways on the same policy,
differing only in environment, worker count or profiler.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.machine import Cores, free_port
from bench.nginx import STREAM_PREFIX, nginx_command
from bench.procs import BenchSetupError, Proc, http_ok, port_open, python_module, spawn, wait_until

POLICY_TEMPLATE = Path(__file__).parent / "policies" / "realistic.yaml"
#: the placeholder ports written in the policy file, by the upstream that replaces them
PLACEHOLDER_PORTS = {"nginx": 18080, "relay": 18091, "slow": 18092, "replay": 18093}
#: the tenants' API keys (their SHA-256 hashes are in the policy)
API_KEYS = ("sk-bench-alpha", "sk-bench-beta", "sk-bench-gamma")
#: the simulated models: name -> (policy port key, simulate-backend settings)
SIMULATED = {
    "sim-relay": ("relay", {"--ttft-ms": "20", "--tpot-ms": "10"}),
    "sim-slow": ("slow", {"--ttft-ms": "20", "--tpot-ms": "1000"}),
    "sim-replay": ("replay", {"--ttft-ms": "5", "--tpot-ms": "0.2"}),
}
RELAY_TPOT_S = 0.010


@dataclass(frozen=True)
class Launch:
    """How to start one process: its command, CPUs, readiness check and environment."""

    argv: list[str]
    cpus: tuple[int, ...]
    ready: Callable[[], bool]
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class GatewaySpec:
    """One gateway contender: environment changes, workers, CPUs and whether it runs under cProfile."""

    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    all_cores: bool = False
    redis: bool = False
    profiled: bool = False


GATEWAYS = {
    "gateway": GatewaySpec(),
    "gateway-notel": GatewaySpec(env={"OTEL_SDK_DISABLED": "true"}),
    "gateway-sampled": GatewaySpec(env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                        "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    "gateway-redis": GatewaySpec(redis=True),
    "gateway-redis-notel": GatewaySpec(env={"OTEL_SDK_DISABLED": "true"}, redis=True),
    "gateway-w2": GatewaySpec(workers=2, all_cores=True),
    "gateway-profiled": GatewaySpec(profiled=True),
    "gateway-profiled-notel": GatewaySpec(env={"OTEL_SDK_DISABLED": "true"}, profiled=True),
}
UPSTREAMS = ("nginx", "sink", "sims", "redis")


class Stack:
    """The processes of one bench run; `ensure(...)` starts what is not running yet."""

    def __init__(self, cores: Cores) -> None:
        self.cores = cores
        self.workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        self.ports: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}
        self.policy_path = self.workdir / "policy.yaml"

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process, contenders first, and remove the work directory."""
        for name in sorted(self.procs, key=lambda n: n in UPSTREAMS):
            self.procs[name].stop()
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # addresses ------------------------------------------------------------
    def port(self, name: str) -> int:
        if name not in self.ports:
            self.ports[name] = free_port()
        return self.ports[name]

    def url(self, name: str) -> str:
        """The chat completions URL of a contender or of nginx ('direct')."""
        if name == "direct":
            return f"http://127.0.0.1:{self.port('nginx')}/v1/chat/completions"
        return f"http://127.0.0.1:{self.port(name)}/v1/chat/completions"

    def stream_url(self, name: str) -> str:
        if name == "direct":
            return f"http://127.0.0.1:{self.port('nginx')}{STREAM_PREFIX}/v1/chat/completions"
        return self.url(name)

    def sim_url(self, sim: str) -> str:
        return f"http://127.0.0.1:{self.port(SIMULATED[sim][0])}/v1/chat/completions"

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    # starting -------------------------------------------------------------
    def ensure(self, *names: str) -> None:
        """Start every named process (and what it needs) that is not running; wait until all serve."""
        wanted = list(dict.fromkeys(n for name in names for n in self._with_needs(name)))
        pending: list[tuple[Proc, Callable[[], bool]]] = []
        for name in wanted:
            if name in self.procs:
                continue
            proc, ready = self._start(name)
            self.procs[name] = proc
            pending.append((proc, ready))
        for proc, ready in pending:
            wait_until(proc, ready, timeout_s=90)

    def _with_needs(self, name: str) -> list[str]:
        if name in GATEWAYS:
            return ["nginx", "sink", "sims", *(["redis"] if GATEWAYS[name].redis else []), name]
        if name == "baseline":
            return ["nginx", "baseline"]
        if name == "baseline-slow":
            return ["sims", "baseline-slow"]
        return [name]

    def _start(self, name: str) -> tuple[Proc, Callable[[], bool]]:
        """Spawn one process; returns it and its readiness check."""
        if name in GATEWAYS:
            launch = self._gateway(name, GATEWAYS[name])
        elif name in ("nginx", "sink", "sims", "redis", "baseline", "baseline-slow"):
            launch = getattr(self, "_" + name.replace("-", "_"))()
        else:
            raise BenchSetupError(f"unknown process {name!r}")
        proc = spawn(name, launch.argv, cpus=launch.cpus, logdir=self.workdir, env=launch.env)
        return proc, launch.ready

    def _nginx(self) -> Launch:
        port = self.port("nginx")
        return Launch(nginx_command(self.workdir, port), self.cores.load, port_open(port))

    def _sink(self) -> Launch:
        port = self.port("sink")
        return Launch(python_module("bench.otlp_sink", "--port", str(port)), self.cores.load, port_open(port))

    def _sims(self) -> Launch:
        argv = python_module("gateway", "simulate-backend", "--context-window", "262144")
        for sim, (port_key, settings) in SIMULATED.items():
            argv += ["--port", str(self.port(port_key)), "--model", sim]
            for option, value in settings.items():
                argv += [option, value]
        last_port = self.port(list(SIMULATED.values())[-1][0])      # the models start in order
        return Launch(argv, self.cores.load, port_open(last_port))

    def _redis(self) -> Launch:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchSetupError("redis-server is not installed (apt-get install redis-server)")
        port = self.port("redis")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        return Launch(argv, self.cores.load, port_open(port))

    def _baseline(self) -> Launch:
        nginx = f"http://127.0.0.1:{self.port('nginx')}"
        return self._proxy("baseline", "--upstream", f"{nginx}/v1", "--stream-upstream", f"{nginx}{STREAM_PREFIX}/v1")

    def _baseline_slow(self) -> Launch:
        upstream = f"http://127.0.0.1:{self.port(SIMULATED['sim-slow'][0])}/v1"
        return self._proxy("baseline-slow", "--upstream", upstream, "--model", "sim-slow")

    def _proxy(self, name: str, *args: str) -> Launch:
        port = self.port(name)
        return Launch(python_module("bench.baseline_proxy", "--port", str(port), *args), self.cores.server,
                      port_open(port))

    def _gateway(self, name: str, spec: GatewaySpec) -> Launch:
        self._write_policy()
        port = self.port(name)
        args = ["--log-level", "WARNING", "run", "--policy", str(self.policy_path), "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(spec.workers)]
        if spec.profiled:
            argv = python_module("bench.profiled_gateway", "--out", str(self.profile_path(name)), "--", *args)
        else:
            argv = python_module("gateway", *args)
        cpus = self.cores.scaling if spec.all_cores else self.cores.server
        return Launch(argv, cpus, http_ok(f"http://127.0.0.1:{port}/readyz"), self.gateway_env(spec))

    def gateway_env(self, spec: GatewaySpec) -> dict[str, str]:
        """A clean environment: telemetry exported to the sink, Redis only where the spec asks."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GATEWAY_"))}
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port('sink')}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "gateway-bench",
                    "GATEWAY_LOG_LEVEL": "WARNING"})
        if spec.redis:
            env["GATEWAY_REDIS_URL"] = f"redis://127.0.0.1:{self.port('redis')}/0"
        env.update(spec.env)
        return env

    def profile_path(self, name: str) -> Path:
        return self.workdir / f"{name}.prof"

    def _write_policy(self) -> None:
        if self.policy_path.exists():
            return
        text = POLICY_TEMPLATE.read_text()
        for key, placeholder in PLACEHOLDER_PORTS.items():
            text = text.replace(f"127.0.0.1:{placeholder}", f"127.0.0.1:{self.port(key)}")
        self.policy_path.write_text(text)

    def send_signal(self, name: str, signum: signal.Signals) -> None:
        os.kill(self.pid(name), signum)

    def redis_commands(self) -> dict[str, int]:
        """How many times redis-server has run each command so far (INFO commandstats)."""
        client = redis.Redis(port=self.port("redis"))
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}

    def sink_stats(self) -> dict:
        """What the OTLP sink has received so far: {signal: {requests, bytes}}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port('sink')}/stats", timeout=5) as response:
            return json.loads(response.read())
