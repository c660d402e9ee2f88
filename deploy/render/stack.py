"""The stack the dashboards are rendered from: simulated models, the gateway, and the OS `prometheus` binary.

Each part runs as its own process, as in a deployment: `gateway simulate-backend`,
`gateway run` on a policy with three tenants, and Prometheus scraping the
gateway's `/metrics` every second under the job name the dashboards expect.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.machine import free_port
from gateway.simulator import SimConfig
from gateway.tenancy.identity import sha256_hex

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_INTERVAL_S = 1

#: tenant -> API key the traffic uses (demo keys, only ever valid on this throw-away stack)
TENANT_KEYS = {"acme": "render-key-acme", "globex": "render-key-globex", "initech": "render-key-initech"}
#: tenant -> priority: with small's few call slots, acme's calls wait least and initech's (batch) most
TENANT_PRIORITY = {"acme": 2, "globex": 1, "initech": 0}
#: each tenant's daily budget per minute of traffic, USD: sized so the budget panels show a share, not a sliver
BUDGET_USD_PER_TRAFFIC_MINUTE = 0.25

#: name -> (upstream model, simulator settings): small fails now and then, medium throttles and hangs,
#: large (the last fallback) fails rarely, so a few requests exhaust their fallbacks
MODELS = {
    "small": ("sim-small-1b", dict(ttft_ms=25, tpot_ms=2, jitter=0.4, error_rate=0.05)),
    "medium": ("sim-medium-8b", dict(ttft_ms=60, tpot_ms=5, jitter=0.4, rate_limit_rate=0.03, hang_rate=0.005)),
    "large": ("sim-large-70b", dict(ttft_ms=150, tpot_ms=9, jitter=0.4, error_rate=0.02)),
}

POLICY = """\
version: 1
models:
  small:
    endpoint: {small}
    upstream_model: sim-small-1b
    size_b: 1
    tier: 1
    max_concurrency: 2
    price: {{input_per_mtok: 0.05, output_per_mtok: 0.10}}
    latency_prior: {{ttft_ms: 25, tpot_ms: 2}}
    timeouts: {{connect_s: 1, first_byte_s: 1.5, total_s: 10}}
  medium:
    endpoint: {medium}
    upstream_model: sim-medium-8b
    size_b: 8
    tier: 2
    context_window: 32768
    price: {{input_per_mtok: 0.30, output_per_mtok: 0.60}}
    latency_prior: {{ttft_ms: 60, tpot_ms: 5}}
    timeouts: {{connect_s: 1, first_byte_s: 1.5, total_s: 10}}
  large:
    endpoint: {large}
    upstream_model: sim-large-70b
    size_b: 70
    tier: 3
    context_window: 131072
    price: {{input_per_mtok: 2.50, cached_input_per_mtok: 1.25, output_per_mtok: 10.00}}
    latency_prior: {{ttft_ms: 150, tpot_ms: 9}}
    timeouts: {{connect_s: 1, first_byte_s: 1.5, total_s: 10}}
routes:
  - name: chat-default
    match: {{models: ["auto", "gpt-4o-mini"], endpoints: [chat, completions]}}
    candidates: [small, medium, large]
    sla: {{p95_latency_ms: 1500, p95_ttft_ms: 400, min_tier: 1, on_violation: best_effort}}
    fallback: [large]
    cache: {{enabled: true, ttl_s: 600}}
  - name: chat-smart
    match: {{models: ["gpt-4o", "smart"], endpoints: [chat]}}
    candidates: [medium, large]
    sla: {{p95_latency_ms: 900, min_tier: 2, on_violation: best_effort}}
    fallback: [large]
    cache: {{enabled: true, ttl_s: 600}}
  - name: embeddings
    match: {{models: ["text-embedding-3-small"], endpoints: [embeddings]}}
    candidates: [small]
    fallback: [medium]
tenants:
{tenants}
routing: {{queue_timeout_ms: 250}}
"""

TENANT = ("  {name}:\n    keys_sha256: [{key_sha256}]\n"
          "    limits: {{requests_per_minute: 100000, tokens_per_minute: 100000000}}\n"
          "    budget: {{usd_per_day: {budget}}}\n    priority: {priority}\n")


class StackError(RuntimeError):
    """A part of the stack did not start."""


def daily_budget_usd(traffic_minutes: float) -> str:
    """Each tenant's daily budget for a run of `traffic_minutes`, in plain decimal USD."""
    return f"{max(1.0, traffic_minutes) * BUDGET_USD_PER_TRAFFIC_MINUTE:.2f}"


