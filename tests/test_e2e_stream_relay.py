"""The stream relay against a model server writing scripted bytes: long and odd events, keep-alives, the data
event deadline, line ends, a BOM, streams without [DONE], clients that leave, and what the openai SDK sees.

The odd model, `raw` (first_byte_s 1, total_s 10), is a RawUpstream; `medium`
(a simulated backend) is its fallback on the `raw` route, and `raw-only` has none.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import openai
import pytest
import requests

from gateway.sse import MAX_EVENT_BYTES, EventTooLong, event_data, iter_events
from gateway.stages import relay
from gateway.stages.relay import StreamState
from tests.support.harness import Harness, ledgered_raw_model_gateway, reset_raw_model
from tests.support.raw_calls import breaker_failures, ledger_record, post, sdk_text
from tests.support.raw_upstream import SSE_HEAD, TEXT_EVENTS, chunk, sse

BOM = b"\xef\xbb\xbf"     # UTF-8's byte order mark, which SSE allows at the start of a stream
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


# events too long for a line reader ------------------------------------------------------------------------

def test_a_long_event_is_relayed_whole(env):
    """A 600 KB content chunk in one event (a big tool call's arguments, say) reaches the SDK whole, with what
    follows it; it used to end the stream silently, the SDK returning the text before it."""
    harness, raw = env
    big = "x" * 600_000
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("a"), chunk(big), chunk("b"),
                                  chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    assert sdk_text(harness) == "a" + big + "b"


def test_an_event_of_several_megabytes_under_the_cap_is_relayed_whole(env):
    """A 4 MB event (a tool call's whole arguments, a long document in one chunk), under the 8 MiB an event may
    take, reaches the SDK whole: the cap is for broken streams, not for large answers."""
    harness, raw = env
    big = "x" * 4_000_000
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk(big), chunk(None, finish="stop"), USAGE_CHUNK,
                                  b"[DONE]"), 0.0)]
    assert sdk_text(harness) == big


def test_an_event_past_the_cap_before_the_first_byte_is_a_bad_response_that_falls_back(env):
    """A first event that runs past MAX_EVENT_BYTES is the model's broken answer: the fallback answers and the
    breaker counts it (it used to be a 500 internal_error)."""
    harness, raw = env
    raw.script = [(SSE_HEAD + b"data: " + b"x" * (MAX_EVENT_BYTES + 1024) + b"\n\n", 0.0)]
    reply = post(harness, model="raw")
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"
    assert reply.headers["x-gateway-fallback-reason"] == "bad_response"
    assert reply.content.endswith(b"data: [DONE]\n\n")
    assert breaker_failures(harness, "raw") == 1


def test_an_event_past_the_cap_mid_stream_is_an_in_band_error_for_the_sdk(env):
    """After the first byte, an event past the cap ends the stream with an in-band error the SDK raises; it used
    to end silently, the SDK returning a truncated answer as if complete."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("a")), 0.0),
                  (b"data: " + b"x" * (MAX_EVENT_BYTES + 1024) + b"\n\n", 0.0)]
    with pytest.raises(openai.APIError, match="malformed stream"):
        sdk_text(harness)
    assert breaker_failures(harness, "raw") == 1


# chunks of odd shapes, and the gateway's own failures -----------------------------------------------------

@pytest.mark.parametrize("odd", [b'{"choices": ["x"]}', b'{"choices": [{"index": 0, "delta": "str"}]}',
                                 b'{"choices": {"0": {}}}', b'{"choices": [{"index": 0, "delta": null}]}'],
                         ids=["choice-string", "delta-string", "choices-object", "delta-null"])
def test_a_chunk_of_odd_shape_is_relayed_and_the_stream_completes(env, odd):
    """A chunk whose choices or delta are not objects is passed on as it came and the stream ends with [DONE];
    it used to crash the relay and cut the stream silently."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hi"), odd, chunk(None, finish="stop"),
                                  b"[DONE]"), 0.0)]
    reply = post(harness)
    assert reply.status_code == 200
    assert odd in reply.content and reply.content.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in reply.content
    assert breaker_failures(harness, "raw") == 0


def fault_after_the_first_byte(env, monkeypatch) -> Harness:
    """The raw model scripted to stream Hi, boom, stop; the gateway's own chunk bookkeeping made to fail on boom,
    after the stream's first byte went out."""
    harness, raw = env
    absorb = StreamState.absorb

    def failing(state: StreamState, chunk: dict) -> bool:
        if "boom" in json.dumps(chunk):
            raise RuntimeError("injected")
        return absorb(state, chunk)

    monkeypatch.setattr(StreamState, "absorb", failing)
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hi"), chunk("boom"), chunk(None, finish="stop"),
                                  b"[DONE]"), 0.0)]
    return harness


