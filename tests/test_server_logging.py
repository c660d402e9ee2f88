"""The serving process's logging: a request aiohttp's parser refuses leaves no header value in the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from bench.machine import free_port
from gateway.app import build_app
from gateway.runtime import PolicyHolder
from gateway.server import REDACTED, run_server
from tests.support.raw_calls import send_raw

DEMO_POLICY = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"
SECRET = "sk-test-7f3a9c2e51d84b06a1e2"


async def test_an_oversized_authorization_header_is_logged_without_the_key(caplog):
    """A bearer key followed by 9000 bytes (past aiohttp's 8190-byte field limit): aiohttp's parser error is
    still logged, message and traceback, but the header's bytes are replaced by a fixed marker."""
    caplog.set_level(logging.DEBUG)
    app = build_app(PolicyHolder.from_file(DEMO_POLICY, {"OTEL_SDK_DISABLED": "true"}))
    ready, stop, port = asyncio.Event(), asyncio.Event(), free_port()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        answer = await send_raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      b"Authorization: Bearer " + SECRET.encode() + b"x" * 9000 + b"\r\n"
                                      b"Content-Length: 0\r\n\r\n")
    finally:
        stop.set()
        await server
    assert answer.split(b" ", 2)[1] == b"400"
    assert SECRET[:12] not in caplog.text
    parser_errors = [record for record in caplog.records if record.name == "aiohttp.server"]
    assert parser_errors and parser_errors[0].levelno == logging.ERROR
    assert "Error handling request" in caplog.text and "Got more than 8190 bytes" in caplog.text
    assert REDACTED in caplog.text