def policy_text(model_urls: dict[str, str], budget_usd: str) -> str:
    """The stack's policy YAML, its models at `model_urls`, each tenant with a daily budget of `budget_usd`."""
    tenants = "".join(TENANT.format(name=name, key_sha256=sha256_hex(key), budget=budget_usd,
                                    priority=TENANT_PRIORITY[name])
                      for name, key in TENANT_KEYS.items())
    return POLICY.format(tenants=tenants.rstrip("\n"), **model_urls)


def simulator_command() -> list[str]:
    """`gateway simulate-backend` serving every model of MODELS on a free port, each with its own settings."""
    command = [sys.executable, "-m", "gateway", "simulate-backend"]
    for index, (upstream, _settings) in enumerate(MODELS.values()):
        command += ["--port", "0", "--model", upstream, "--seed", str(index)]
    defaults = SimConfig(name="defaults")
    for key in sorted({key for _, settings in MODELS.values() for key in settings}):
        for _, settings in MODELS.values():        # a setting given once would apply to every model
            command += [f"--{key.replace('_', '-')}", str(settings.get(key, getattr(defaults, key)))]
    return command


def wait_http(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise StackError(f"{url} did not answer within {timeout_s} s")


def prometheus_command(workdir: Path, target: str, port: int, job: str = "gateway") -> list[str]:
    """Write a config scraping `target` every SCRAPE_INTERVAL_S as `job`; the command serving it on `port`."""
    if not Path(PROMETHEUS).exists():
        raise StackError("the `prometheus` binary is not installed (Debian package `prometheus`)")
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: {SCRAPE_INTERVAL_S}s, scrape_timeout: {SCRAPE_INTERVAL_S}s, "
        f"evaluation_interval: {SCRAPE_INTERVAL_S}s}}\n"
        f"scrape_configs:\n  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]\n")
    return [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]


@dataclass
class Stack:
    """The running processes, their logs and their addresses."""

    workdir: Path
    budget_usd: str = "100"
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list = field(default_factory=list)
    gateway_url: str = ""
    prometheus_url: str = ""

    def start(self) -> Stack:
        """Start simulators, gateway and Prometheus; stop what started if one part fails."""
        try:
            urls = self._start_simulators()
            self._start_gateway(urls)
            self._start_prometheus()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None,
               stdout: int | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("wb")
        self.logs.append(log)
        process = subprocess.Popen(command, env=env, stdout=stdout or log, stderr=log)
        self.processes.append(process)
        return process

    def _start_simulators(self) -> dict[str, str]:
        process = self._spawn("simulators", simulator_command(), stdout=subprocess.PIPE)
        by_upstream = {upstream: name for name, (upstream, _) in MODELS.items()}
        urls: dict[str, str] = {}
        while len(urls) < len(MODELS):
            line = process.stdout.readline().decode()
            if not line:
                raise StackError(f"the simulators exited: see {self.workdir / 'simulators.log'}")
            found = re.match(r"simulating (\S+) at (\S+)", line)
            if found:
                urls[by_upstream[found[1]]] = found[2]
        return urls

    def _start_gateway(self, model_urls: dict[str, str]) -> None:
        policy = self.workdir / "policy.yaml"
        policy.write_text(policy_text(model_urls, self.budget_usd))
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        env.update(GATEWAY_PROMETHEUS="1", GATEWAY_LOG_LEVEL="WARNING")
        process = self._spawn("gateway", [sys.executable, "-m", "gateway", "run", "--policy", str(policy),
                                          "--host", "127.0.0.1", "--port", str(port)], env=env)
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.gateway_url}/readyz", process)

    def _start_prometheus(self) -> None:
        port = free_port()
        command = prometheus_command(self.workdir, self.gateway_url.removeprefix("http://"), port)
        process = self._spawn("prometheus", command)
        self.prometheus_url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.prometheus_url}/-/ready", process)

    def stop(self) -> None:
        """Stop every process this stack started, newest first."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()
