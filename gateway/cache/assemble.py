"""Assemble streamed OpenAI chunks into the equivalent non-stream response."""

from __future__ import annotations

from typing import Any

#: top-level fields copied from the first chunk that carries them (a live stream repeats them in
#: every chunk); not `obfuscation`, the random padding each live chunk has of its own
HEADER_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
#: top-level fields a live stream sends on one chunk only; the last chunk that carries one wins
ONCE_FIELDS = ("moderation",)
#: chat delta fields with a rule of their own; any other field is folded in by `_merge_field`
CHAT_DELTA_FIELDS = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})
#: fields that name rather than accumulate: a later value replaces an earlier one (as in the openai SDK)
REPLACED_FIELDS = frozenset({"index", "type"})


def assemble_stream(endpoint: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-stream body a `chat` or `completions` stream adds up to."""
    body: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    merge_choice = _merge_chat_choice if endpoint == "chat" else _merge_text_choice
    for chunk in chunks:
        for name in HEADER_FIELDS:
            if chunk.get(name) is not None:
                body.setdefault(name, chunk[name])
        for name in ONCE_FIELDS:
            if chunk.get(name) is not None:
                body[name] = chunk[name]
        for delta_choice in chunk.get("choices") or ():
            index = delta_choice.get("index", 0)
            merge_choice(choices.setdefault(index, _new_choice(endpoint, index)), delta_choice)
        if chunk.get("usage"):
            body["usage"] = chunk["usage"]
    body["object"] = "chat.completion" if endpoint == "chat" else "text_completion"
    body["choices"] = [_finish_choice(choices[i]) for i in sorted(choices)]
    return body


def _new_choice(endpoint: str, index: int) -> dict[str, Any]:
    """An empty choice to merge deltas into."""
    if endpoint == "chat":
        return {"index": index, "message": {"role": "assistant"}, "logprobs": None,
                "finish_reason": None, "_tools": {}}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": None}


def _merge_chat_choice(choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    """Fold one chat delta into the choice.

    Content and refusal must be text (a null one stays null until text comes); any other field
    (`reasoning_content`, `annotations`, `audio`, ...) is folded in by `_merge_field`.
    """
    delta = delta_choice.get("delta") or {}
    message = choice["message"]
    if delta.get("role"):
        message["role"] = delta["role"]
    for name in ("content", "refusal"):
        if delta.get(name) is not None:
            message[name] = (message.get(name) or "") + delta[name]
        elif name in delta:
            message.setdefault(name, None)
    for tool_delta in delta.get("tool_calls") or ():
        _merge_tool_call(choice["_tools"], tool_delta)
    if delta.get("function_call"):
        _merge_function(message.setdefault("function_call", {}), delta["function_call"])
    for name, value in delta.items():
        if name not in CHAT_DELTA_FIELDS:
            _merge_field(message, name, value)
    _merge_common(choice, delta_choice)


def _merge_field(merged: dict[str, Any], name: str, value: Any) -> None:
    """Fold one field in: text concatenated, lists extended, objects merged field by field.

    Any other value (a number, a boolean) replaces the one before, as does a later `index` or
    `type`; a null keeps the field, as null, until a value comes.
    """
    earlier = merged.get(name)
    if value is None:
        merged.setdefault(name, None)
    elif isinstance(value, str) and isinstance(earlier, str) and name not in REPLACED_FIELDS:
        merged[name] = earlier + value
    elif isinstance(value, list):
        merged[name] = (earlier if isinstance(earlier, list) else []) + value
    elif isinstance(value, dict):
        fields = merged[name] = earlier if isinstance(earlier, dict) else {}
        for key, item in value.items():
            _merge_field(fields, key, item)
    else:
        merged[name] = value


def _merge_text_choice(choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    """Fold one completions chunk into the choice."""
    choice["text"] += delta_choice.get("text") or ""
    _merge_common(choice, delta_choice)


def _merge_common(choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    """Finish reason and logprobs, shared by chat and completions."""
    if delta_choice.get("finish_reason"):
        choice["finish_reason"] = delta_choice["finish_reason"]
    if delta_choice.get("logprobs"):
        choice["logprobs"] = _merge_lists(choice["logprobs"] or {}, delta_choice["logprobs"])


def _merge_tool_call(tools: dict[int, dict[str, Any]], tool_delta: dict[str, Any]) -> None:
    """Fold one tool-call delta into the call with the same index."""
    call = tools.setdefault(tool_delta.get("index", len(tools)),
                            {"id": None, "type": "function", "function": {}})
    if tool_delta.get("id"):
        call["id"] = tool_delta["id"]
    if tool_delta.get("type"):
        call["type"] = tool_delta["type"]
    _merge_function(call["function"], tool_delta.get("function") or {})


def _merge_function(function: dict[str, Any], delta: dict[str, Any]) -> None:
    """Concatenate name and arguments deltas."""
    for name in ("name", "arguments"):
        if delta.get(name) is not None:
            function[name] = function.get(name, "") + delta[name]


def _merge_lists(merged: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Logprobs: list fields are extended chunk after chunk; others are kept."""
    for name, value in delta.items():
        if isinstance(value, list):
            merged[name] = (merged.get(name) or []) + value
        elif value is not None:
            merged.setdefault(name, value)
    return merged


def _finish_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """Turn the working choice into the non-stream shape."""
    tools = choice.pop("_tools", None)
    if tools:
        message = choice["message"]
        message["tool_calls"] = [tools[i] for i in sorted(tools)]
        message["content"] = message.get("content") or None     # null beside tool calls
    elif "message" in choice:
        choice["message"].setdefault("content", "")
    return choice
