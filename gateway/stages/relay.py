"""Relaying an upstream SSE stream to the client chunk by chunk, never buffered whole.

The client's response is prepared only when the first upstream data event
that says something arrives, so a model that fails before that can still be
replaced by the next one. The events a stream opens with before it says
anything are held until then (`_opening`), then written first, in order: a
chat or completions chunk with no output, no finish reason and no usage (the
role-only first chunk vLLM and OpenAI send before any token, Azure's first,
with no choices and its `prompt_filter_results`), and a Responses API
stream's preamble (below). After the first byte, a failure (the model's, or
the gateway's own) can only be reported in-band: an SSE error event, then the
end of the stream.

The model must send a data event within `first_byte_s` of its response head,
and then within `first_byte_s` of each one relayed, and end within `total_s`
of the call's start; comments (keep-alives) are passed on once the response
is open but do not hold the deadline off, and the time spent writing to a
slow client counts against neither. A client that takes none of the stream
for `server.client_timeout_s` is cut, as one that left: its call would
otherwise hold the model's call slot, its tenant's concurrency and the
router's count of the model's load for as long as it likes.
Events without data that are not comments (`retry:`, `event:`, `id:` alone)
are dropped: an SDK would read them as chunks it cannot parse. Once every
choice asked for has its finish reason, the model has FINISHED_GRACE_S to send
its usage chunk and [DONE]; silent longer, the stream is ended as whole.

A client that asked for usage (`stream_options.include_usage`) always gets a
usage chunk before [DONE]: the model's, or, when it sent none, the tokens the
gateway counted (the ones it bills, marked estimated in the ledger and spans).

A Responses API stream (`ResponsesStreamState`) is a series of typed events
(`event: response.output_text.delta` and its data) passed on as they come: its
output is its `*.delta` events, its answer whole at `response.completed`,
`response.incomplete` or `response.cancelled` (a background response's; whose
response carries the usage; the last event: the
relay ends there, with no usage chunk nor [DONE] to wait for), its failure an
`error` or `response.failed` event. Its preamble
(`response.created`, `response.in_progress`, the first item and part added:
RESPONSES_PREAMBLE), which a server sends before it has generated anything,
is held until the first event after it: a model failing before its first
output is replaced by the next, as a chat stream's is before its first chunk
that says something. A background response's is not held once its server has
named it: the server generates it whatever becomes of the stream, so it is
never replaced (a second model would generate it twice, the first unbooked);
the client has its id to read it on, and a failure after is the cut
`gateway.background` watches.
"""

from __future__ import annotations

import asyncio
import fcntl
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from aiohttp import web

from gateway.background import is_background
from gateway.cache.assemble import FRAME_FIELDS, MAX_ASSEMBLED_CHARS, UNFOLDABLE, StreamAssembler
from gateway.context import CLIENT_DISCONNECTED, Attempt, RequestContext, Usage
from gateway.errors import GatewayError, ShuttingDown, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from gateway.responses import response_headers
from gateway.sse import DONE, MAX_EVENT_BYTES, encode_event, error_event, event_data, is_comment
from gateway.stages.answers import (
    CONTENT, REASONING, Estimate, GeneratedParts, count_usage, read_identity, responses_finish_reason,
)
from gateway.telemetry.content import CAPTURE_OUTPUT
from gateway.tokens import usage_body, usage_from_response
from gateway.upstream import UpstreamCall, error_message

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
#: how long a stream whose choices have all finished may go silent before the gateway ends it itself
FINISHED_GRACE_S = 2.0
#: delta fields besides `content` that carry output: the first chunk with any of them is the first token
OUTPUT_FIELDS = ("tool_calls", "function_call", "refusal", "reasoning_content", "reasoning")
#: a delta with no other fields carries text only (most chunks): nothing more to keep from it
_TEXT_ONLY = frozenset(("role", "content"))
#: the most a stream's held opening events may take, as much as one event may: past it, the stream opens with them
#: (a server opens with a few; one that sends no end of them must not grow the gateway's memory)
MAX_HELD_BYTES = MAX_EVENT_BYTES


class ClientStalled(ConnectionError):
    """The client took none of the stream for `server.client_timeout_s`: it is cut, as one that left."""


