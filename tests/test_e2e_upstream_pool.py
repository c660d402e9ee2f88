"""Streams over the upstream connection pool: a kept-alive connection a stream used is reused by the next call.

aiohttp 3.14 re-arms a `sock_read` timer on a connection it has already put back in the pool, when the rest of a
large streamed body already received is read; the timer then fires on the idle connection, and the next call
that takes it fails at once with a read timeout (aio-libs/aiohttp#12953, fixed after 3.14.5). The gateway gave
streams `sock_read: first_byte_s`, so a stream started about `first_byte_s` after a large one on the same model
was an instant 504 `upstream_timeout`, counted against the model's circuit. It waits for a stream's head itself
now. The upstream here is a keep-alive SSE server that sends a 3.8 MB stream at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from aiohttp import web

from tests.support.redis_server import free_port

FIRST_BYTE_S = 0.3


class KeepAliveStreams:
    """An OpenAI-compatible chat server streaming 480 chunks of 8 KB on kept-alive connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.connections: set[int] = set()

    def start(self) -> KeepAliveStreams:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.connections.add(id(request.transport))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(delta: dict, finish: str | None = None) -> bytes:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "big",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        await response.write(event({"role": "assistant", "content": ""}))
        payload = event({"content": "y" * 8000})
        for _ in range(480):
            await response.write(payload)
        usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "big", "choices": [],
                 "usage": {"prompt_tokens": 8, "completion_tokens": 480, "total_tokens": 488}}
        await response.write(event({}, "stop") + b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The upstream, and the gateway as it runs in production (its own process, on uvloop: the window in which
    the pooled connection fails is wider there than on an in-process asyncio loop)."""
    upstream = KeepAliveStreams().start()
    folder = tmp_path_factory.mktemp("pool")
    policy = folder / "policy.yaml"
    policy.write_text(f"""version: 1
models:
  big:
    endpoint: http://127.0.0.1:{upstream.port}/v1
    timeouts: {{connect_s: 1, first_byte_s: {FIRST_BYTE_S}, total_s: 30}}
routes:
  - {{name: big, candidates: [big]}}
""")
    port = free_port()
    log = folder / "gateway.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host",
                                    "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OTEL_SDK_DISABLED": "true"})
    try:
        deadline_s = time.monotonic() + 20
        while b"gateway listening" not in log.read_bytes():
            assert time.monotonic() < deadline_s and gateway.poll() is None, log.read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", upstream
    finally:
        gateway.terminate()
        gateway.wait(10)
        upstream.stop()


def streamed(base_url: str) -> tuple[int, bytes]:
    with requests.post(f"{base_url}/v1/chat/completions", timeout=30, stream=True,
                       json={"model": "big", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as got:
        return got.status_code, got.raw.read()


def test_a_stream_on_a_connection_a_large_stream_used_is_not_timed_out_at_once(env):
    """Pairs of streams on one model, the second started about `first_byte_s` after the first ended (when the
    timer aiohttp left on the pooled connection would fire): every stream is whole, none an instant timeout, and
    the connection is reused (the pool is what is tested)."""
    base_url, upstream = env
    for delay_s in [0.9 + step * 0.005 for step in range(41)]:
        for position in ("first", "second"):
            status, body = streamed(base_url)
            assert status == 200 and body.endswith(b"data: [DONE]\n\n"), (delay_s, position, body[-300:])
            assert b'"error"' not in body[-2000:], (delay_s, position, body[-300:])
            if position == "first":
                time.sleep(FIRST_BYTE_S * delay_s)
    assert len(upstream.connections) < 41           # kept alive: fewer connections than streams
