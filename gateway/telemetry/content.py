"""Message content in the GenAI shape: recorded only when content capture is turned on.

`gen_ai.input.messages` and `gen_ai.output.messages` follow the semantic
conventions' message schema: `{"role", "parts": [{"type": "text", "content"}],
"finish_reason"}`. Pure functions with no OpenTelemetry SDK import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.context import Attempt, RequestContext


def input_messages(ctx: RequestContext) -> list[dict[str, Any]]:
    """The prompt as gen_ai.input.messages (role + parts); empty for embeddings."""
    if ctx.endpoint == "chat":
        return [_chat_message(message) for message in ctx.body.get("messages") or ()
                if isinstance(message, dict)]
    if ctx.endpoint == "completions":
        prompt = ctx.body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        return [{"role": "user", "parts": [_text_part(text)]} for text in prompts if isinstance(text, str)]
    return []


def output_messages(ctx: RequestContext, attempt: Attempt) -> list[dict[str, Any]]:
    """The answer as gen_ai.output.messages, for the attempt that answered; empty otherwise."""
    if attempt.status != 200 or ctx.endpoint == "embeddings":
        return []
    if ctx.response_body is not None:
        return [_output_choice(choice) for choice in ctx.response_body.get("choices") or ()
                if isinstance(choice, dict)]
    record = ctx.stream_record
    if record is None:
        return []
    texts = record.parts.texts() or [(0, "")]
    messages: list[dict[str, Any]] = [{"role": "assistant", "parts": [_text_part(text)]} for _, text in texts]
    if attempt.finish_reasons:
        messages[0]["finish_reason"] = attempt.finish_reasons[0]
    return messages


def _output_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """One chat or text completion choice in the GenAI output message shape."""
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    output: dict[str, Any] = {"role": "assistant", "parts": [_text_part(text)] if isinstance(text, str) else []}
    if choice.get("finish_reason"):
        output["finish_reason"] = str(choice["finish_reason"])
    return output


def _chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI chat message in the GenAI message shape."""
    content = message.get("content")
    if isinstance(content, str):
        parts = [_text_part(content)]
    elif isinstance(content, list):
        parts = [_text_part(part.get("text", "")) if part.get("type") == "text" else {"type": str(part.get("type"))}
                 for part in content if isinstance(part, dict)]
    else:
        parts = []
    return {"role": str(message.get("role", "user")), "parts": parts}


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "content": text}