class StreamState:
    """What the relay learned from the events it passed on."""

    __slots__ = ("assembled", "unassembled", "captured", "_captured_body", "text_chunks", "output_chunks", "parts",
                 "finish_reasons", "finished_choices", "sent_whole", "done", "chunk_gaps_s", "last_output_s")

    def __init__(self, assemble_for: str | None, capture_for: str | None = None) -> None:
        # the answer the cache would store, folded in as the chunks pass (`assemble_for`: the endpoint, when the
        # cache wants it); given up for an answer too long to store, or of a shape the cache cannot replay
        self.assembled = StreamAssembler(assemble_for) if assemble_for is not None else None
        self.unassembled: str | None = None         # why it was given up
        # the whole answer (tool calls with their ids, each choice's finish reason) for content capture
        # (`capture_for`: the endpoint, when telemetry records it); a cache's own is not shared, as it is
        # given up past what the cache can store and its body is taken once, for the entry
        self.captured = StreamAssembler(capture_for) if capture_for is not None else None
        self._captured_body: dict | None = None
        self.text_chunks = 0                        # the chunks that carried text: about one token each
        self.output_chunks = 0                      # those that carried any output (text, reasoning, a tool call's
        #                                             arguments, a refusal): the tokens the model made, for energy
        self.parts = GeneratedParts()               # the texts generated, by choice and part
        self.finish_reasons: list[str] = []
        self.finished_choices: set[int] = set()     # the indexes of the choices that had a finish reason
        self.sent_whole = False                     # every choice's finish was written to the client
        self.done = False
        self.chunk_gaps_s: list[float] = []         # between consecutive output chunks: time per output chunk
        self.last_output_s: float | None = None     # when the latest chunk carrying output came

    def absorb(self, chunk: dict) -> bool:
        """Keep the text, the other generated texts (tool calls, a refusal, reasoning: usage estimates count
        them), finish reasons (and the answer, when the cache wants it); True when the chunk carried output,
        whose timing it notes. Choices of odd shapes are passed over."""
        if self.assembled is not None:
            self._assemble(chunk)
        if self.captured is not None:
            self._capture(chunk)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        output = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if "delta" in choice:           # chat
                delta = choice["delta"]
                text = delta.get("content") if isinstance(delta, dict) else None
            else:                           # completions
                delta, text = None, choice.get("text")
            index = choice.get("index", 0)
            index = index if type(index) is int else 0
            if isinstance(text, str) and text:
                self.parts.add_text(index, text)
                self.text_chunks += 1
                self.output_chunks += 1
                output = True
            elif isinstance(delta, dict) and _carries_other_output(delta):
                self.output_chunks += 1
                output = True
            if isinstance(delta, dict) and not _TEXT_ONLY.issuperset(delta):
                self.parts.add(index, delta)
            if (reason := choice.get("finish_reason")) and isinstance(reason, str):
                self.finish_reasons.append(reason)
                self.finished_choices.add(index)
        if output:
            self._note_output()
        return output

    def _note_output(self) -> None:
        """A chunk carrying output came now: the gap since the one before it is a time per output chunk."""
        now_s = time.perf_counter()
        if self.last_output_s is not None:
            self.chunk_gaps_s.append(now_s - self.last_output_s)
        self.last_output_s = now_s

    def _assemble(self, chunk: dict) -> None:
        assembled = self.assembled
        try:
            assembled.add(chunk)
        except UNFOLDABLE as exc:
            self.assembled, self.unassembled = None, f"its shape is not one the cache can replay ({exc!r})"
            return
        if assembled.chars > MAX_ASSEMBLED_CHARS:
            self.assembled, self.unassembled = None, f"it is over {MAX_ASSEMBLED_CHARS} characters"

    def _capture(self, chunk: dict) -> None:
        captured = self.captured
        try:
            captured.add(chunk)
        except UNFOLDABLE:
            self.captured = None        # a shape the assembler cannot fold: capture keeps the text alone
            return
        if captured.chars > MAX_ASSEMBLED_CHARS:
            self.captured = None        # as long as the cache would not keep: capture keeps the text alone

    def captured_answer(self) -> dict | None:
        """The non-stream body the stream added up to, when content capture asked for it (assembled once)."""
        if self._captured_body is None and self.captured is not None:
            try:
                self._captured_body = self.captured.body()
            except UNFOLDABLE:          # choice indexes of mixed types cannot be put in order, say
                self.captured = None
        return self._captured_body

    def finished(self, choices: int) -> bool:
        """Every one of the `choices` asked for has had its finish reason."""
        return all(index in self.finished_choices for index in range(choices))


