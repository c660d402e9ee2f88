"""Answer from a cache entry: as a JSON body, or as a well-formed OpenAI SSE stream."""

from __future__ import annotations

import copy
from typing import Any

import orjson

from gateway.cache.entry import CacheEntry

DONE_EVENT = b"data: [DONE]\n\n"
#: top-level fields every replayed chunk repeats, as every live chunk does; not `obfuscation`,
#: random padding that means nothing in a replay
CHUNK_HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
#: top-level fields replayed by a rule of their own; any other (`moderation`, Azure's `prompt_filter_results`),
#: which a live stream sends on one chunk only, is replayed on the first
FRAME_FIELDS = frozenset((*CHUNK_HEADER_FIELDS, "object", "choices", "usage"))
#: a choice's fields replayed by a rule of their own; any other (Azure's `content_filter_results`, vLLM's
#: `stop_reason`) is replayed on the choice's finishing chunk
CHOICE_FIELDS = frozenset(("index", "message", "text", "logprobs", "finish_reason"))
#: message fields replayed by a rule of their own; any other field is replayed whole, in one delta
MESSAGE_FIELDS = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


def replay_response(entry: CacheEntry, *, request_id: str) -> dict[str, Any]:
    """The cached non-stream body, a fresh copy the caller may change.

    The cached `id` is kept on purpose (a repeated id tells the client it got a
    replay); `request_id` only fills in a chat or completions body that has none.
    """
    body = copy.deepcopy(entry.body)
    if entry.endpoint != "embeddings" and not body.get("id"):
        body["id"] = request_id
    return body


def replay_sse(entry: CacheEntry, *, include_usage: bool) -> list[bytes]:
    """The SSE events (`data: ...\\n\\n`) that stream the cached answer, [DONE] last."""
    if entry.endpoint == "embeddings":
        raise ValueError("embeddings responses cannot be streamed")
    chunks = chat_chunks(entry.body) if entry.endpoint == "chat" else text_chunks(entry.body)
    header = _chunk_header(entry)
    if include_usage:
        header["usage"] = None
    first = {name: value for name, value in entry.body.items() if name not in FRAME_FIELDS and value is not None}
    events = [_event({**header, **(first if position == 0 else {}), "choices": choices})
              for position, choices in enumerate(chunks)]
    if include_usage and entry.body.get("usage"):
        events.append(_event({**header, "choices": [], "usage": entry.body["usage"]}))
    events.append(DONE_EVENT)
    return events


def chat_chunks(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The `choices` lists of the chat chunks, choice after choice."""
    chunks = []
    for choice in body.get("choices") or ():
        index, message = choice.get("index", 0), choice.get("message") or {}
        chunks.extend(_chat_choice(index, delta, None) for delta in message_deltas(message))
        chunks[-1][0]["logprobs"] = choice.get("logprobs")
        chunks.append(_chat_choice(index, {}, choice.get("finish_reason")))
        chunks[-1][0].update(_choice_extras(choice))
    return chunks


def _choice_extras(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice's fields beside its answer and finish (Azure's `content_filter_results`, vLLM's `stop_reason`)."""
    return {name: value for name, value in choice.items() if name not in CHOICE_FIELDS}


def message_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas that add up to `message` in the openai SDK.

    The role first, with an empty content (null when the message's content is null) and the
    message's null fields, as a live stream's first delta has them (`"refusal": null`); other text
    fields (reasoning) before the content, as a live stream sends them; other fields (annotations,
    audio) after the content and the calls.
    """
    content = message.get("content")
    nulls = {name: None for name, value in message.items()
             if value is None and name not in ("role", "content")}
    deltas = [{"role": message.get("role") or "assistant",
               "content": None if content is None else "", **nulls}]
    extras = [(name, value) for name, value in message.items()
              if name not in MESSAGE_FIELDS and value is not None]
    deltas.extend({name: value} for name, value in extras if isinstance(value, str))
    if content:
        deltas.append({"content": content})
    if message.get("refusal"):
        deltas.append({"refusal": message["refusal"]})
    deltas.extend({"tool_calls": [_tool_delta(i, call)]}
                  for i, call in enumerate(message.get("tool_calls") or ()))
    if message.get("function_call"):
        deltas.append({"function_call": message["function_call"]})
    deltas.extend({name: value} for name, value in extras if not isinstance(value, str))
    return deltas


def text_chunks(body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The `choices` lists of the completions chunks: the text, then the finish."""
    chunks = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        chunks.append([{"index": index, "text": choice.get("text") or "",
                        "logprobs": choice.get("logprobs"), "finish_reason": None}])
        chunks.append([{"index": index, "text": "", "logprobs": None,
                        "finish_reason": choice.get("finish_reason"), **_choice_extras(choice)}])
    return chunks


def _chat_choice(index: int, delta: dict[str, Any], finish_reason: str | None
                 ) -> list[dict[str, Any]]:
    """One chunk's `choices`: a single delta."""
    return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]


def _tool_delta(position: int, call: dict[str, Any]) -> dict[str, Any]:
    """A whole tool call as one delta: id, type, name and arguments together."""
    function = call.get("function") or {}
    return {"index": position, "id": call.get("id"), "type": call.get("type") or "function",
            "function": {"name": function.get("name"), "arguments": function.get("arguments", "")}}


def _chunk_header(entry: CacheEntry) -> dict[str, Any]:
    """The fields every chunk repeats."""
    header: dict[str, Any] = {name: entry.body[name] for name in CHUNK_HEADER_FIELDS
                              if entry.body.get(name) is not None}
    header["object"] = "chat.completion.chunk" if entry.endpoint == "chat" else "text_completion"
    return header


def _event(chunk: dict[str, Any]) -> bytes:
    """One SSE event."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
