"""Streams assembled into entries, and entries replayed as JSON or as SSE the openai SDK parses."""

from __future__ import annotations

import copy
import tracemalloc

import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gateway.cache.assemble import MAX_ASSEMBLED_CHARS, StreamAssembler, assemble_stream
from gateway.cache.entry import CacheEntry, entry_from_response, entry_from_stream
from gateway.cache.replay import replay_response, replay_sse
from gateway.stages.relay import StreamState

HEADER = {"id": "chatcmpl-42", "created": 1700000000, "model": "sim-small-1b"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
TOOL_CALLS = [
    {"id": "call_a", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]


def chat_response(message: dict, finish_reason: str) -> dict:
    return {**HEADER, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason}], "usage": USAGE}


TEXT_RESPONSE = chat_response({"role": "assistant", "content": "Hello there, world."}, "stop")
TOOL_RESPONSE = chat_response({"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
                              "tool_calls")
COMPLETION_RESPONSE = {**HEADER, "id": "cmpl-7", "object": "text_completion", "usage": USAGE,
                       "choices": [{"index": 0, "text": " and so on.", "logprobs": None,
                                    "finish_reason": "length"}]}


def chunk(delta: dict, finish_reason: str | None = None, **extra: object) -> dict:
    return {**HEADER, "object": "chat.completion.chunk", **extra,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def tool_delta(index: int, **fields: object) -> dict:
    return {"tool_calls": [{"index": index, **fields}]}


TEXT_CHUNKS = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
               chunk({"content": " there,"}), chunk({"content": " world."}), chunk({}, "stop"),
               {**HEADER, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}]
TOOL_CHUNKS = [
    chunk({"role": "assistant", "content": None, **tool_delta(
        0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""})}),
    chunk(tool_delta(0, function={"arguments": '{"city": '})),
    chunk(tool_delta(0, function={"arguments": '"Paris"}'})),
    chunk(tool_delta(1, id="call_b", type="function",
                     function={"name": "get_time", "arguments": ""})),
    chunk(tool_delta(1, function={"arguments": "{}"})),
    chunk({}, "tool_calls"),
    {**HEADER, "object": "chat.completion.chunk", "choices": [], "usage": USAGE},
]


def parse_sse(events: list[bytes]) -> list[dict]:
    """The JSON chunks of an SSE stream, checking its framing and the final [DONE]."""
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    return [orjson.loads(e[len(b"data: "):]) for e in events[:-1]]


@pytest.mark.parametrize("chunks, response", [(TEXT_CHUNKS, TEXT_RESPONSE),
                                              (TOOL_CHUNKS, TOOL_RESPONSE)])
def test_a_stream_assembles_into_the_non_stream_answer(chunks: list, response: dict) -> None:
    """A streamed answer, tool calls included, assembles into the same body as the non-stream answer."""
    assert assemble_stream("chat", chunks) == response


def test_a_streamed_text_answer_is_the_entry_of_its_non_stream_twin() -> None:
    """A finished text stream becomes the same entry as the non-stream answer; a tool-call turn is no entry."""
    streamed = entry_from_stream(StreamAssembler.of("chat", TEXT_CHUNKS))
    assert streamed is not None
    assert streamed.body == entry_from_response("chat", TEXT_RESPONSE).body
    assert entry_from_stream(StreamAssembler.of("chat", TOOL_CHUNKS)) is None


def test_completions_stream_assembles() -> None:
    """Completions chunks concatenate their text and keep the finish reason and usage."""
    base = {**HEADER, "id": "cmpl-7", "object": "text_completion"}
    chunks = [{**base, "choices": [{"index": 0, "text": " and so", "logprobs": None,
                                    "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "text": " on.", "logprobs": None,
                                    "finish_reason": "length"}]},
              {**base, "choices": [], "usage": USAGE}]
    assert entry_from_stream(StreamAssembler.of("completions", chunks)).body == COMPLETION_RESPONSE


def test_unfinished_stream_is_not_an_entry() -> None:
    """A stream cut before its finish chunk is not cached."""
    assert entry_from_stream(StreamAssembler.of("chat", TEXT_CHUNKS[:3])) is None
    assert entry_from_stream(StreamAssembler.of("chat", [])) is None


@pytest.mark.parametrize("endpoint, response", [("chat", TEXT_RESPONSE), ("chat", TOOL_RESPONSE),
                                                ("completions", COMPLETION_RESPONSE)])
def test_replayed_stream_assembles_back_to_the_entry(endpoint: str, response: dict) -> None:
    """Replaying an entry as SSE and assembling the chunks gives the cached body back."""
    entry = CacheEntry(endpoint, response)
    chunks = parse_sse(replay_sse(entry, include_usage=True))
    assert assemble_stream(endpoint, chunks) == response