#: Responses API events whose `delta` is output the model generated, and the part of the answer each is
RESPONSES_DELTAS = {
    "response.output_text.delta": CONTENT, "response.refusal.delta": "refusal",
    "response.function_call_arguments.delta": "arguments", "response.custom_tool_call_input.delta": "arguments",
    "response.reasoning_summary_text.delta": REASONING, "response.reasoning_text.delta": REASONING,
}
#: the Responses API events that end an answer whole, and the status each says its response has (cancelled: a
#: background response its client cancelled while it was streamed)
RESPONSES_ENDS = {"response.completed": "completed", "response.incomplete": "incomplete",
                  "response.cancelled": "cancelled"}
#: the Responses API events that report a failure
RESPONSES_FAILURES = frozenset({"error", "response.failed"})
#: the events a Responses API stream opens with before any output: held until the next, so that a model failing
#: before it generates anything can still be replaced
RESPONSES_PREAMBLE = frozenset({"response.created", "response.queued", "response.in_progress",
                                "response.output_item.added", "response.content_part.added"})


class ResponsesStreamState(StreamState):
    """What the relay learned from a Responses API stream: its output deltas, by output item and part (text,
    refusal, a tool call's arguments, reasoning), and its end."""

    __slots__ = ("status",)

    def __init__(self, assemble_for: str | None, capture_for: str | None = None) -> None:
        super().__init__(assemble_for, capture_for)
        self.status: str | None = None      # the status its end event says (RESPONSES_ENDS)

    def absorb(self, chunk: dict) -> bool:
        kind = event_type(chunk)
        if kind is None:
            return False
        part = RESPONSES_DELTAS.get(kind)
        if part is None:
            if kind == "response.output_item.added":
                self._item_added(chunk)
            elif (status := RESPONSES_ENDS.get(kind)) is not None:
                self.status = status
                if (reason := responses_finish_reason(response_of(chunk), status)) is not None:
                    self.finish_reasons.append(reason)      # (none for cancelled)
                self.finished_choices.add(0)
            return False
        delta = chunk.get("delta")
        if not isinstance(delta, str) or not delta:
            return False
        index = chunk.get("output_index", 0)
        index = index if type(index) is int else 0
        if part is CONTENT:
            self.parts.add_text(index, delta)
            self.text_chunks += 1
        else:
            self.parts.add_piece(index, part, delta)
        self.output_chunks += 1
        self._note_output()
        return True

    def _item_added(self, chunk: dict) -> None:
        """A function or custom tool call's name, which comes with its item (its arguments as deltas): kept for
        the usage estimate, as a whole answer's is."""
        item = chunk.get("item")
        index = chunk.get("output_index", 0)
        if isinstance(item, dict) and item.get("type") in ("function_call", "custom_tool_call") \
                and isinstance(name := item.get("name"), str) and name:
            self.parts.add_piece(index if type(index) is int else 0, "name", name)


def event_type(chunk: dict) -> str | None:
    """A Responses API event's `type`, None when it is not a string (a server's bug must not break the relay)."""
    kind = chunk.get("type")
    return kind if type(kind) is str else None


def response_of(chunk: dict) -> dict:
    """The response object a Responses API event carries (its id, model, status, usage); empty when it has none."""
    response = chunk.get("response")
    return response if isinstance(response, dict) else {}


def responses_failure(model_name: str, chunk: dict) -> UpstreamProtocolError | None:
    """The error a Responses API event reports (an `error` event, or `response.failed` with its response's
    error), None for any other event."""
    if event_type(chunk) not in RESPONSES_FAILURES:
        return None
    error = response_of(chunk).get("error") if "response" in chunk else chunk
    return UpstreamProtocolError(f"model '{model_name}' reported an error in its stream: "
                                 f"{error_message(error or chunk)}")


