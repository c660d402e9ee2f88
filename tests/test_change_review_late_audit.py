"""A late review of the day's merged changes: each test is an edge those changes did not consider, proven against
real parts (the gateway, its in-process stores)."""

from __future__ import annotations

import pytest
import requests

from tests.support.harness import DEFAULT_POLICY, Harness
from tests.test_security_audit import one_request_a_minute

#: a prompt past count.LARGE_BODY_BYTES (64 KiB), so the early rate-limit check runs, yet quick to count
LARGE_TEXT = "hello " * 20_000


@pytest.fixture(scope="module")
def limited():
    harness = one_request_a_minute()
    yield harness
    harness.stop()


def _chat(harness: Harness, text: str) -> requests.Response:
    return requests.post(f"{harness.base_url}/v1/chat/completions", timeout=10,
                         headers={"Authorization": "Bearer key-acme"},
                         json={"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": text}]})


def test_a_large_prompt_refused_before_counting_is_told_the_same_wait_and_limits_as_admission_tells(limited):
    """A tenant at its requests_per_minute is told by admission to wait until its oldest request leaves the window
    (about 60 s) and is sent OpenAI's x-ratelimit-* headers; the same tenant refused by the new early check (a body
    past 64 KiB) was told `Retry-After: 1` with no x-ratelimit headers, so the openai SDK retries at once, is refused
    again, and gives up, where it would have waited and been served."""
    assert _chat(limited, "hi").status_code == 200          # its one request of the minute
    by_admission = _chat(limited, "hi again")
    early = _chat(limited, LARGE_TEXT)
    assert by_admission.status_code == 429 and early.status_code == 429, (by_admission.text, early.text)
    assert int(by_admission.headers["Retry-After"]) > 30
    assert abs(int(early.headers["Retry-After"]) - int(by_admission.headers["Retry-After"])) <= 2, \
        (early.headers["Retry-After"], by_admission.headers["Retry-After"])
    assert early.headers.get("x-ratelimit-remaining-requests") == "0", dict(early.headers)
    assert early.headers.get("x-ratelimit-limit-requests") == "1"



# tenant labels freed on reload ----------------------------------------------------------------------------------------

def test_a_removed_tenants_stream_ending_after_the_reload_does_not_take_back_its_label_place():
    """A reload that removes a tenant frees its place among the named tenant labels (`TenantLabels.keep_only`), but
    a request is labelled when it ends: a stream of that tenant still running at the reload (a tenant is mostly
    removed while active) ends afterwards, is seen again, and takes the place back for as long as the process runs,
    so the next tenant is `other` just as before the change."""
    import urllib.request

    from tests.support.policies import tenants

    keys = {"first": "key-first", "second": "key-second"}
    head = DEFAULT_POLICY + "telemetry: {{tenant_label_top_n: 1}}\n"
    slow = {name: dict(ttft_ms=1, tpot_ms=20) for name in ("small", "medium", "large")}
    harness = Harness(head + tenants(keys), sims=slow,
                      environ={"GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}).start()

    def requests_of() -> set[str]:
        with urllib.request.urlopen(f"{harness.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {line.split('gateway_tenant="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                if line.startswith("gateway_requests_total{")}

    try:
        stream = harness.openai(api_key=keys["first"]).chat.completions.create(
            model="auto", max_tokens=20, stream=True, messages=[{"role": "user", "content": "hi"}])
        chunks = iter(stream)
        next(chunks)                                    # `first` is streaming when the reload removes it
        harness.write_policy(head + tenants({"second": keys["second"]}))
        assert harness.reload_policy()
        for _ in chunks:                                # its stream ends after the reload
            pass
        harness.openai(api_key=keys["second"]).chat.completions.create(
            model="auto", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        assert "second" in requests_of(), requests_of()
    finally:
        harness.stop()