def test_usage_chunk_only_when_asked() -> None:
    """The usage chunk (with empty choices) is sent only when the client asked for it."""
    entry = CacheEntry("chat", TEXT_RESPONSE)
    with_usage = parse_sse(replay_sse(entry, include_usage=True))
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == USAGE
    without = parse_sse(replay_sse(entry, include_usage=False))
    assert all(c["choices"] and "usage" not in c for c in without)
    assert without[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_with_usage_asked_every_chunk_before_the_usage_chunk_has_a_null_usage() -> None:
    """As a live stream with include_usage: each content chunk carries `"usage": null`, the last one the usage."""
    chunks = parse_sse(replay_sse(CacheEntry("chat", TEXT_RESPONSE), include_usage=True))
    assert [c["usage"] for c in chunks] == [None] * (len(chunks) - 1) + [USAGE]


def test_replay_response_is_a_copy_with_the_cached_id() -> None:
    """The JSON replay keeps the cached id and cannot corrupt the entry when changed."""
    entry = CacheEntry("chat", copy.deepcopy(TEXT_RESPONSE))
    body = replay_response(entry, request_id="req-1")
    assert body == TEXT_RESPONSE
    body["choices"][0]["message"]["content"] = "changed"
    assert entry.body == TEXT_RESPONSE


def test_a_replayed_answer_without_an_id_gets_the_request_s_but_embeddings_get_none() -> None:
    """A chat answer cached without an id is replayed with the request's; an embeddings answer, which has no id
    when fresh, is replayed as it was cached."""
    chat = {**TEXT_RESPONSE, "id": ""}
    assert replay_response(CacheEntry("chat", chat), request_id="req-1")["id"] == "req-1"
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [0.5], "index": 0}], "model": "e"}
    assert replay_response(CacheEntry("embeddings", embeddings), request_id="req-1") == embeddings


def test_an_embeddings_entry_cannot_be_replayed_as_a_stream() -> None:
    """Embeddings have no stream form: asking for one is an error, not a stream of nothing but [DONE]."""
    embeddings = {"object": "list", "data": [{"object": "embedding", "embedding": [0.5], "index": 0}], "model": "e"}
    with pytest.raises(ValueError):
        replay_sse(CacheEntry("embeddings", embeddings), include_usage=False)


async def serve_sse(aiohttp_events: dict[str, list[bytes]]) -> web.AppRunner:
    """A tiny OpenAI-shaped server on 127.0.0.1:0 that streams the given events per path."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in aiohttp_events[request.path]:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    for path in aiohttp_events:
        app.router.add_post(path, stream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_openai_sdk_parses_replayed_streams() -> None:
    """The official SDK streams cached chat (text and tool calls) and completions answers intact."""
    runner = await serve_sse({
        "/v1/chat/completions": replay_sse(CacheEntry("chat", TOOL_RESPONSE), include_usage=True),
        "/v1/completions": replay_sse(CacheEntry("completions", COMPLETION_RESPONSE),
                                      include_usage=True),
    })
    port = runner.addresses[0][1]
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
    try:
        async with client.chat.completions.stream(
                model="auto", messages=[{"role": "user", "content": "hi"}],
                stream_options={"include_usage": True}) as stream:
            final = await stream.get_final_completion()
        message = final.choices[0].message
        assert final.id == "chatcmpl-42" and final.choices[0].finish_reason == "tool_calls"
        assert [(c.id, c.type, c.function.name, c.function.arguments)
                for c in message.tool_calls] == [
            (c["id"], c["type"], c["function"]["name"], c["function"]["arguments"])
            for c in TOOL_CALLS]
        assert final.usage.total_tokens == 21
        texts, finish = [], None
        async for part in await client.completions.create(model="auto", prompt="x", stream=True):
            for choice in part.choices:
                texts.append(choice.text)
                finish = choice.finish_reason or finish
        assert ("".join(texts), finish) == (" and so on.", "length")
    finally:
        await client.close()
        await runner.cleanup()


async def test_openai_sdk_parses_replayed_text_stream() -> None:
    """Raw SDK streaming of a cached text answer yields the original content and usage."""
    runner = await serve_sse({"/v1/chat/completions": replay_sse(
        CacheEntry("chat", TEXT_RESPONSE), include_usage=True)})
    port = runner.addresses[0][1]
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
    try:
        parts = [p async for p in await client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], stream=True)]
        content = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert content == "Hello there, world."
        assert parts[-1].usage.total_tokens == 21
    finally:
        await client.close()
        await runner.cleanup()


def _text_chunk(text: str, finish: str | None = None) -> dict:
    return {**HEADER, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def test_a_long_stream_is_assembled_without_keeping_its_chunks() -> None:
    """The relay folds each chunk into the answer as it passes: 20,000 chunks leave the answer's text, not
    20,000 chunk objects, in memory (about 2 MB here; 19 MB when the chunks were kept)."""
    state = StreamState(assemble_for="chat")
    tracemalloc.start()
    try:
        raw = orjson.dumps(_text_chunk("tok "))
        for _ in range(20_000):
            state.absorb(orjson.loads(raw))     # parsed as the relay parses each event: objects of its own
        held_bytes, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    state.absorb(_text_chunk("", finish="stop"))
    assert held_bytes < 5_000_000
    entry = entry_from_stream(state.assembled)
    assert entry is not None and entry.body["choices"][0]["message"]["content"] == "tok " * 20_000


def test_a_stream_too_long_to_store_is_given_up_as_it_passes() -> None:
    """Past MAX_ASSEMBLED_CHARS of text the relay stops assembling (no entry could be stored), and says why."""
    state = StreamState(assemble_for="chat")
    piece = "x" * 65_536
    for _ in range(MAX_ASSEMBLED_CHARS // len(piece) + 1):
        state.absorb(_text_chunk(piece))
    assert state.assembled is None and "over" in state.unassembled


def test_a_chunk_of_a_shape_the_cache_cannot_replay_stops_only_the_assembly() -> None:
    """A chunk the assembler cannot fold in (a choice index that is a list) is relayed as before; only the
    cache gives the answer up."""
    state = StreamState(assemble_for="chat")
    state.absorb(_text_chunk("Hello"))
    odd = {**HEADER, "choices": [{"index": [0], "delta": {"content": " world"}, "finish_reason": None}]}
    assert state.absorb(odd) is True
    assert state.assembled is None and "not one the cache can replay" in state.unassembled
    assert state.parts.texts() == [(0, "Hello world")]
