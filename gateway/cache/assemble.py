"""Assemble streamed OpenAI chunks into the equivalent non-stream response."""

from __future__ import annotations

from typing import Any

import orjson

#: top-level fields copied from the first chunk that carries them, not empty (a live stream repeats them in
#: every chunk); not `obfuscation`, the random padding each live chunk has of its own
HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
#: top-level fields of a chunk with a rule of their own; any other (`moderation`, Azure's `prompt_filter_results`,
#: which come on one chunk only) is kept as the answer's, the last chunk that carries one winning
FRAME_FIELDS = frozenset((*HEADER_FIELDS, "object", "choices", "usage", "obfuscation"))
#: a streamed choice's fields with a rule of their own; any other (Azure's `content_filter_results`, vLLM's
#: `stop_reason`) is kept as the choice's, the last value winning
CHOICE_FIELDS = frozenset(("index", "delta", "text", "logprobs", "finish_reason"))
#: chat delta fields with a rule of their own; any other field is folded in by `_merge_field`
CHAT_DELTA_FIELDS = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})
#: fields that name rather than accumulate: a later value replaces an earlier one (as in the openai SDK)
REPLACED_FIELDS = frozenset({"index", "type"})


#: text a stream may add up to before the cache stops assembling it (it could not be stored: an entry is at most
#: DEFAULT_MAX_ENTRY_BYTES compressed, and zlib rarely packs text 4 to 1)
MAX_ASSEMBLED_CHARS = 4 * 1024 * 1024


class _Pieces:
    """Text arriving in pieces, joined once at the end: adding each piece to the text so far would copy it all
    again each time (a long stream's answer, quadratically)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: str) -> None:
        self.parts = list(parts)


#: what folding an answer of an odd shape into a whole one may raise (a delta nested deeper than the
#: interpreter's recursion limit too): the caller gives up the whole answer, never the stream it came in
UNFOLDABLE = (TypeError, AttributeError, KeyError, ValueError, RecursionError)


class StreamAssembler:
    """Folds a stream's chunks, as they pass, into the non-stream body they add up to (`body`).

    It keeps the merged answer, not the chunks (a long stream's chunk objects weigh tens of times its
    text); `chars` counts the text folded in so far.
    """

    __slots__ = ("endpoint", "chars", "_body", "_choices", "_merge_choice")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.chars = 0
        self._body: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._merge_choice = _merge_chat_choice if endpoint == "chat" else _merge_text_choice

    def add(self, chunk: dict[str, Any]) -> None:
        """Fold in one parsed `data:` chunk (TypeError, AttributeError, KeyError or ValueError: a shape the cache
        cannot replay)."""
        body = self._body
        for name in HEADER_FIELDS:
            if chunk.get(name):             # not an empty one: Azure opens with a filter chunk of id "", created 0
                body.setdefault(name, chunk[name])
        for name, value in chunk.items():
            if name not in FRAME_FIELDS and value is not None:
                body[name] = value
        for delta_choice in chunk.get("choices") or ():
            index = delta_choice.get("index", 0)
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _new_choice(self.endpoint, index)
            self.chars += self._merge_choice(choice, delta_choice)
        if chunk.get("usage"):
            body["usage"] = chunk["usage"]

    def body(self) -> dict[str, Any]:
        """The non-stream body of what was folded in (call once, at the end)."""
        body = self._body
        body["object"] = "chat.completion" if self.endpoint == "chat" else "text_completion"
        body["choices"] = [_finish_choice(self._choices[i]) for i in sorted(self._choices)]
        return body

    @classmethod
    def of(cls, endpoint: str, chunks: list[dict[str, Any]]) -> StreamAssembler:
        """An assembler that has folded in `chunks`."""
        assembler = cls(endpoint)
        for chunk in chunks:
            assembler.add(chunk)
        return assembler


def assemble_stream(endpoint: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-stream body a `chat` or `completions` stream adds up to."""
    return StreamAssembler.of(endpoint, chunks).body()


def _new_choice(endpoint: str, index: int) -> dict[str, Any]:
    """An empty choice to merge deltas into."""
    if endpoint == "chat":
        return {"index": index, "message": {"role": "assistant"}, "logprobs": None,
                "finish_reason": None, "_tools": {}}
    return {"index": index, "text": _Pieces(), "logprobs": None, "finish_reason": None}


def _merge_chat_choice(choice: dict[str, Any], delta_choice: dict[str, Any]) -> int:
    """Fold one chat delta into the choice; returns the characters of text it added.

    Content and refusal must be text (a null one stays null until text comes); any other field
    (`reasoning_content`, `annotations`, `audio`, ...) is folded in by `_merge_field`.
    """
    delta = delta_choice.get("delta") or {}
    message = choice["message"]
    added = 0
    if delta.get("role"):
        message["role"] = delta["role"]
    for name in ("content", "refusal"):
        if (text := delta.get(name)) is not None:
            added += _append(message, name, text)
        elif name in delta:
            message.setdefault(name, None)
    for tool_delta in delta.get("tool_calls") or ():
        added += _merge_tool_call(choice["_tools"], tool_delta)
    if delta.get("function_call"):
        added += _merge_function(message.setdefault("function_call", {}), delta["function_call"])
    for name, value in delta.items():
        if name not in CHAT_DELTA_FIELDS:
            added += _merge_field(message, name, value)
    return added + _merge_common(choice, delta_choice)