def test_a_failure_of_the_gateways_own_after_the_first_byte_is_reported_in_band(env, monkeypatch, caplog):
    """Whatever goes wrong in the relay after the first byte (here a fault injected into the gateway's own
    chunk bookkeeping) ends the stream with an in-band internal error the SDK raises, logged once; it is not
    the model's failure."""
    harness = fault_after_the_first_byte(env, monkeypatch)
    caplog.set_level("ERROR", logger="gateway")
    with pytest.raises(openai.APIError, match="internal error"):
        sdk_text(harness)
    assert breaker_failures(harness, "raw") == 0
    time.sleep(0.1)                     # the request is logged once it has ended, a moment after the client
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and str(errors[0].exc_info[1]) == "injected"


def test_a_stream_ended_in_band_is_booked_at_the_status_its_client_got(env, monkeypatch):
    """A stream a fault of the gateway's own ends in-band, after its 200 head was sent, is booked in the ledger
    at that 200 (what its client got), not as a success, nor at a 500 nobody received."""
    harness = fault_after_the_first_byte(env, monkeypatch)
    reply = post(harness)
    assert reply.status_code == 200 and b"internal error" in reply.content
    record = ledger_record(harness, reply.headers["x-request-id"])
    assert record["status"] == 200 and record["outcome"] != "success"


# a client that leaves -------------------------------------------------------------------------------------

