"""Server-Sent Events as OpenAI streams them: `data: {json}` events and `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"
#: the UTF-8 byte order mark SSE allows (and says to ignore) at the very start of a stream
BOM = b"\xef\xbb\xbf"
#: the longest event read from a model server (a tool call's whole arguments may come in one); past it the
#: stream is broken
MAX_EVENT_BYTES = 8 * 1024 * 1024


class EventTooLong(ValueError):
    """A model server's event ran past MAX_EVENT_BYTES without ending."""


def encode_event(payload: dict) -> bytes:
    """One SSE event carrying a JSON payload."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, *, error_type: str = "upstream_error", code: str | None = None,
                responses: bool = False) -> bytes:
    """The in-band error an OpenAI client sees when a stream fails after its first byte. On a Responses API stream
    it is also that API's `error` event (`event: error`, `type`, `code`, `message`, `param`), for clients that
    read events by their type; the `error` object beside them is what the SDKs raise on."""
    error = {"message": message, "type": error_type, "code": code, "param": None}
    if not responses:
        return encode_event({"error": error})
    return b"event: error\n" + encode_event({"type": "error", "code": code, "message": message, "param": None,
                                             "error": error})


def event_data(event: bytes) -> bytes | None:
    """The payload of one event from `iter_events` (its `data:` lines joined), or None for an event without
    data: a comment or keep-alive."""
    if event.startswith(b"data:") and event.find(b"\n") == len(event) - 2:     # one data line: most events
        return event[5:-2].lstrip(b" ")
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def is_comment(event: bytes) -> bool:
    """Every line of an event from `iter_events` is a comment (`: ping`, a keep-alive); an event of other
    fields without data (`retry:`, `event:`, `id:` alone) is not."""
    return all(line.startswith(b":") for line in event.rstrip(b"\n").split(b"\n"))


def _strip_bom(piece: bytes, bom_left: bytes) -> tuple[bytes, bytes]:
    """A piece from the start of a stream without the part of a BOM it opens with, and what of the BOM may
    still come (`bom_left` is what had not come yet); bytes held back as a BOM's start that turn out not to be
    one are given back."""
    if bom_left.startswith(piece):
        return b"", bom_left[len(piece):]
    if piece.startswith(bom_left):
        return piece[len(bom_left):], b""
    return BOM[:len(BOM) - len(bom_left)] + piece, b""


async def iter_events(pieces: AsyncIterator[bytes], max_event_bytes: int = MAX_EVENT_BYTES
                      ) -> AsyncIterator[bytes]:
    """Group a byte stream, read in pieces of any size, into raw events, each ending with a blank line.

    Lines may end with LF, CRLF or a bare CR, as SSE allows; the events come
    out with LF only, and without the BOM the stream may start with. A stream
    that ends without its final blank line yields what it had, so the caller
    can tell a complete stream (it saw `[DONE]`) from a cut one. An event whose
    lines (without the line end after the last) run past `max_event_bytes`
    raises EventTooLong, however the stream is split.
    """
    pending: list[bytes] = []           # the start of an event not finished yet, no blank line before it
    pending_bytes = 0
    after_cr = False                    # the last piece ended with CR: a LF opening the next one is its pair
    bom_left = BOM                      # what of a BOM may still come at the stream's start
    async for piece in pieces:
        if bom_left:
            piece, bom_left = _strip_bom(piece, bom_left)
        if not piece:                   # an empty read (or a BOM alone) ends no line: a CR before it keeps its pair
            continue
        if after_cr and piece.startswith(b"\n"):
            piece = piece[1:]
        after_cr = piece.endswith(b"\r")
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not piece:
            continue
        if b"\n\n" not in piece and not (piece.startswith(b"\n") and pending and pending[-1].endswith(b"\n")):
            if not pending:             # between events, LFs opening the piece end blank lines: not counted
                piece = piece.lstrip(b"\n")
                if not piece:
                    continue
            pending.append(piece)       # no event ends in this piece
            pending_bytes += len(piece)
            if pending_bytes > max_event_bytes and pending_bytes - piece.endswith(b"\n") > max_event_bytes:
                raise EventTooLong(f"an event ran past {max_event_bytes} bytes")
            continue
        text = b"".join((*pending, piece)) if pending else piece
        start = 0
        while True:
            while text.startswith(b"\n", start):    # blank lines between events
                start += 1
            end = text.find(b"\n\n", start)
            if end == -1:
                break
            if end - start > max_event_bytes:
                raise EventTooLong(f"an event ran past {max_event_bytes} bytes")
            yield text[start:end + 2]   # the whole piece, not a copy, when it is one event
            start = end + 2
        pending = [text[start:]] if start < len(text) else []
        pending_bytes = len(text) - start
        if pending_bytes > max_event_bytes and pending_bytes - text.endswith(b"\n") > max_event_bytes:
            raise EventTooLong(f"an event ran past {max_event_bytes} bytes")
    tail = b"".join(pending).lstrip(b"\n")
    if tail:
        yield tail if tail.endswith(b"\n") else tail + b"\n"
