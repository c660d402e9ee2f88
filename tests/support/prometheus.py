"""A real Prometheus server (the `prometheus` OS package) scraping one target, for end-to-end checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.support.redis_server import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    """A real Prometheus server scraping one target every second, with its data in a temporary folder."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: gateway\n    metrics_path: /metrics\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
            return response.read()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}")
            try:
                self.get("/-/ready")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout_s} s")

    def query(self, promql: str) -> dict[tuple, float]:
        """An instant query through /api/v1/query: {sorted label pairs: value}."""
        answer = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
        assert answer["status"] == "success", answer
        return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in answer["data"]["result"]}

    def wait_for(self, promql: str, expected: dict[tuple, float], timeout_s: float = 10.0) -> dict[tuple, float]:
        """Poll a query until it returns `expected` (scrapes come every second); return the last result."""
        deadline = time.monotonic() + timeout_s
        while (result := self.query(promql)) != expected and time.monotonic() < deadline:
            time.sleep(0.25)
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