def test_a_client_leaving_mid_stream_is_charged_for_what_it_was_sent(env):
    """A client that hangs up after ten words (the server cancels its handler) is charged the output it was
    sent, estimated, with its finish state kept; it used to be charged no output at all."""
    harness, raw = env
    words = [chunk(f" word{i}") for i in range(40)]
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), *words[:10]), 0.0)] + \
                 [(sse(word), 0.1) for word in words[10:]] + [(sse(chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    body = json.dumps({"model": "raw-only", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.create_connection(("127.0.0.1", harness.port))
    client.settimeout(10)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"x-request-id: leaves-after-ten\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    received = bytearray()
    while received.count(b"data:") < 11:
        received += client.recv(65536)
    client.close()
    record = ledger_record(harness, "leaves-after-ten")
    assert record["status"] == 499 and record["attempts"][0]["error"] == "client_disconnected"
    assert record["output_tokens"] >= 10 and record["tokens_estimated"]


# the data event deadline ----------------------------------------------------------------------------------

def test_keepalives_do_not_hold_off_the_first_byte_deadline(env):
    """A model that only sends `: ping` comments (queued) times out at first_byte_s (1 s) and the fallback
    answers; the comments used to keep it waiting until total_s (10 s)."""
    harness, raw = env
    raw.script = [(SSE_HEAD, 0.0)] + [(b": ping\n\n", 0.3) for _ in range(30)]
    started_s = time.monotonic()
    reply = post(harness, model="raw")
    assert time.monotonic() - started_s < 2.5
    assert reply.headers["x-gateway-model"] == "medium" and reply.headers["x-gateway-fallback-reason"] == "timeout"
    assert breaker_failures(harness, "raw") == 1


def test_keepalives_do_not_hold_off_the_deadline_between_chunks(env):
    """Mid-stream, a model sending only comments for first_byte_s ends the stream with an in-band timeout
    within about that time, the comments passed on until then; it used to wait for total_s."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello")), 0.0)] + \
                 [(b": ping\n\n", 0.3) for _ in range(30)]
    started_s = time.monotonic()
    body = post(harness).content
    assert time.monotonic() - started_s < 2.5
    assert b": ping\n\n" in body and b'"upstream_timeout"' in body and b"[DONE]" not in body


def test_a_slow_client_does_not_time_the_model_out(env):
    """Time spent waiting on a client that stops reading (2.5 s, past first_byte_s) is not counted against
    the model: the stream completes once the client reads again."""
    harness, raw = env
    payload = "y" * 8000
    raw.script = [(SSE_HEAD + sse(chunk("", role=True)), 0.0)] + [(sse(chunk(payload)), 0.0)] * 2000 + \
                 [(sse(chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    body = json.dumps({"model": "raw-only", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", harness.port))
    client.settimeout(60)                               # the gateway counts 16 MB before [DONE]: seconds when loaded
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
    received = bytearray(client.recv(4096))             # appended to in place: 16 MB in small reads
    time.sleep(2.5)
    while not received.endswith(b"\r\n0\r\n\r\n"):      # the end of the chunked body
        received += client.recv(1 << 20)
    client.close()
    assert b'"error"' not in received and received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert breaker_failures(harness, "raw") == 0


# TTFT and time per output chunk ---------------------------------------------------------------------------

def test_ttft_is_the_first_chunk_carrying_output(env):
    """An early chunk with only the role does not stop the TTFT clock: it runs to the first content (0.6 s)."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True)), 0.0),
                  (sse(chunk("Hello"), chunk(None, finish="stop"), b"[DONE]"), 0.6)]
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n")
    assert ledger_record(harness, reply.headers["x-request-id"])["ttft_s"] >= 0.5


def test_ttft_stays_at_the_first_output_chunk_however_long_the_rest_takes(env):
    """TTFT is when the first output came, kept as the rest of the answer comes: content trickling on for over a
    second after it does not move TTFT on to the last chunk's time."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello")), 0.0)] + \
                 [(sse(chunk(" again")), 0.3) for _ in range(4)] + [(sse(chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n")
    record = ledger_record(harness, reply.headers["x-request-id"])
    assert record["ttft_s"] <= record["latency_s"] - 1.0


def test_output_chunks_alone_are_timed():
    """Only chunks carrying output (content, tool calls, refusal, reasoning; chat or completions) count as
    output: the role chunk, finish chunk, usage chunk and odd shapes neither stamp nor split the time per
    output chunk."""
    state = StreamState(assemble_for=None)
    tool_call = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
              tool_call, {"choices": ["x"]}, {"choices": [{"index": 0, "delta": "str"}]},
              {"choices": [{"index": 0, "text": "done"}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 4}}]
    carried = [state.absorb(c) for c in chunks]
    assert carried == [False, True, True, True, False, False, True, False, False]
    assert len(state.chunk_gaps_s) == 3 and state.parts.texts() == [(0, "Hidone")] and state.text_chunks == 2
    assert state.finish_reasons == ["stop"] and state.finished(1) and not state.finished(2)


# keep-alives, a stream without [DONE], line ends ----------------------------------------------------------

def test_keepalives_mid_stream_reach_the_client(env):
    """`: ping` comments sent once the response is open are passed on (idle proxies and read timeouts see
    traffic), and the SDK still reads the answer; they used to be dropped."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello")), 0.0), (b": ping\n\n", 0.3),
                  (b": ping\n\n", 0.3), (sse(chunk(" world"), chunk(None, finish="stop"), b"[DONE]"), 0.3)]
    body = post(harness).content
    assert body.count(b": ping\n\n") == 2 and body.endswith(b"data: [DONE]\n\n")
    assert sdk_text(harness) == "Hello world"


def test_a_stream_whose_choices_all_finished_is_complete_without_done(env):
    """A model that finishes every choice and closes without [DONE] answered: the client gets [DONE], the
    request is a 200 and the breaker counts nothing; it used to be an in-band error and a model failure."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello"), chunk(None, finish="stop")), 0.0)]
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.content
    assert ledger_record(harness, reply.headers["x-request-id"])["status"] == 200
    assert sdk_text(harness) == "Hello"
    assert breaker_failures(harness, "raw") == 0


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_cut_before_every_choice_finished_is_an_error(env, n):
    """Without [DONE], a stream ends complete only when each of the `n` choices asked for has finished:
    one cut before its finish reason, or with a choice unfinished, ends with an in-band error."""
    harness, raw = env
    events = [chunk("", role=True), chunk("Hello")] + ([chunk(None, finish="stop")] if n == 2 else [])
    raw.script = [(SSE_HEAD + sse(*events), 0.0)]
    body = post(harness, n=n).content
    assert b'"upstream_bad_response"' in body and b"[DONE]" not in body
    assert breaker_failures(harness, "raw") == 1


def test_done_with_trailing_whitespace_ends_the_stream(env):
    """`data: [DONE] ` (a blank after it) after every choice finished ends the stream: the SDK reads the answer,
    the request is a 200 and the breaker counts nothing; it used to be an in-band bad response."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:-1]) + b"data: [DONE] \n\n", 0.0)]
    assert sdk_text(harness) == "Hello world"
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.content
    assert ledger_record(harness, reply.headers["x-request-id"])["status"] == 200
    assert breaker_failures(harness, "raw") == 0


