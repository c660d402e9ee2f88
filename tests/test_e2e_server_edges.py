"""The serving edges a client or an operator meets: what aiohttp refuses, wrong methods, drains."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import requests

from bench.machine import free_port
from gateway import app as app_module
from gateway.app import build_app
from gateway.runtime import PolicyHolder
from gateway.server import run_server
from gateway.stages import count as count_stage
from tests.support.harness import Harness
from tests.support.raw_calls import send_raw

DEMO_POLICY = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"
CHAT = json.dumps({"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def gw():
    harness = Harness().start()
    yield harness
    harness.stop()


REFUSED_BY_THE_PARSER = {
    "a header line past 8190 bytes": HEAD + b"x-long: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
    "too many headers": HEAD + b"".join(b"x-h%d: v\r\n" % i for i in range(200)) + b"Content-Length: 0\r\n\r\n",
    "a chunk size that is not hex": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "a Content-Encoding it cannot decode": HEAD + b"Content-Encoding: br\r\nContent-Length: 3\r\n\r\nabc",
    "a line that is not HTTP": b"GARBAGE\r\n\r\n",
}


@pytest.mark.parametrize("what", list(REFUSED_BY_THE_PARSER))
async def test_what_aiohttps_parser_refuses_is_an_openai_shaped_400(what):
    """A request aiohttp's parser refuses before any gateway code runs is a 400 in OpenAI's error shape with an
    x-request-id, not aiohttp's plain-text body, and the gateway serves on."""
    app = build_app(PolicyHolder.from_file(DEMO_POLICY, {"OTEL_SDK_DISABLED": "true"}))
    ready, stop, port = asyncio.Event(), asyncio.Event(), free_port()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        answer = await send_raw(port, REFUSED_BY_THE_PARSER[what])
        health = await send_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        stop.set()
        await server
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", answer[:300]
    assert b"content-type: application/json" in head.lower() and b"x-request-id: " in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("could not read the request")
    assert b"aaaa" not in body and health.split(b" ", 2)[1] == b"200"


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/models", "GET"), ("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/outcomes", "POST")])
def test_a_method_an_endpoint_does_not_take_is_a_405_naming_the_ones_it_does(gw, method, path, allowed):
    """A wrong method is a 405 in OpenAI's shape that carries the Allow header RFC 9110 requires and says what to use."""
    reply = requests.request(method, gw.base_url + path, timeout=10)
    assert reply.status_code == 405
    assert allowed in reply.headers["Allow"].split(",")
    error = reply.json()["error"]
    assert error["code"] == "http_405" and allowed in error["message"] and path in error["message"]


def test_an_unknown_path_is_a_404_not_found_naming_the_method_and_the_path(gw):
    """A path no route serves is a 404 `not_found` (not `model_not_found`, which would send its client looking for
    a model) whose message names the method and the path, and which carries the caller's x-request-id."""
    reply = requests.post(gw.base_url + "/v1/chat/complete", json={}, headers={"x-request-id": "lost-1"}, timeout=10)
    assert (reply.status_code, reply.headers["x-request-id"]) == (404, "lost-1")
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "not_found")
    assert "POST /v1/chat/complete" in error["message"]


def test_a_request_id_the_gateway_replaces_is_the_same_for_the_client_and_the_model(gw):
    """An answer to a request whose x-request-id is not echoed (it has a space) carries one fresh id, the same one
    the model server received, so the client's id finds the request in the model server's logs."""
    reply = requests.post(gw.base_url + "/v1/chat/completions", headers={"x-request-id": "two words"}, timeout=10,
                          json={"model": "auto", "max_tokens": 1,
                                "messages": [{"role": "user", "content": "which request id is mine?"}]})
    assert reply.status_code == 200 and reply.headers["x-gateway-cache"] != "hit"
    fresh = reply.headers["x-request-id"]
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    seen = gw.sim_requests(reply.headers["x-gateway-model"], last=1)[-1]["headers"]
    assert seen["x-request-id"] == fresh


INTERNAL_ERROR = {"message": "internal error", "type": "api_error", "code": "internal_error", "param": None}


def test_a_fault_in_a_stage_is_a_500_that_shows_none_of_it_and_is_logged_with_the_request_id(gw, monkeypatch,
                                                                                             caplog):
    """A fault of the gateway's own in a request's stage (here injected into the prompt count) answers a 500
    `internal error` in OpenAI's shape with the caller's x-request-id and nothing of the fault; the fault is
    logged once, with its traceback and the request's id, for the operator."""
    def broken(*_args):
        raise RuntimeError("a secret detail")

    monkeypatch.setattr(count_stage, "count_prompts", broken)
    caplog.set_level("ERROR", logger="gateway")
    reply = requests.post(gw.base_url + "/v1/chat/completions", headers={"x-request-id": "stage-fault-1"},
                          json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert (reply.status_code, reply.headers["x-request-id"]) == (500, "stage-fault-1")
    assert reply.json()["error"] == INTERNAL_ERROR and "secret" not in reply.text
    logged = [r for r in caplog.records if "stage-fault-1" in r.getMessage()]
    assert len(logged) == 1 and str(logged[0].exc_info[1]) == "a secret detail"


def test_a_fault_outside_the_pipeline_is_a_500_that_shows_none_of_it_and_is_logged_with_the_request_id(
        gw, monkeypatch, caplog):
    """A fault of the gateway's own in a handler outside the pipeline (here injected into the model list's tenant
    filter) is caught by the outermost middleware: the same 500 `internal error` with the caller's x-request-id
    and nothing of the fault, logged once with its traceback and the request's id."""
    def broken(*_args):
        raise RuntimeError("a secret detail")

    monkeypatch.setattr(app_module, "_may_use", broken)
    caplog.set_level("ERROR", logger="gateway")
    reply = requests.get(gw.base_url + "/v1/models", headers={"x-request-id": "handler-fault-1"}, timeout=10)
    assert (reply.status_code, reply.headers["x-request-id"]) == (500, "handler-fault-1")
    assert reply.json()["error"] == INTERNAL_ERROR and "secret" not in reply.text
    logged = [r for r in caplog.records if "handler-fault-1" in r.getMessage()]
    assert len(logged) == 1 and str(logged[0].exc_info[1]) == "a secret detail"