def _opening(chunk: dict, output: bool, usage: Usage | None, responses: bool) -> bool:
    """The event opens the stream and says nothing yet, so it is held until one that does: a Responses API
    preamble event (RESPONSES_PREAMBLE); a chat or completions chunk with no output (`output`: what `absorb`
    said of it), no finish reason and no usage of any output token, such as the role-only first chunk vLLM and
    OpenAI send before any token (vLLM's with its usage so far, none generated, when a client asks for
    `continuous_usage_stats`), or Azure's first, with no choices and its `prompt_filter_results`."""
    if responses:
        return event_type(chunk) in RESPONSES_PREAMBLE
    if output or (usage is not None and usage.output_tokens):
        return False
    choices = chunk.get("choices")
    return not isinstance(choices, list) or not any(isinstance(choice, dict) and choice.get("finish_reason")
                                                     for choice in choices)


def _carries_other_output(delta: dict) -> bool:
    """The delta carries output other than text: tool calls, a refusal, reasoning."""
    for name in OUTPUT_FIELDS:
        if delta.get(name):
            return True
    return False


def _parse_chunk(model_name: str, data: bytes) -> dict:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(f"model '{model_name}' sent an invalid stream event") from exc
    if not isinstance(chunk, dict):
        raise UpstreamProtocolError(f"model '{model_name}' sent a non-object stream event")
    if error := chunk.get("error"):     # an error object, or TGI's string: the SDK raises on either
        raise UpstreamProtocolError(f"model '{model_name}' reported an error in its stream: "
                                    f"{error_message(error)}")
    return chunk


async def relay_stream(ctx: RequestContext, attempt: Attempt, transport, call: UpstreamCall,
                       on_first_event: Callable[[RequestContext, Attempt], None],
                       energy=None) -> web.StreamResponse:
    """Relay one upstream stream; returns the client's response once the stream has ended."""
    if ctx.endpoint == "responses":     # never cached; its content capture keeps the text alone
        state: StreamState = ResponsesStreamState(assemble_for=None)
    else:
        state = StreamState(assemble_for=ctx.endpoint if ctx.cache_key is not None else None,
                            capture_for=ctx.endpoint if ctx.extra.get(CAPTURE_OUTPUT) else None)
    try:
        async with transport.stream(call) as events:
            await _relay_events(ctx, attempt, events, state, on_first_event, energy)
        if not state.finished(ctx.choices) and (not state.done or ctx.endpoint == "responses"):
            # ([DONE] ends a chat stream; a Responses API stream ends with its end event alone)
            raise UpstreamProtocolError(f"model '{attempt.model.name}' ended the stream early")
    except ConnectionError as exc:          # the client went away; leaving `stream` closed upstream
        if state.sent_whole and not isinstance(exc, ClientStalled):     # it left with the whole answer
            return await _left_whole(ctx, attempt, state)
        return _client_left(ctx, attempt, state)
    except asyncio.CancelledError:          # the client went away (the server cancels its handler)
        if not ctx.cut_by_shutdown and state.sent_whole:
            # it left once every choice had its finish (a chat UI's loop ends there), while the usage chunk the
            # gateway asked for, or [DONE], was awaited: the answer was whole, a success
            asyncio.current_task().uncancel()
            return await _left_whole(ctx, attempt, state)
        if ctx.cut_by_shutdown and ctx.bytes_sent:      # or the drain ran out: said in-band, not a silent cut
            await _end_with_error(ctx, ShuttingDown("the gateway is shutting down; the stream ends here"))
        _record(ctx, attempt, state)        # what it was sent is counted, and billed
        raise
    except Exception as exc:
        if not ctx.bytes_sent:
            raise
        # after the first byte, never a silent cut: the model's failure, or a bug of ours (which the
        # pipeline logs), ends the stream with an in-band error
        shown = exc if isinstance(exc, UpstreamError) else GatewayError("internal error")
        await _count_unreported(ctx, attempt, state)
        await _end_with_error(ctx, shown)
        _record(ctx, attempt, state)
        raise
    writer = ClientWriter(ctx)
    try:
        if not ctx.bytes_sent:              # an empty stream: [DONE] and nothing else
            await _open_client_stream(ctx, attempt, on_first_event)
        if attempt.usage is None:           # the model sent none: our count
            await _count_unreported(ctx, attempt, state)
            if ctx.include_usage:           # asked for: it gets the count it is billed
                await writer.write(_usage_event(ctx, attempt))
        if ctx.endpoint != "responses":     # the Responses API ends without [DONE]
            await writer.write(DONE)
        await writer.write_eof()
    except ConnectionError:                 # the answer was whole: the client left (or stalled) before its end
        return _client_left(ctx, attempt, state)
    attempt.status = 200
    _record(ctx, attempt, state)
    return ctx.response