@pytest.mark.parametrize("odd", [b"retry: 3000\n\n", b"event: ping\n\n", b"id: 7\n\n", b": ping\nretry: 3000\n\n"],
                         ids=["retry", "event", "id", "comment-and-retry"])
def test_an_event_without_data_that_is_not_a_comment_is_dropped(env, odd):
    """An event of other fields and no data mid-stream is not passed on, and the SDK reads the answer; it used
    to be forwarded like a keep-alive, and the SDK raised JSONDecodeError on it."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:2]) + b": ping\n\n" + odd + sse(*TEXT_EVENTS[2:]), 0.0)]
    assert sdk_text(harness) == "Hello world"
    body = post(harness).content
    assert odd not in body and b": ping\n\n" in body and body.endswith(b"data: [DONE]\n\n")


def test_a_bom_opening_the_stream_is_ignored_even_split(env):
    """A UTF-8 BOM before the first event (which SSE allows) is skipped, also when it comes split across reads:
    the SDK reads the whole answer; its first event used to be taken for a comment and dropped."""
    harness, raw = env
    body = BOM + sse(*TEXT_EVENTS[1:])     # the first event carries text
    raw.script = [(SSE_HEAD + body, 0.0)]
    assert sdk_text(harness) == "Hello world"
    raw.script = [(SSE_HEAD, 0.0), (body[:1], 0.02), (body[1:2], 0.02), (body[2:], 0.02)]
    assert sdk_text(harness) == "Hello world"
    assert breaker_failures(harness, "raw") == 0


@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_every_line_end_sse_allows_is_read_even_split_at_every_line_end(env, eol):
    """Bare CR line ends (which SSE and the openai SDK allow) are read like LF and CRLF, also when the stream
    comes cut before and after every line end byte, a CRLF split across two reads; bare CR used to fail the
    stream. (Cut at every byte in two reads, without a model: `test_events_are_the_same_however_the_stream_is_cut`;
    a byte a read here took a whole data event past first_byte_s on a loaded machine.)"""
    harness, raw = env
    body = sse(*TEXT_EVENTS, eol=eol)
    raw.script = [(SSE_HEAD + body, 0.0)]
    assert sdk_text(harness) == "Hello world"
    cuts = sorted({0, len(body)} | {at + step for at, byte in enumerate(body) if byte in b"\r\n" for step in (0, 1)})
    pieces = [body[start:end] for start, end in zip(cuts, cuts[1:]) if end > start]
    assert any(piece == b"\n" for piece in pieces) == (eol != b"\r")     # a CRLF's LF comes alone
    raw.script = [(SSE_HEAD, 0.0)] + [(piece, 0.002) for piece in pieces]
    assert sdk_text(harness) == "Hello world"
    assert breaker_failures(harness, "raw") == 0


# the event reader ----------------------------------------------------------------------------------------

async def _events(pieces: list[bytes], max_event_bytes: int = MAX_EVENT_BYTES) -> list[bytes]:
    async def source():
        for piece in pieces:
            yield piece
    return [event async for event in iter_events(source(), max_event_bytes)]


@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_events_are_the_same_however_the_stream_is_cut(eol):
    """Split into two reads at any point, a stream with comments, blank lines between events, multi-line data
    and a last event without its blank line yields the same LF-ended events."""
    lines = [b": ping", b"", b"", b"data: {\"a\": 1}", b"", b"event: message", b"data: x", b"data: y", b"",
             b"", b"data: [DONE]"]
    stream = eol.join(lines)
    expected = [b": ping\n\n", b'data: {"a": 1}\n\n', b"event: message\ndata: x\ndata: y\n\n", b"data: [DONE]\n"]
    for cut in range(len(stream) + 1):
        assert asyncio.run(_events([stream[:cut], stream[cut:]])) == expected, cut


def test_the_data_lines_of_an_event_are_joined_with_a_line_feed():
    """An event's data lines are joined with a line feed, as SSE (and the SDK reading the relayed event) joins
    them, so the gateway reads the payload the client will; a comment carries no data."""
    assert event_data(b'data: {"a":\ndata: 1}\n\n') == b'{"a":\n1}'
    assert event_data(b"event: message\ndata: x\ndata: y\n\n") == b"x\ny"
    assert event_data(b": ping\n\n") is None


def test_an_event_past_the_cap_is_refused():
    """An event longer than the cap raises EventTooLong, whether it came in one read, in pieces, or is still
    unfinished; one at the cap passes."""
    at_cap = b"data: " + b"x" * 94
    assert asyncio.run(_events([at_cap + b"\n\n"], max_event_bytes=100)) == [at_cap + b"\n\n"]
    for pieces in ([at_cap + b"x\n\n"], [at_cap, b"x", b"\n\n"], [b"data: a\n\n" + at_cap + b"x"]):
        with pytest.raises(EventTooLong):
            asyncio.run(_events(pieces, max_event_bytes=100))


def test_an_event_a_byte_past_the_cap_is_refused_when_the_stream_ends_before_it_does():
    """An event one byte past the cap that the stream ends in the middle of raises EventTooLong, whether it came
    in one read or in two; it is not yielded as the stream's last event."""
    at_cap = b"data: " + b"x" * 94
    for pieces in ([at_cap + b"x"], [at_cap, b"x"], [b"data: ", b"x" * 95]):
        with pytest.raises(EventTooLong):
            asyncio.run(_events(pieces, max_event_bytes=100))


