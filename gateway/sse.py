"""Server-Sent Events as OpenAI streams them: `data: {json}` events and `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict) -> bytes:
    """One SSE event carrying a JSON payload."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, *, error_type: str = "upstream_error", code: str | None = None) -> bytes:
    """The in-band error an OpenAI client sees when a stream fails after its first byte."""
    return encode_event({"error": {"message": message, "type": error_type, "code": code, "param": None}})


def event_data(event: bytes) -> bytes | None:
    """The payload of one raw event (its `data:` lines joined, CRLF line ends allowed), or None for a comment
    or keep-alive."""
    parts = [line[5:].lstrip(b" ").rstrip(b"\r") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


async def iter_events(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Group a byte stream's lines into raw events, each ending with a blank line.

    A stream that ends without its final blank line yields what it had, so
    the caller can tell a complete stream (it saw `[DONE]`) from a cut one.
    """
    pending: list[bytes] = []
    async for line in lines:
        if line in (b"\n", b"\r\n"):
            if pending:
                pending.append(b"\n")
                yield b"".join(pending)
                pending = []
            continue
        pending.append(line if line.endswith(b"\n") else line + b"\n")
    if pending:
        yield b"".join(pending)
