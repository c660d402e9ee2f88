"""`gateway run --metrics-port`: GET /metrics on a port of its own (kept off the Service and the ingress: its series
name every tenant, its spend and budgets), not on the API's; one process and `--workers 2`."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.peers import WORKER_LABEL
from tests.support.redis_server import free_port
from tests.test_workers import POLICY, REPO, Workers


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_are_served_on_their_own_port_alone(tmp_path: Path, workers: int):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    metrics_port = free_port()
    gateway = Workers(policy, workers, environ={"GATEWAY_PROMETHEUS": "1", "OTEL_SDK_DISABLED": "false",
                                                "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"},
                      args=("--metrics-port", str(metrics_port)))
    try:
        gateway.wait_serving(workers)
        assert f"GET /metrics on http://127.0.0.1:{metrics_port}" in gateway.text()
        assert get(f"{gateway.base_url}/v1/models")[0] == 200
        status, body = get(f"{gateway.base_url}/metrics")
        assert status == 404 and "metrics port" in body
        for _ in range(4):          # with two workers, the scrapes reach either; each gathers every worker's
            status, body = get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200
            names = {family.name for family in text_string_to_metric_families(body)}
            assert "gateway_model_max_concurrency" in names, sorted(names)     # the policy's models, as gauges
            if workers == 2:
                slots = {sample.labels.get(WORKER_LABEL) for family in text_string_to_metric_families(body)
                         for sample in family.samples}
                assert {"0", "1"} <= slots
        assert get(f"http://127.0.0.1:{metrics_port}/v1/models")[0] == 404     # the API is not served there
        assert get(f"{gateway.base_url}/healthz")[0] == 200
    finally:
        gateway.stop()


def test_a_metrics_port_that_is_the_api_port_is_refused_in_one_line(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
                           "--port", str(port), "--metrics-port", str(port)], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "--metrics-port must differ from --port" in done.stderr
