"""End to end: continuing a stored response through another replica, its pin shared in a real redis-server; and
what a request continuing one gets while Redis is down (`store.on_store_failure`)."""

from __future__ import annotations

import os

import openai
import pytest
import redis

from gateway.routing.pins import MemoryPins
from tests.support.harness import Harness
from tests.support.policies import QUICK_STOP
from tests.test_e2e_responses import KEYS, POLICY

TENANT_KEYS = dict(KEYS)


def environ(redis_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    return {**base, "GATEWAY_REDIS_URL": redis_url, "OTEL_SDK_DISABLED": "true"}


def create(gw: Harness, tenant: str = "acme", **fields):
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=TENANT_KEYS[tenant], max_retries=0)
    return client.responses.with_raw_response.create(**{"model": "auto", "input": "Say hello.",
                                                        "max_output_tokens": 16, **fields})


@pytest.fixture(scope="module")
def replicas(module_redis_server):
    started = [Harness(POLICY, environ=environ(module_redis_server.url)).start() for _ in range(2)]
    yield started
    for harness in started:
        harness.stop()


def test_a_response_stored_through_one_replica_is_continued_through_another(replicas, module_redis_server):
    first, second = replicas
    stored = create(first).parse()
    raw = create(second, previous_response_id=stored.id, extra_headers={"x-gateway-min-tier": "2"})
    assert raw.headers["x-gateway-model"] == "small"
    client = redis.Redis.from_url(module_redis_server.url)
    key = f"gw:{{acme}}:rp:{stored.id}"
    assert client.get(key) == b"small" and 86000 < client.ttl(key) <= 86400
    with pytest.raises(openai.BadRequestError, match="not found"):
        create(second, tenant="bravo", previous_response_id=stored.id)
    client.close()


@pytest.mark.parametrize(("on_failure", "expected"), [("deny", 503), ("allow", 200)])
def test_a_continuation_while_redis_is_down_follows_on_store_failure(redis_server, on_failure, expected):
    policy = POLICY + QUICK_STOP + f"store: {{{{on_store_failure: {on_failure}, timeout_ms: 200}}}}\n"
    gw = Harness(policy, environ=environ(redis_server.url)).start()
    try:
        stored = create(gw).parse()
        redis_server.stop()
        if expected == 200:
            assert create(gw, previous_response_id=stored.id).headers["x-gateway-model"] == "small"
        else:
            with pytest.raises(openai.InternalServerError) as refused:
                create(gw, previous_response_id=stored.id)
            assert refused.value.status_code == 503 and refused.value.body["code"] == "store_unavailable"
            assert "stored responses" in refused.value.body["message"]
    finally:
        gw.stop()


async def test_pins_in_memory_are_per_tenant_bounded_and_expire():
    now = [0.0]
    pins = MemoryPins(max_entries=3, clock=lambda: now[0])
    for index in range(4):
        await pins.remember("acme", f"resp_{index}", "small", 60)
    assert await pins.model_for("acme", "resp_0") is None          # the oldest went first
    assert await pins.model_for("acme", "resp_3") == "small"
    assert await pins.model_for("bravo", "resp_3") is None         # another tenant's
    now[0] = 61.0
    assert await pins.model_for("acme", "resp_3") is None          # expired