@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_the_cap_holds_the_same_however_the_event_is_split(eol):
    """An event at the cap (after a blank line) passes and one a byte longer is refused, split into two reads at
    any point or read a byte at a time; the final line end coming alone used to refuse the one at the cap."""
    at_cap = b"data: " + b"x" * 94
    for event, refused in ((at_cap, False), (at_cap + b"x", True)):
        stream = eol + event + eol + eol
        splits = [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
        for pieces in [*splits, [stream[i:i + 1] for i in range(len(stream))]]:
            if refused:
                with pytest.raises(EventTooLong):
                    asyncio.run(_events(pieces, max_event_bytes=100))
            else:
                assert asyncio.run(_events(pieces, max_event_bytes=100)) == [at_cap + b"\n\n"], pieces


def test_one_bom_is_skipped_at_the_start_however_it_is_split():
    """One BOM opening the stream is dropped wherever reads cut it; a second one, and bytes that only begin like
    a BOM, are kept."""
    stream = BOM + b"data: a\n\n" + BOM + b"data: b\n\n"
    for cut in range(len(stream) + 1):
        assert asyncio.run(_events([stream[:cut], stream[cut:]])) == [b"data: a\n\n", BOM + b"data: b\n\n"], cut
    assert asyncio.run(_events([BOM[:1], BOM[1:2] + b"X\n\n"])) == [BOM[:2] + b"X\n\n"]


# usage, identity and the end of a stream ------------------------------------------------------------------

USAGE_CHUNK = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                          "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                   "total_tokens": 7}}).encode()
#: Azure OpenAI's opening chunk: the prompt's content-filter results, no choices, an empty id and model
AZURE_FILTER_CHUNK = json.dumps({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                                 "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                                 "usage": None}).encode()


def usage_chunks(body: bytes) -> list[dict]:
    """The chunks of a relayed stream that carry a usage count."""
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in body.split(b"\n\n")
              if event.startswith(b"data: {")]
    return [chunk for chunk in chunks if chunk.get("usage")]


def sdk_usage_stream(harness):
    """The chunks the openai SDK yields for a chat stream that asks for usage."""
    return list(harness.openai().chat.completions.create(
        model="raw-only", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}]))


