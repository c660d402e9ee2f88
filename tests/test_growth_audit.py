"""What a gateway serving for weeks keeps: nothing a client or the clock controls may grow without a bound."""

from __future__ import annotations

import os
import uuid
from decimal import Decimal

import pytest
import redis
import requests

from gateway.context import Attempt
from gateway.outcomes import OutcomeBook
from gateway.policy.model import Model
from gateway.stages.answers import read_identity
from gateway.telemetry.genai import RESPONSE_MODELS_PER_MODEL, response_model_label
from tests.support.harness import Harness


@pytest.fixture(scope="module")
def gw():
    """The default test gateway: open (no tenants), in-process stores, telemetry off."""
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    environ.update(OTEL_SDK_DISABLED="true")
    harness = Harness(environ=environ).start()
    yield harness
    harness.stop()


def test_long_model_aliases_a_client_sends_are_refused_and_not_kept_by_the_route_index(gw):
    """The route index remembers every alias it merged (up to 4096 of them), and a request's `model` goes into its
    ledger line, spans and logs: a client sending distinct 200 KB aliases gets a 400 naming the limit, as OpenAI's
    API words it, and leaves nothing pinned in the index; an alias at the limit is still looked up (404)."""
    aliases = [f"{i}-" + "x" * 200_000 for i in range(8)]
    for alias in aliases:
        response = requests.post(f"{gw.base_url}/v1/chat/completions", timeout=10,
                                 json={"model": alias, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "model" and error["code"] == "string_above_max_length"
        assert error["message"] == ("Invalid 'model': string too long. Expected a string with maximum length 256, "
                                    f"but got a string with length {len(alias)} instead.")
    response = requests.post(f"{gw.base_url}/v1/chat/completions", timeout=10,
                             json={"model": "y" * 256, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    index = gw.services.holder.current.routes
    kept_chars = sum(len(alias) for alias in index._by_alias)
    assert kept_chars < 64 * 1024, f"the route index keeps {kept_chars} characters of aliases clients sent"


def test_a_tasks_request_ids_are_forgotten_with_the_task():
    """Past `ttl_s` a task is forgotten; the pointers from its request ids to it must go too (they were kept
    until 400,000 had piled up, whatever their age: an idle gateway held them for ever)."""
    now = [1_000.0]
    book = OutcomeBook(ttl_s=60, clock=lambda: now[0])
    for i in range(50):
        book.track(request_id=f"req-{i}", task_id=f"task-{i}", route="r", tenant="t", workflow=None,
                   cost_usd=Decimal("0.01"))
    now[0] += 120
    book._trim()                        # what every track, report and stats call begins with
    assert len(book.tasks) == 0
    assert len(book.request_tasks) == 0, f"{len(book.request_tasks)} request ids still point at forgotten tasks"


def test_every_key_the_shared_outcome_book_writes_expires(redis_server):
    """Each Redis key a gateway writes for tasks and their reports has a TTL: none outlives its retention."""
    environ = {**os.environ, "GATEWAY_REDIS_URL": redis_server.url, "OTEL_SDK_DISABLED": "true"}
    harness = Harness(environ=environ).start()
    try:
        task_id = f"task-{uuid.uuid4()}"
        response = requests.post(f"{harness.base_url}/v1/chat/completions", timeout=10,
                                 headers={"x-gateway-task-id": task_id},
                                 json={"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 3})
        assert response.status_code == 200
        report = requests.post(f"{harness.base_url}/v1/outcomes", timeout=10,
                               json={"task_id": task_id, "outcome": "success"})
        assert report.status_code == 200, report.text
    finally:
        harness.stop()
    client = redis.Redis.from_url(redis_server.url)
    forever = sorted(key.decode() for key in client.scan_iter(count=1000) if client.pttl(key) < 0)
    assert forever == [], f"keys without a TTL: {forever}"


def test_the_model_names_a_server_answers_with_are_bounded_as_metric_labels():
    """A server that names a new model in each answer (a build hash, a request id) must not grow gen_ai.response.model
    without bound: past the SDK's 2,000 series a metric, every later series, of any tenant or route, goes to its
    overflow. Each policy model keeps its first RESPONSE_MODELS_PER_MODEL names; later ones are `other`."""
    labels = [response_model_label("growth-a", f"build-{i}") for i in range(40)]
    assert labels[:RESPONSE_MODELS_PER_MODEL] == [f"build-{i}" for i in range(RESPONSE_MODELS_PER_MODEL)]
    assert set(labels[RESPONSE_MODELS_PER_MODEL:]) == {"other"}
    assert response_model_label("growth-a", "build-3") == "build-3"        # a name kept stays itself
    assert response_model_label("growth-b", "build-39") == "build-39"      # each policy model has its own places


def test_an_answers_id_and_model_are_kept_only_when_short():
    attempt = Attempt(model=Model("m", "http://127.0.0.1:1/v1", "m"), started_s=0.0)
    read_identity(attempt, {"id": "x" * 100_000, "model": "y" * 257})
    assert attempt.response_id is None and attempt.response_model is None
    read_identity(attempt, {"id": "chatcmpl-1", "model": "y" * 256})
    assert attempt.response_id == "chatcmpl-1" and attempt.response_model == "y" * 256