async def _left_whole(ctx: RequestContext, attempt: Attempt, state: StreamState) -> web.StreamResponse:
    """Book a stream whose client left after every choice it asked for had its finish: a success (the model's
    usage when it came before, else the gateway's count of what was sent)."""
    await _count_unreported(ctx, attempt, state)
    attempt.status = 200
    _record(ctx, attempt, state)
    return ctx.response


async def _count_unreported(ctx: RequestContext, attempt: Attempt, state: StreamState) -> None:
    """The gateway's count of what the stream sent, when the model reported no usage: made before the stream's
    end (after it, a client closing once it has the whole stream would cut the count short, and a whole answer
    be booked 499)."""
    if attempt.usage is None:
        _record(ctx, attempt, state)        # what the count reads
        await count_usage(attempt, Estimate(ctx, attempt))


def _client_left(ctx: RequestContext, attempt: Attempt, state: StreamState) -> web.StreamResponse:
    """Book a stream whose client went away (or was cut for taking nothing): 499, charged what it was sent."""
    ctx.status = 499
    attempt.error_type = CLIENT_DISCONNECTED     # a call cut short: not a latency sample like the others
    _record(ctx, attempt, state)
    return ctx.response if ctx.bytes_sent else web.Response(status=499)


#: how often a write waiting on its client looks whether the client took any of what is queued for it
PROGRESS_CHECK_S = 1.0


@asynccontextmanager
async def client_time(ctx: RequestContext) -> AsyncIterator[None]:
    """Writes to the client; a client that takes none of the stream for `server.client_timeout_s` is cut. One
    that keeps taking it, however slowly, is not: a write may wait longer than that (the kernel says a full
    socket is writable again only once a good part of its buffer, megabytes, is free), so the deadline moves on
    whenever less is queued for the client than at the last look (`Queued`)."""
    timeout_s = ctx.policy.server.client_timeout_s
    transport = _transport(ctx)
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            if transport is None:
                yield
                return
            loop = asyncio.get_running_loop()
            queued = Queued(transport)
            step_s = min(PROGRESS_CHECK_S, timeout_s / 4)

            def look() -> None:
                nonlocal handle
                if queued.fell():
                    deadline.reschedule(loop.time() + timeout_s)
                handle = loop.call_later(step_s, look)

            handle = loop.call_later(step_s, look)
            try:
                yield
            finally:
                handle.cancel()
    except TimeoutError:
        _cut(ctx)
        raise ClientStalled("the client took none of the stream") from None


