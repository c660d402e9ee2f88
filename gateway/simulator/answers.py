"""Response bodies and stream chunks in OpenAI's exact shapes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.simulator.config import SimConfig
from gateway.simulator.parse import SimRequest
from gateway.simulator.plan import Plan
from gateway.simulator.text import embedding_vector, encode_base64, filler_tokens

ID_PREFIXES = {"chat": "chatcmpl", "completions": "cmpl"}


@dataclass(frozen=True)
class Answer:
    """What one request is answered with, before it is shaped as a body or a stream."""

    kind: str
    model: str
    response_id: str
    created: int
    tokens: list[str]
    finish_reason: str
    prompt_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        completion = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


@dataclass(frozen=True)
class StreamScript:
    """The chunks of one stream, each with the output token whose time it is sent at."""

    chunks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    drop_after: int = 1             # a dropped stream stops after this many chunks


def make_answer(config: SimConfig, request: SimRequest, plan: Plan) -> Answer:
    """The deterministic filler answer to a chat or completions request."""
    return Answer(kind=request.kind, model=config.name,
                  response_id=f"{ID_PREFIXES[request.kind]}-{uuid.uuid4().hex[:24]}",
                  created=int(time.time()), tokens=filler_tokens(plan.output_tokens, request.prompt, config.seed),
                  finish_reason=plan.finish_reason, prompt_tokens=request.prompt_tokens)


def completion_body(answer: Answer) -> dict[str, Any]:
    """The non-streamed body: `chat.completion` or `text_completion`."""
    text = "".join(answer.tokens)
    if answer.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": answer.finish_reason}
        return _envelope(answer, "chat.completion", [choice]) | {"usage": answer.usage}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": answer.finish_reason}
    return _envelope(answer, "text_completion", [choice]) | {"usage": answer.usage}


def stream_script(answer: Answer, include_usage: bool) -> StreamScript:
    """Every chunk of the streamed answer, in order; the last output token's time carries the tail."""
    last = max(len(answer.tokens) - 1, 0)
    if answer.kind == "chat":
        chunks = [(0, _chat_chunk(answer, {"role": "assistant", "content": ""}, None, include_usage))]
        chunks += [(i, _chat_chunk(answer, {"content": tok}, None, include_usage))
                   for i, tok in enumerate(answer.tokens)]
        chunks.append((last, _chat_chunk(answer, {}, answer.finish_reason, include_usage)))
        head = 1
    else:
        chunks = [(i, _text_chunk(answer, tok, None, include_usage)) for i, tok in enumerate(answer.tokens)]
        chunks.append((last, _text_chunk(answer, "", answer.finish_reason, include_usage)))
        head = 0
    if include_usage:
        chunks.append((last, _usage_chunk(answer)))
    return StreamScript(chunks, drop_after=head + max(1, len(answer.tokens) // 2))


def embeddings_body(config: SimConfig, request: SimRequest) -> dict[str, Any]:
    """The `list` of one unit vector per input, seeded by the input."""
    dims = request.dimensions or config.embedding_dims
    data = []
    for index, item in enumerate(request.inputs):
        vector = embedding_vector(item, dims, config.seed)
        encoded = encode_base64(vector) if request.encoding_format == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": config.name,
            "usage": {"prompt_tokens": request.prompt_tokens, "total_tokens": request.prompt_tokens}}


def models_body(config: SimConfig, created: int) -> dict[str, Any]:
    """`GET /v1/models`: the one model this simulator serves."""
    return {"object": "list",
            "data": [{"id": config.name, "object": "model", "created": created, "owned_by": "simulator"}]}


def _envelope(answer: Answer, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": answer.response_id, "object": object_name, "created": answer.created,
            "model": answer.model, "choices": choices}


def _chat_chunk(answer: Answer, delta: dict[str, Any], finish_reason: str | None,
                include_usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = _envelope(answer, "chat.completion.chunk", [choice])
    return chunk | {"usage": None} if include_usage else chunk


def _text_chunk(answer: Answer, text: str, finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    chunk = _envelope(answer, "text_completion", [choice])
    return chunk | {"usage": None} if include_usage else chunk


def _usage_chunk(answer: Answer) -> dict[str, Any]:
    object_name = "chat.completion.chunk" if answer.kind == "chat" else "text_completion"
    return _envelope(answer, object_name, []) | {"usage": answer.usage}