def _append(merged: dict[str, Any], name: str, text: str) -> int:
    """Add `text` to the text field `name` (started when absent, null or of another type); returns its length."""
    pieces = merged.get(name)
    if isinstance(pieces, _Pieces):
        pieces.parts.append(text)
    else:
        merged[name] = _Pieces(text)
    return len(text)


def _merge_field(merged: dict[str, Any], name: str, value: Any) -> int:
    """Fold one field in: text concatenated, lists extended, objects merged field by field; returns the
    characters of text it added.

    Any other value (a number, a boolean) replaces the one before, as does a later `index` or
    `type`; a null keeps the field, as null, until a value comes.
    """
    earlier = merged.get(name)
    if value is None:
        merged.setdefault(name, None)
    elif isinstance(value, str) and name not in REPLACED_FIELDS:
        return _append(merged, name, value)
    elif isinstance(value, list):
        _extend(merged, name, value)
    elif isinstance(value, dict):
        fields = merged[name] = earlier if isinstance(earlier, dict) else {}
        return sum(_merge_field(fields, key, item) for key, item in value.items())
    else:
        merged[name] = value
    return 0


class _Items(list):
    """A list the assembler made, so extended in place (a chunk's own list is copied, never changed)."""

    __slots__ = ()


def _extend(merged: dict[str, Any], name: str, items: list) -> None:
    """Add `items` to the list field `name` (started, as a copy, when absent or not a list)."""
    earlier = merged.get(name)
    if isinstance(earlier, _Items):
        earlier.extend(items)
    else:
        merged[name] = _Items((*earlier, *items) if isinstance(earlier, list) else items)


def _merge_text_choice(choice: dict[str, Any], delta_choice: dict[str, Any]) -> int:
    """Fold one completions chunk into the choice; returns the characters of text it added."""
    text = delta_choice.get("text") or ""
    choice["text"].parts.append(text)
    return len(text) + _merge_common(choice, delta_choice)


def _merge_common(choice: dict[str, Any], delta_choice: dict[str, Any]) -> int:
    """Finish reason, logprobs and the choice's other fields, shared by chat and completions; returns what the
    logprobs it added count as (`_merge_logprobs`)."""
    for name, value in delta_choice.items():
        if name not in CHOICE_FIELDS and value is not None:
            choice[name] = value
    if delta_choice.get("finish_reason"):
        choice["finish_reason"] = delta_choice["finish_reason"]
    logprobs = delta_choice.get("logprobs")
    if not logprobs:
        return 0
    merged = choice["logprobs"] = choice["logprobs"] or {}
    return _merge_logprobs(merged, logprobs)


def _merge_tool_call(tools: dict[int, dict[str, Any]], tool_delta: dict[str, Any]) -> int:
    """Fold one tool-call delta into the call with the same index; returns the characters it added."""
    call = tools.setdefault(tool_delta.get("index", len(tools)),
                            {"id": None, "type": "function", "function": {}})
    if tool_delta.get("id"):
        call["id"] = tool_delta["id"]
    if tool_delta.get("type"):
        call["type"] = tool_delta["type"]
    return _merge_function(call["function"], tool_delta.get("function") or {})


def _merge_function(function: dict[str, Any], delta: dict[str, Any]) -> int:
    """Concatenate name and arguments deltas; returns the characters added."""
    added = 0
    for name in ("name", "arguments"):
        if (text := delta.get(name)) is not None:
            added += _append(function, name, text)
    return added


class _Encoded:
    """A logprobs list arriving chunk by chunk, each chunk's part held as its JSON and decoded once at the end: as
    objects, a token's entry with its `top_logprobs` weighs about ten times its JSON (with top_logprobs 20, about
    8 KB a token), so a stream the cache could store would be given up for its memory."""

    __slots__ = ("parts",)

    def __init__(self, part: bytes) -> None:
        self.parts = [part]


def _merge_logprobs(merged: dict[str, Any], delta: dict[str, Any]) -> int:
    """Logprobs: list fields are extended chunk after chunk (held as JSON, `_Encoded`); others are kept. Returns
    what the JSON the lists added counts as against MAX_ASSEMBLED_CHARS (4 for each 3 bytes)."""
    added = 0
    for name, value in delta.items():
        if isinstance(value, list):
            encoded = orjson.dumps(value)
            earlier = merged.get(name)
            if isinstance(earlier, _Encoded):
                earlier.parts.append(encoded)
            else:
                merged[name] = _Encoded(encoded)
            added += len(encoded) * 4 // 3      # JSON of numbers packs about 3 to 1, not text's 4
        elif value is not None:
            merged.setdefault(name, value)
    return added


def _finish_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """Turn the working choice into the non-stream shape: text pieces joined, lists plain."""
    tools = choice.pop("_tools", None)
    choice = _settled(choice)
    if tools:
        message = choice["message"]
        message["tool_calls"] = [_settled(tools[i]) for i in sorted(tools)]
        message["content"] = message.get("content") or None     # null beside tool calls
    elif "message" in choice:
        choice["message"].setdefault("content", "")
    return choice


def _settled(value: Any) -> Any:
    """`value` with every text in pieces joined and every assembler list made a plain list, at any depth."""
    if isinstance(value, _Pieces):
        return "".join(value.parts)
    if isinstance(value, _Encoded):
        return [item for part in value.parts for item in orjson.loads(part)]
    if isinstance(value, dict):
        return {key: _settled(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_settled(item) for item in value]
    return value
