"""A security review of the gateway: what a model server, a tenant or an unauthenticated client can make it hold,
spend or leak. Each test is a defect found by the review, proven against real parts (the gateway, a scripted model
server)."""

from __future__ import annotations

import time

import pytest

from tests.support.harness import raw_model_gateway, reset_raw_model
from tests.support.raw_calls import post
from tests.support.raw_upstream import RawUpstream, http_head

MIB = 1024 * 1024
#: what `server.max_answer_bytes` is set to in these tests: a model's answer past it is refused, not held
ANSWER_CAP_BYTES = 1 * MIB
TAIL = f"server: {{{{max_answer_bytes: {ANSWER_CAP_BYTES}}}}}\n"


class CountingUpstream(RawUpstream):
    """A scripted model server that also counts the bytes of its answers the gateway took before hanging up."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_bytes = 0

    async def _serve(self, reader, writer) -> None:
        original_write = writer.write

        def write(data: bytes) -> None:
            self.sent_bytes += len(data)
            original_write(data)

        writer.write = write
        await super()._serve(reader, writer)


@pytest.fixture(scope="module")
def capped():
    with raw_model_gateway(first_byte_s=1, total_s=10, tail=TAIL, raw=CountingUpstream()) as running:
        yield running


@pytest.fixture
def raw_gw(capped):
    harness, raw = capped
    reset_raw_model(harness, raw)
    raw.sent_bytes = 0
    return harness, raw


def endless_body(parts: int, part: bytes = b" " * MIB, then_wait_s: float = 3.0) -> list[tuple[bytes, float]]:
    """`parts` MiB of a body written as fast as the gateway takes them, then silence (the script ends, and the
    connection closes, after `then_wait_s`)."""
    return [(part, 0.0)] * parts + [(b"", then_wait_s)]


def test_a_non_streamed_answer_declaring_a_terabyte_is_refused_at_its_head():
    """A model server whose 200 declares a Content-Length of 1 TiB (a broken or hostile server) is a broken answer
    at once (502 `upstream_bad_response`): the gateway must not start buffering a body it could never hold. Today
    it reads on into memory until the server pauses, and answers a timeout."""
    with raw_model_gateway(first_byte_s=1, total_s=10) as (harness, raw):
        raw.script = [(http_head(200, {"Content-Type": "application/json"}, 2 ** 40), 0.0)] + endless_body(8)
        started_s = time.monotonic()
        answer = post(harness, "raw-only", stream=False)
        assert answer.status_code == 502, (answer.status_code, answer.text[:300])
        assert answer.json()["error"]["code"] == "upstream_bad_response"
        assert time.monotonic() - started_s < 0.9        # refused on the head, not after first_byte_s of silence


@pytest.mark.parametrize(("status", "stream"), [(200, False), (500, False), (500, True)],
                         ids=["answer", "error-body", "stream-error-body"])
def test_a_model_answer_without_an_end_is_cut_at_the_answer_cap_not_held_in_memory(raw_gw, status, stream):
    """A non-streamed answer (or the error body of any answer) that keeps coming without a length is read into
    memory whole: a model server sending an endless body makes the gateway hold all of it, for up to the model's
    total_s (gigabytes on a fast link: one such answer can take the process down, with every tenant's requests).
    Past `server.max_answer_bytes` the answer must be a broken one (502 `upstream_bad_response`), and the gateway
    must stop reading it."""
    harness, raw = raw_gw
    raw.script = [(http_head(status, {"Content-Type": "application/json"}), 0.0)] + endless_body(16)
    answer = post(harness, "raw-only", stream=stream)
    assert answer.status_code == 502, (answer.status_code, answer.text[:300])
    assert answer.json()["error"]["code"] == "upstream_bad_response"
    assert raw.sent_bytes < 8 * MIB, raw.sent_bytes      # the gateway stopped taking it well before its end


# /metrics -----------------------------------------------------------------------------------------------------------

KEYS = {"acme": "key-acme", "globex": "key-globex"}
ADMIN_TOKEN = "admin-secret-token"


@pytest.fixture(scope="module")
def metered():
    """A gateway with two tenants, an admin token, the Prometheus endpoint on (as deploy/ runs it), and
    `server.metrics_admin_only` set."""
    import os

    from tests.support.harness import DEFAULT_POLICY, Harness
    from tests.support.policies import tenants

    environ = {**os.environ, "GATEWAY_PROMETHEUS": "1", "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
               "OTEL_METRIC_EXPORT_INTERVAL": "60000", "OTEL_TRACES_EXPORTER": "none"}
    harness = Harness(DEFAULT_POLICY + tenants(KEYS) + "server:\n  metrics_admin_only: true\n", environ=environ).start()
    yield harness
    harness.stop()


@pytest.mark.parametrize("caller", [{}, {"Authorization": "Bearer key-globex"}], ids=["anonymous", "other-tenant"])
def test_metrics_tell_no_caller_but_the_admin_what_each_tenant_spends_and_runs(metered, caller):
    """`/metrics` is served on the API's own port: anyone who can reach the gateway (and every tenant) would read
    each tenant's name, request counts, token usage, spend, budget, and the workflow names a tenant chose
    (`x-gateway-workflow`, free text of its own). With `server.metrics_admin_only` the answer is the admin's
    only."""
    import requests

    client = metered.openai(api_key=KEYS["acme"], default_headers={"x-gateway-task-id": "t-1",
                                                                   "x-gateway-workflow": "acme-merger-with-initech"})
    client.chat.completions.create(model="auto", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    requests.post(f"{metered.base_url}/v1/outcomes", timeout=10, headers={"Authorization": "Bearer key-acme"},
                  json={"task_id": "t-1", "outcome": "success"})
    metered.flush_telemetry()
    scraped = requests.get(f"{metered.base_url}/metrics", timeout=10, headers=caller)
    assert scraped.status_code in (401, 403), scraped.text[:300]
    assert "acme" not in scraped.text
    admin = requests.get(f"{metered.base_url}/metrics", timeout=10, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert admin.status_code == 200 and 'gateway_tenant="acme"' in admin.text


# rate limits and the CPU of counting ---------------------------------------------------------------------------------

def one_request_a_minute():
    """A started gateway whose tenant `acme` (key `key-acme`) may send one request a minute."""
    from gateway.tenancy.identity import sha256_hex
    from tests.support.harness import DEFAULT_POLICY, Harness

    policy = DEFAULT_POLICY + (f'tenants:\n  acme: {{{{keys_sha256: ["{sha256_hex("key-acme")}"], '
                               f'limits: {{{{requests_per_minute: 1}}}}}}}}\n')
    return Harness(policy).start()


@pytest.fixture(scope="module")
def limited():
    harness = one_request_a_minute()
    yield harness
    harness.stop()


def test_a_tenant_over_its_request_rate_is_refused_before_its_prompt_is_counted(limited):
    """Counting a prompt is the gateway's most expensive work before the model (about 0.5 s of CPU a MiB of text,
    on the request threads every tenant's large prompts share), and it ran before admission: a tenant already at
    its requests_per_minute could still send 20 MiB prompts without end, each costing seconds of CPU, and got a
    400 for its context window, not its 429. Its limit must refuse it before its prompt is counted."""
    import requests

    def chat(text: str) -> requests.Response:
        return requests.post(f"{limited.base_url}/v1/chat/completions", timeout=30,
                             headers={"Authorization": "Bearer key-acme"},
                             json={"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": text}]})

    assert chat("hi").status_code == 200                # its one request of the minute
    started_s = time.monotonic()
    refused = chat("\u4e00" * (1024 * 1024))               # 3 MiB of text: over a second to count
    assert refused.status_code == 429, (refused.status_code, refused.text[:200])
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert time.monotonic() - started_s < 0.5


# what a model server's error tells the client ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_raw():
    """A gateway before the scripted model server, on the policy's defaults."""
    with raw_model_gateway(first_byte_s=1, total_s=10) as running:
        yield running


def test_a_model_servers_stack_trace_reaches_the_client_in_no_field_of_its_error(plain_raw):
    """A model server's 4xx error is passed on with its own fields (Azure's `innererror`), but of its message only
    1,000 characters and only the last line of a stack trace: the server's files, code and hosts are its own. Any
    other field of the error bypassed both: a `traceback` or `debug` field (what a server in debug mode, or a proxy
    before it, adds) reached the client whole, naming internal hosts and paths, at any size."""
    from tests.support.raw_upstream import json_answer

    harness, raw = plain_raw
    reset_raw_model(harness, raw)
    trace = ('Traceback (most recent call last):\n  File "/srv/vllm-internal/entrypoints/openai.py", line 12, in run\n'
             '    conn = connect("gpu-node-17.corp.internal:5432")\nValueError: bad input')
    raw.script = json_answer({"error": {"message": trace, "type": "BadRequestError", "code": 400,
                                        "traceback": trace, "debug": {"upstream": "gpu-node-17.corp.internal",
                                                                      "dump": "x" * 100_000}}}, status=400)
    answer = post(harness, "raw-only", stream=False)
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["message"].endswith("ValueError: bad input") and "gpu-node-17" not in error["message"]
    assert "gpu-node-17" not in answer.text and "/srv/vllm-internal" not in answer.text, error.keys()
    assert len(answer.content) < 4000


def test_one_tenant_cannot_take_every_workflow_label_from_the_others(metered):
    """Workflow names are a client header, so metrics keep only the first 100 seen as labels (the rest `other`).
    That bound was shared by every tenant: one tenant naming 100 workflows (on purpose or by putting an id in the
    name) left every other tenant's workflows `other` in gateway.task.* until the gateway restarts. Each tenant
    must keep its own first workflows' names."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from gateway.telemetry.tracing import WORKFLOW_LABEL_TOP_N

    def task(key: str, workflow: str) -> None:
        headers = {"Authorization": f"Bearer {key}", "x-gateway-task-id": workflow, "x-gateway-workflow": workflow}
        answer = requests.post(f"{metered.base_url}/v1/chat/completions", timeout=10, headers=headers,
                               json={"model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text[:200]
        reported = requests.post(f"{metered.base_url}/v1/outcomes", timeout=10, headers=headers,
                                 json={"task_id": workflow, "outcome": "success"})
        assert reported.status_code == 200, reported.text[:200]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: task(KEYS["globex"], f"globex-job-{n}"), range(WORKFLOW_LABEL_TOP_N)))
    task(KEYS["acme"], "acme-quarterly-close")
    metered.flush_telemetry()
    text = requests.get(f"{metered.base_url}/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    acme = [line for line in text.splitlines()
            if line.startswith("gateway_task_outcomes_total{") and 'gateway_tenant="acme"' in line]
    assert any('gateway_workflow="acme-quarterly-close"' in line for line in acme), acme