class Queued:
    """The bytes queued for a client: in the transport's buffer, and sent to the kernel but not yet acknowledged
    by the client's (Linux's TIOCOUTQ on the socket; elsewhere the transport's alone). Only the client taking
    some makes it fall while a write waits."""

    __slots__ = ("transport", "fd", "last")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None and _TIOCOUTQ is not None else -1
        self.last = self.now()

    def now(self) -> int:
        queued = self.transport.get_write_buffer_size()
        if self.fd >= 0:
            try:
                queued += int.from_bytes(fcntl.ioctl(self.fd, _TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)
            except OSError:                 # closed meanwhile, or no such request here: the buffer alone
                self.fd = -1
        return queued

    def fell(self) -> bool:
        """Whether less is queued than at the last look."""
        before, self.last = self.last, self.now()
        return self.last < before


_TIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None


def _transport(ctx: RequestContext) -> asyncio.Transport | None:
    """The client's connection (none for a request made without one: tests, tools)."""
    return ctx.http.transport if ctx.http is not None else None


def _cut(ctx: RequestContext) -> None:
    """Close the connection of a client that stopped reading: what is still to be written fails at once."""
    transport = _transport(ctx)
    if transport is not None:
        transport.abort()


def _usage_event(ctx: RequestContext, attempt: Attempt) -> bytes:
    """The usage chunk a client that asked for one gets when the model sent none: the tokens the gateway counted
    (as it bills them), in the chunk shape OpenAI ends a stream with."""
    return encode_event({"id": attempt.response_id or ctx.request_id,
                         "object": "chat.completion.chunk" if ctx.endpoint == "chat" else "text_completion",
                         "created": int(time.time()), "model": attempt.response_model or attempt.model.upstream_model,
                         "choices": [], "usage": usage_body(attempt.usage)})


async def _relay_events(ctx: RequestContext, attempt: Attempt, events: AsyncIterator[bytes], state: StreamState,
                        on_first_event: Callable[[RequestContext, Attempt], None], energy) -> None:
    """Pass the upstream's events on until [DONE] or its end, within the data event deadline; once every choice
    has finished, the usage chunk and [DONE] are waited for FINISHED_GRACE_S at most (a model that goes silent
    after a whole answer has given it)."""
    timeouts = attempt.model.timeouts
    wait_s = timeouts.first_byte_s
    grace_s = min(wait_s, FINISHED_GRACE_S)
    loop = asyncio.get_running_loop()
    # when the model's time runs out: total_s from the call's start, pushed back by the time the client took
    ends = loop.time() + timeouts.total_s - (time.perf_counter() - attempt.started_s)
    writer = ClientWriter(ctx)
    responses = ctx.endpoint == "responses"
    background = is_background(ctx)         # its opening events held only until its server names it
    held: list[bytes] = []                  # the stream's opening events (`_opening`), until the first that says more
    held_bytes = 0
    try:
        async with asyncio.timeout(min(wait_s, max(0.0, ends - loop.time()))) as deadline:
            async for event in events:
                if not event.endswith(b"\n\n"):   # the last, cut before its blank line: ended, so that what
                    event += b"\n"                # follows it ([DONE], an error event) is an event of its own
                data = event_data(event)
                if not data:                # a comment: kept alive for the client, not for the deadline (an
                    # event whose data is empty is not dispatched, as SSE says: the SDK could not parse it)
                    if ctx.bytes_sent and is_comment(event):    # `retry:`, `event:`, `id:` alone are dropped
                        when, waited_s = deadline.when(), writer.waited_s
                        deadline.reschedule(None)
                        await writer.write(event)
                        deadline.reschedule(when + (writer.waited_s - waited_s))
                    continue
                deadline.reschedule(None)   # from here to the next read, the client's time, not the model's
                if data.strip() == b"[DONE]":
                    state.done = True
                    if held and not ctx.bytes_sent and not responses:
                        # a chat stream of opening chunks alone ends as an empty one does: relayed as it came
                        await _open_with(ctx, attempt, on_first_event, writer, held)
                    return
                chunk = _parse_chunk(attempt.model.name, data)
                answer = chunk
                if responses:               # its events carry the response object, its id, model and usage
                    if (failure := responses_failure(attempt.model.name, chunk)) is not None:
                        raise failure
                    answer = response_of(chunk)
                if attempt.response_id is None or attempt.response_model is None:
                    read_identity(attempt, answer)
                output = state.absorb(chunk)        # once, whether the event is held or passed on at once
                usage = usage_from_response(answer)
                if "usage" in chunk and not ctx.include_usage and not responses:   # (a Responses event as it came)
                    event = _without_usage(chunk)
                if not ctx.bytes_sent:
                    size = len(event) if event is not None else 0
                    if _opening(chunk, output, usage, responses) and held_bytes + size <= MAX_HELD_BYTES \
                            and not (background and attempt.response_id):
                        if event is not None:
                            held.append(event)
                            held_bytes += size
                        deadline.reschedule(min(loop.time() + wait_s, ends + writer.waited_s))
                        continue
                    await _open_with(ctx, attempt, on_first_event, writer, held)
                if output and attempt.ttft_s is None:
                    attempt.ttft_s = state.last_output_s - attempt.started_s
                if attempt.energy_id is not None:
                    energy.progress(attempt.energy_id, ctx.prompt_tokens + state.output_chunks)
                if usage is not None:
                    attempt.usage = usage
                if event is not None:
                    await writer.write(event)
                answered = len(state.finished_choices) >= ctx.choices and state.finished(ctx.choices)
                state.sent_whole = answered
                if answered and responses:  # its end event is its last: no usage chunk nor [DONE] to wait for
                    return
                deadline.reschedule(min(loop.time() + (grace_s if answered else wait_s), ends + writer.waited_s))
    except TimeoutError as exc:
        if state.finished(ctx.choices):
            return                          # the answer is whole: the stream ends as if the model had said so
        if loop.time() >= ends + writer.waited_s:
            raise UpstreamTimeout(f"model '{attempt.model.name}' took longer than {timeouts.total_s:g} s") from exc
        raise UpstreamTimeout(f"model '{attempt.model.name}' sent no data for {wait_s:g} s") from exc


#: a write at most this long, to a client that has taken everything sent so far, cannot wait for it
QUICK_WRITE_BYTES = 16 * 1024


class ClientWriter:
    """Writes a stream to its client. A write that may wait for the client (some of the stream still unsent, or a
    large event) is bounded by `server.client_timeout_s`: a client that takes nothing for that long is cut, as
    one that left. A write the socket takes at once, the usual one, sets no timer. Keeps the time spent waiting,
    which is the client's, not the model's."""

    __slots__ = ("ctx", "transport", "waited_s")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.transport = _transport(ctx)
        self.waited_s = 0.0

    async def write(self, data: bytes) -> None:
        if self._quick(len(data)):
            await self.ctx.response.write(data)
            return
        loop = asyncio.get_running_loop()
        started_s = loop.time()
        try:
            async with client_time(self.ctx):
                await self.ctx.response.write(data)
        finally:
            self.waited_s += loop.time() - started_s

    async def write_eof(self) -> None:
        """End the stream (its last bytes may wait for the client too)."""
        if self._quick(0):
            await self.ctx.response.write_eof()
            return
        async with client_time(self.ctx):
            await self.ctx.response.write_eof()

    def _quick(self, size: int) -> bool:
        transport = self.transport
        return transport is not None and size <= QUICK_WRITE_BYTES and not transport.get_write_buffer_size()


def _without_usage(chunk: dict) -> bytes | None:
    """The event for a client that did not ask for usage (the gateway asked for it upstream): none for the usage
    chunk, nor for a chunk of the fields every chunk carries alone (FRAME_FIELDS: nothing to say); the chunk
    without its `usage` key otherwise (Azure's `prompt_filter_results` chunk, which has no choices, included)."""
    if not chunk.get("choices") and (chunk.get("usage") is not None or FRAME_FIELDS.issuperset(chunk)):
        return None
    return encode_event({key: value for key, value in chunk.items() if key != "usage"})


async def _open_client_stream(ctx: RequestContext, attempt: Attempt,
                              on_first_event: Callable[[RequestContext, Attempt], None]) -> web.StreamResponse:
    """The attempt has answered: prepare the client's response, with what the gateway knows at this point."""
    on_first_event(ctx, attempt)
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **response_headers(ctx)})
    ctx.response = response
    await response.prepare(ctx.http)
    ctx.bytes_sent = True
    return response


async def _open_with(ctx: RequestContext, attempt: Attempt,
                     on_first_event: Callable[[RequestContext, Attempt], None], writer: ClientWriter,
                     held: list[bytes]) -> None:
    """Open the client's stream with the opening events held until now, in the order they came."""
    await _open_client_stream(ctx, attempt, on_first_event)
    for opening in held:
        await writer.write(opening)


async def _end_with_error(ctx: RequestContext, exc: GatewayError) -> None:
    """End a stream already open with the in-band error event (a client that takes nothing is cut)."""
    try:
        async with client_time(ctx):
            await ctx.response.write(error_event(exc.message, error_type=exc.error_type, code=exc.code,
                                                 responses=ctx.endpoint == "responses"))
            await ctx.response.write_eof()
    except ConnectionError:
        pass


def _record(ctx: RequestContext, attempt: Attempt, state: StreamState) -> None:
    """Keep what the stream said, however it ended, for accounting, telemetry and the cache."""
    attempt.finish_reasons = tuple(state.finish_reasons)
    ctx.stream_record = state
