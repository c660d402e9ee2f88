"""Message content in the GenAI shape: recorded only when content capture is turned on.

`gen_ai.input.messages` and `gen_ai.output.messages` follow the semantic
conventions' message schemas: `{"role", "parts": [...], "finish_reason"}`, parts
`{"type": "text", "content"}`, `{"type": "tool_call", "id", "name", "arguments"}`
and `{"type": "tool_call_response", "id", "response"}`; finish_reason is
required in every output message. Pure functions with no OpenTelemetry SDK import.

A streamed answer is captured as the non-stream answer it adds up to: the relay assembles it as it passes,
but only for a request marked `CAPTURE_OUTPUT` (capture on, its span recording); others pay nothing per chunk.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.context import Attempt, RequestContext

#: content parts that carry text: chat's, and the Responses API's input and output text
TEXT_PARTS = frozenset(("text", "input_text", "output_text"))
#: ctx.extra key set when a request's output messages will be recorded: its stream is then assembled whole
CAPTURE_OUTPUT = "telemetry.capture_output"

#: an output message's finish_reason (required by the output messages schema, which allows any string) when
#: the answer did not say it
_UNKNOWN_FINISH = "unknown"


def input_messages(ctx: RequestContext) -> list[dict[str, Any]]:
    """The prompt as gen_ai.input.messages (role + parts); empty for embeddings."""
    if ctx.endpoint == "chat":
        return [_chat_message(message) for message in _listed(ctx.body.get("messages"))
                if isinstance(message, dict)]
    if ctx.endpoint == "completions":
        prompt = ctx.body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        return [{"role": "user", "parts": [_text_part(text)]} for text in prompts if isinstance(text, str)]
    if ctx.endpoint == "responses":
        return _responses_input(ctx.body)
    return []


def _responses_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Responses API request's `instructions` (as a system message) and `input`: a text, or items (messages,
    function calls and their outputs; other items by their type alone)."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions := body.get("instructions"), str):
        messages.append({"role": "system", "parts": [_text_part(instructions)]})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "parts": [_text_part(given)]}]
    for item in _listed(given):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "function_call":
            messages.append({"role": "assistant", "parts": [_call_part(item.get("call_id"), item)]})
        elif kind == "function_call_output":
            part: dict[str, Any] = {"type": "tool_call_response", "response": item.get("output")}
            if isinstance(item.get("call_id"), str):
                part["id"] = item["call_id"]
            messages.append({"role": "tool", "parts": [part]})
        elif "role" in item:
            messages.append(_chat_message(item))
        else:
            messages.append({"role": "user", "parts": [{"type": str(kind)}]})
    return messages


def _responses_output(body: dict[str, Any], finish_reasons: tuple[str, ...]) -> list[dict[str, Any]]:
    """A Responses API answer as one output message: its messages' text and its function calls, with the finish
    reason its attempt was read to have (`stop` when completed, `length` or `content_filter` when cut short)."""
    parts: list[dict[str, Any]] = []
    for item in _listed(body.get("output")):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            parts.extend(_text_part(part["text"]) for part in _listed(item.get("content"))
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
        elif item.get("type") == "function_call":
            parts.append(_call_part(item.get("call_id"), item))
    return [{"role": "assistant", "parts": parts, "finish_reason": finish_reasons[0] if finish_reasons
             else _UNKNOWN_FINISH}]


def output_messages(ctx: RequestContext, attempt: Attempt) -> list[dict[str, Any]]:
    """The answer as gen_ai.output.messages, for the attempt that answered; empty otherwise."""
    if attempt.status != 200 or ctx.endpoint == "embeddings":
        return []
    if ctx.response_body is not None and ctx.endpoint == "responses":
        return _responses_output(ctx.response_body, attempt.finish_reasons)
    if ctx.response_body is not None:
        return [_output_choice(choice) for choice in _listed(ctx.response_body.get("choices"))
                if isinstance(choice, dict)]
    record = ctx.stream_record
    if record is None:
        return []
    answer = record.captured_answer()
    if answer is not None and answer["choices"]:
        return [_output_choice(choice) for choice in answer["choices"]]
    texts = record.parts.texts() or [(0, "")]
    # finish_reason is required in each output message; a stream's reasons arrive in the order its choices
    # finished, not by choice, so each choice has one only when a single reason was seen for all of them
    reasons = set(attempt.finish_reasons)
    reason = reasons.pop() if len(reasons) == 1 else _UNKNOWN_FINISH
    return [{"role": "assistant", "parts": [_text_part(text)], "finish_reason": reason} for _, text in texts]


def _output_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """One chat or text completion choice in the GenAI output message shape (finish_reason is required)."""
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    parts: list[dict[str, Any]] = [_text_part(text)] if isinstance(text, str) else []
    if isinstance(message, dict):
        parts.extend(_tool_call_parts(message))
    reason = choice.get("finish_reason")
    return {"role": "assistant", "parts": parts,
            "finish_reason": str(reason) if reason else _UNKNOWN_FINISH}


def _chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message in the GenAI message shape: text, tool calls, and a tool's answer."""
    role = str(message.get("role", "user"))
    content = message.get("content")
    if role == "tool":           # the answer to a tool call: a tool_call_response part
        response = content if isinstance(content, str) else _texts(content)
        part: dict[str, Any] = {"type": "tool_call_response", "response": response}
        if isinstance(message.get("tool_call_id"), str):
            part["id"] = message["tool_call_id"]
        return {"role": role, "parts": [part]}
    if isinstance(content, str):
        parts = [_text_part(content)]
    elif isinstance(content, list):
        parts = [_text_part(part.get("text", "")) if _is_text_part(part) else {"type": str(part.get("type"))}
                 for part in content if isinstance(part, dict)]
    else:
        parts = []
    parts.extend(_tool_call_parts(message))
    chat_message: dict[str, Any] = {"role": role, "parts": parts}
    if isinstance(message.get("name"), str):
        chat_message["name"] = message["name"]
    return chat_message


def _is_text_part(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    return type(kind) is str and kind in TEXT_PARTS


def _tool_call_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls, and its legacy `function_call` (which has no id), as tool_call parts
    (id, name, arguments: parsed when JSON)."""
    calls = [call for call in _listed(message.get("tool_calls")) if isinstance(call, dict)]
    if isinstance(message.get("function_call"), dict):
        calls.append({"function": message["function_call"]})
    return [_call_part(call.get("id"), function) for call in calls
            if isinstance(function := call.get("function"), dict)]


def _call_part(call_id: Any, function: dict[str, Any]) -> dict[str, Any]:
    """A tool call as a tool_call part: its id (when a string), its function's name and arguments."""
    part: dict[str, Any] = {"type": "tool_call", "name": str(function.get("name", ""))}
    if isinstance(call_id, str):
        part["id"] = call_id
    if "arguments" in function:
        part["arguments"] = _arguments(function["arguments"])
    return part


def _arguments(arguments: Any) -> Any:
    """A tool call's arguments: the object their JSON text holds, else the text as sent."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _texts(content: Any) -> str:
    """The text parts of a message's content list, joined."""
    if not isinstance(content, list):
        return ""
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def _listed(value: Any) -> list | tuple:
    """`value` when it is a list, else nothing to go through (a client's or a server's odd shape)."""
    return value if isinstance(value, list) else ()


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "content": text}
