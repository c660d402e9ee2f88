"""What an operator reads of `gateway run --workers N` as one gateway: the admin API answered by whichever worker a
connection reaches, and each worker's telemetry told apart from the others'."""

from __future__ import annotations

import http.client
import json
import time

from tests.support.otlp_receiver import OtlpReceiver
from tests.support.policies import sha256_hex
from tests.test_workers import ADMIN_TOKEN, POLICY, Workers, wait_for

KEY = "sk-views-alpha"


def test_workers_sharing_one_operator_set_service_instance_id_export_otlp_series_apart(tmp_path):
    """OTEL_RESOURCE_ATTRIBUTES naming service.instance.id (as deploy/k8s sets it, to the pod's name) reaches every
    worker: each must still export under an instance of its own, else N workers' cumulative series share one
    identity and a backend sees each counter jump between the workers' values (read as resets)."""
    receiver = OtlpReceiver().start()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = Workers(policy, environ={
        "OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "OTEL_TRACES_EXPORTER": "none", "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pod-a"}).wait_serving()
    try:
        def instances() -> set[str]:
            return {metric.resource.get("service.instance.id") for export in receiver.metric_exports
                    for metric in export}
        wait_for(lambda: len(receiver.metric_exports) >= 8, gateway.text, timeout_s=8)   # both workers, 4 each
        seen = instances()
        assert len(seen) == 2, f"{len(receiver.metric_exports)} exports of 2 workers under {seen}"
        assert all(instance.startswith("pod-a") for instance in seen), seen
    finally:
        gateway.stop()
        receiver.stop()


def tenant_policy() -> str:
    return POLICY + f"""tenants:
  alpha:
    keys_sha256: ["{sha256_hex(KEY)}"]
    limits: {{requests_per_minute: 1000}}
"""


def admin_get(port: int, path: str) -> dict:
    """One admin GET on a fresh connection: it may reach any worker."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"})
        response = connection.getresponse()
        return json.loads(response.read())
    finally:
        connection.close()


def test_admin_tenants_of_workers_without_redis_says_whose_counts_it_shows(tmp_path):
    """Without Redis each worker counts its own requests: GET /admin/tenants then answers with whichever worker's
    counts the connection reached. Two answers that disagree must say so (which worker, of how many) rather than
    both read as the gateway's own figures."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(tenant_policy())
    gateway = Workers(policy).wait_serving()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)   # kept alive: one worker
        for _ in range(3):
            connection.request("POST", "/v1/chat/completions", body=json.dumps(
                {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            connection.getresponse().read()         # the model's port is closed: a 502, admitted and counted
        connection.close()
        answers = {}
        deadline = time.monotonic() + 8
        while len(answers) < 2 and time.monotonic() < deadline:
            body = admin_get(gateway.port, "/admin/tenants")
            answers[body["tenants"][0]["usage"]["requests"]] = body
        assert set(answers) == {0, 3}, answers      # the two workers' views: one saw all 3, the other none
        for requests, body in answers.items():
            assert "worker" in body, f"an answer counting {requests} request(s) says nothing of whose count it is: {body}"
    finally:
        gateway.stop()
