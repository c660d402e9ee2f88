"""End to end: an answer the cache cannot keep (an odd but valid shape) is served, not cached, and lets its
single flight go: identical requests never wait on a leader that has answered, and no lock stays behind."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import aiohttp
import orjson
import pytest
import redis
from aiohttp import web

import gateway.stages.cache as cache_stage
from tests.support.harness import Harness
from tests.support.policies import models, short_timeouts, standard_model, tenants

KEY = "key-alpha-0001"


def start_list_content_upstream() -> tuple[str, asyncio.AbstractEventLoop]:
    """A model server streaming its content as a list of parts (as some servers do): valid JSON, valid SSE."""
    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for choices in ([{"index": 0, "delta": {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
                          "finish_reason": None}],
                        [{"index": 0, "delta": {}, "finish_reason": "stop"}]):
            await response.write(b"data: " + orjson.dumps({**base, "choices": choices}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1", loop


def policy(url: str) -> str:
    return models(standard_model("small", endpoint=url, timeouts=short_timeouts())) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
    cache: {{enabled: true, ttl_s: 60}}
""" + tenants({"alpha": KEY})


def ask(gw: Harness) -> tuple[int, str, float]:
    """One streamed, cacheable request: (status, x-gateway-cache, seconds)."""
    async def go():
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(f"{gw.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                    json={"model": "auto", "stream": True, "temperature": 0,
                                          "messages": [{"role": "user", "content": "q"}]}) as response:
                await response.read()
                return response.status, response.headers.get("x-gateway-cache", ""), time.monotonic() - started
    return asyncio.run(go())


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_an_answer_the_cache_cannot_keep_lets_its_flight_go(store, request, monkeypatch, caplog):
    monkeypatch.setattr(cache_stage, "SINGLE_FLIGHT_TIMEOUT_S", 5.0)      # 30 s in production
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    environ["OTEL_SDK_DISABLED"] = "true"
    if store == "redis":
        environ["GATEWAY_REDIS_URL"] = request.getfixturevalue("redis_server").url
    url, upstream_loop = start_list_content_upstream()
    gw = Harness(policy(url), {"small": {}}, environ).start()
    try:
        with caplog.at_level(logging.INFO):
            answers = [ask(gw) for _ in range(3)]
        assert [(status, cache) for status, cache, _ in answers] == [(200, "miss")] * 3
        assert max(seconds for _, _, seconds in answers) < 2.0       # nobody waited for a landed leader
        assert "answer not cached" in caplog.text and "finishing Cache failed" not in caplog.text
        gw.call(gw.services.background.drain(5))                    # the flights' own ends run after the answer
        assert len(gw.services.stores.singleflight) == 0
        if store == "redis":
            assert redis.Redis.from_url(environ["GATEWAY_REDIS_URL"]).keys("*:lock") == []
    finally:
        gw.stop()
        upstream_loop.call_soon_threadsafe(upstream_loop.stop)