@pytest.mark.parametrize("ending", [[b"[DONE]"], []], ids=["done", "cut-after-finish"])
def test_a_client_that_asked_for_usage_gets_the_gateways_count_when_the_model_sends_none(env, ending):
    """A model that ignores stream_options (older TGI, llama.cpp), or whose stream ends after the finish, before its
    usage chunk: the SDK still gets a usage chunk before [DONE], with the tokens the gateway counted and bills."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:-1], *ending), 0.0)]
    chunks = sdk_usage_stream(harness)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 2 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    reply = post(harness, stream_options={"include_usage": True})
    record = ledger_record(harness, reply.headers["x-request-id"])
    assert (record["output_tokens"], record["tokens_estimated"]) == (2, True)
    assert len(usage_chunks(reply.content)) == 1 and reply.content.endswith(b"data: [DONE]\n\n")


def test_the_models_own_usage_chunk_is_relayed_once_and_no_count_is_added(env):
    """A model that sends its usage: the client that asked gets exactly that one, not a second."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:-1], USAGE_CHUNK, b"[DONE]"), 0.0)]
    reply = post(harness, stream_options={"include_usage": True})
    assert [chunk["usage"]["completion_tokens"] for chunk in usage_chunks(reply.content)] == [2]
    assert ledger_record(harness, reply.headers["x-request-id"])["tokens_estimated"] is False


def test_a_model_silent_after_its_whole_answer_ends_the_stream_as_complete(env):
    """Every choice finished, then the model holds the connection open without [DONE]: after the short grace the
    stream ends whole, [DONE] and a 200 (it used to wait first_byte_s, then end with an in-band timeout that
    made the SDK throw the answer away)."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello"), chunk(None, finish="stop")), 0.0),
                  (b"", 30.0)]
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n") and b'"error"' not in reply.content
    assert ledger_record(harness, reply.headers["x-request-id"])["status"] == 200
    assert breaker_failures(harness, "raw") == 0


def test_azures_filter_chunk_reaches_a_client_that_did_not_ask_for_usage(env):
    """Azure opens with a choices-less `prompt_filter_results` chunk (`usage: null`, as the gateway asks upstream
    for usage): it reaches every client, without the usage key, where only the real usage chunk is held back."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(AZURE_FILTER_CHUNK, *TEXT_EVENTS[:-1], USAGE_CHUNK, b"[DONE]"), 0.0)]
    events = [event for event in post(harness).content.split(b"\n\n") if event]
    assert b"prompt_filter_results" in events[0] and b'"usage"' not in events[0]
    assert not any(b"completion_tokens" in event for event in events)
    assert events[-1] == b"data: [DONE]"


def test_a_choiceless_chunk_with_a_null_usage_is_not_passed_to_a_client_that_did_not_ask_for_usage(env):
    """A chunk of no choices, the fields every chunk carries and `usage: null` (what a server may send once the
    gateway asks it for usage) says nothing to a client that did not ask for usage: it is not passed on, so code
    reading each chunk's `choices[0]` never meets an empty list."""
    harness, raw = env
    empty = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                        "choices": [], "usage": None}).encode()
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:2], empty, *TEXT_EVENTS[2:]), 0.0)]
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in post(harness).content.split(b"\n\n")
              if event.startswith(b"data: {")]
    assert len(chunks) == 4 and all(each["choices"] for each in chunks)


def test_a_batch_completions_stream_cut_before_every_prompt_finished_is_an_error(env):
    """A completions request with two prompts is answered with a choice per prompt (n × prompts): a stream that
    finishes choice 0 and ends is cut, an in-band error, not a complete answer missing choice 1."""
    harness, raw = env

    def text_chunk(index: int, text: str, finish: str | None = None) -> bytes:
        return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake",
                           "choices": [{"index": index, "text": text, "finish_reason": finish,
                                        "logprobs": None}]}).encode()
    raw.script = [(SSE_HEAD + sse(text_chunk(0, "a"), text_chunk(1, "b"), text_chunk(0, "", "stop")), 0.0)]
    body = requests.post(f"{harness.base_url}/v1/completions", timeout=30,
                         json={"model": "raw-only", "stream": True, "prompt": ["one", "two"]}).content
    assert b'"upstream_bad_response"' in body and b"[DONE]" not in body


def test_the_grace_after_every_choice_finished_is_shorter_than_first_byte_s(env, monkeypatch):
    """A model that goes quiet after every choice finished (no [DONE]) is waited for FINISHED_GRACE_S, not a
    whole first_byte_s (often tens of seconds in production), before the stream ends with [DONE]."""
    monkeypatch.setattr(relay, "FINISHED_GRACE_S", 0.1)        # first_byte_s is 1 s here
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello"), chunk(None, finish="stop")), 0.0),
                  (b"", 30.0)]
    started_s = time.monotonic()
    reply = post(harness)
    assert reply.content.endswith(b"data: [DONE]\n\n")
    assert time.monotonic() - started_s < 0.9
