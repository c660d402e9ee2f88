"""A model server that writes exactly the bytes a test scripts, for answers the simulated backend never gives.

Each request is answered by the script: a list of (bytes, delay_s) writes, then
the connection is closed. What it received is kept in `requests` as (head, body);
`most_at_once` is the most requests it has been answering at the same time.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP request from a connection: its head, and its body by its Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length) if length else b""


class RawUpstream:
    """A raw-TCP HTTP/1.1 server on 127.0.0.1, in its own thread and event loop."""

    def __init__(self) -> None:
        self.script: list[tuple[bytes, float]] = []
        #: when set, the script for each request, from its body (answers that depend on what was asked)
        self.script_for: Callable[[bytes], list[tuple[bytes, float]]] | None = None
        self.requests: list[tuple[bytes, bytes]] = []
        self.in_flight = 0
        self.most_at_once = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> RawUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.most_at_once = max(self.most_at_once, self.in_flight)
        try:
            head, body = await read_request(reader)
            self.requests.append((head, body))
            for data, delay_s in list(self.script_for(body) if self.script_for else self.script):
                await asyncio.sleep(delay_s)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass                            # the gateway hung up: nothing more to say
        finally:
            self.in_flight -= 1
            writer.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _stop(self) -> None:
        """Close the server and end the answers still under way (a script that hangs), so none outlives the loop."""
        self.server.close()
        answering = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in answering:
            task.cancel()
        await asyncio.gather(*answering, return_exceptions=True)


def http_head(status: int = 200, headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    """A response head; without `length` the body runs until the connection closes."""
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode()


def json_answer(payload: object, status: int = 200, headers: dict[str, str] | None = None
                ) -> list[tuple[bytes, float]]:
    """A script answering `payload` as JSON with `status`."""
    body = json.dumps(payload).encode()
    return [(http_head(status, {"Content-Type": "application/json", **(headers or {})}, len(body)) + body, 0.0)]


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> bytes:
    """One chat completion chunk's JSON."""
    delta = {**({"role": "assistant"} if role else {}), **({"content": content} if content is not None else {})}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()


def sse(*payloads: bytes, eol: bytes = b"\n") -> bytes:
    """`data:` events with the given line ending."""
    return b"".join(b"data: " + payload + eol + eol for payload in payloads)


SSE_HEAD = http_head(200, {"Content-Type": "text/event-stream"})
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


#: a short, complete chat stream: role, two words, the finish, [DONE]
TEXT_EVENTS = [chunk("", role=True), chunk("Hello"), chunk(" world"), chunk(None, finish="stop"), b"[DONE]"]
