"""Grouping a byte stream into server-sent events (`iter_events`), however its reads are split."""

from __future__ import annotations

from gateway.sse import iter_events


async def test_an_empty_piece_between_a_cr_and_its_lf_keeps_one_line_end():
    """A CRLF whose CR and LF are separated by an empty read is still one line end, so the event stays whole."""
    async def source():
        for piece in (b"data: a\r", b"", b"\ndata: b\n\n"):
            yield piece
    assert [event async for event in iter_events(source())] == [b"data: a\ndata: b\n\n"]
