"""What an attempt's answer says about itself, and its tokens when the upstream gave none."""

from __future__ import annotations

from gateway.context import Attempt, RequestContext, Usage
from gateway.tokens import DEFAULT_ENCODING, count_completion_tokens, count_prompt_tokens, usage_from_response


def read_answer(attempt: Attempt, body: dict) -> None:
    """What a non-streamed answer says about itself: id, model, finish reasons, usage."""
    read_identity(attempt, body)
    choices = body.get("choices")
    attempt.finish_reasons = tuple(c["finish_reason"] for c in choices if isinstance(c, dict)
                                   and isinstance(c.get("finish_reason"), str) and c["finish_reason"]) \
        if isinstance(choices, list) else ()
    attempt.usage = usage_from_response(body)


def read_identity(attempt: Attempt, answer: dict) -> None:
    """The answer's `id` and `model`, kept only when they are strings: they become span attributes and metric
    labels, and a list or an object there (a server's bug) must not break the request's recording."""
    answer_id, model = answer.get("id"), answer.get("model")
    attempt.response_id = answer_id if isinstance(answer_id, str) else None
    attempt.response_model = model if isinstance(model, str) else None


def estimated_usage(ctx: RequestContext, attempt: Attempt) -> Usage:
    """Tokens counted by the gateway when the upstream reported none."""
    texts = ctx.stream_record.texts if ctx.stream_record is not None else []
    if ctx.response_body is not None:
        choices = ctx.response_body.get("choices")
        texts = [_choice_text(c) for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    encoding = attempt.model.encoding
    output = count_completion_tokens(texts, encoding) if ctx.endpoint != "embeddings" else 0
    return Usage(input_tokens=prompt_tokens(ctx, encoding), output_tokens=output, estimated=True)


def _choice_text(choice: dict) -> str:
    """A choice's answer text, whatever shape it came in: `message.content` as a string or a list of parts
    (`{"type": "text", "text": ...}`), or a completion's `text`; "" for anything else."""
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is None:
        content = choice.get("text")
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return content if isinstance(content, str) else ""


def prompt_tokens(ctx: RequestContext, encoding: str) -> int:
    """The prompt's tokens in the model's encoding (the count stage used the default one)."""
    if encoding == DEFAULT_ENCODING:
        return ctx.prompt_tokens
    return count_prompt_tokens(ctx.endpoint, ctx.body, encoding)


def settle_attempt(ctx: RequestContext, attempt: Attempt) -> None:
    """Fill in an ended attempt: the answer's fields, and estimated usage when it produced output."""
    if ctx.response_body is not None and attempt is ctx.attempts[-1] and attempt.status == 200:
        read_answer(attempt, ctx.response_body)
    produced = attempt.status == 200 or (ctx.bytes_sent and attempt is ctx.attempts[-1])
    if attempt.usage is None and produced:
        attempt.usage = estimated_usage(ctx, attempt)
