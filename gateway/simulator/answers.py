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

ID_PREFIXES = {"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_"}


@dataclass(frozen=True)
class Answer:
    """What one request is answered with, before it is shaped as a body or a stream."""

    kind: str
    model: str
    response_id: str
    created: int
    choices: tuple[list[str], ...]  # the output tokens of each of the `n` answers, generated together
    finish_reason: str
    prompt_tokens: int
    echoes: tuple[str, ...] = ()    # each choice's prompt, written before its answer (completions' `echo`)
    logprobs: int | None = None     # completions' `logprobs`: alternatives per token (each token's own only)

    @property
    def tokens(self) -> list[str]:
        """The first answer's output tokens."""
        return self.choices[0]

    @property
    def usage(self) -> dict[str, int]:
        completion = sum(len(tokens) for tokens in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


@dataclass(frozen=True)
class StreamScript:
    """The chunks of one stream, each with the output token whose time it is sent at."""

    chunks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    drop_after: int = 1             # a dropped stream stops after this many chunks
    named_events: bool = False      # Responses API: each chunk goes as an `event:` named by its type, no [DONE]


def make_answer(config: SimConfig, request: SimRequest, plan: Plan) -> Answer:
    """The deterministic filler answer to a chat, completions or responses request: `n` answers of the planned length,
    the first the same whatever `n` is."""
    choices = tuple(filler_tokens(plan.output_tokens, request.prompt if index == 0 else (request.prompt, index),
                                  config.seed) for index in range(request.choices))
    return Answer(kind=request.kind, model=config.name,
                  response_id=f"{ID_PREFIXES[request.kind]}{uuid.uuid4().hex[:24]}",
                  created=int(time.time()), choices=choices, finish_reason=plan.finish_reason,
                  prompt_tokens=request.prompt_tokens, echoes=request.echoes, logprobs=request.logprobs)


def completion_body(answer: Answer) -> dict[str, Any]:
    """The non-streamed body: `chat.completion` or `text_completion`, one choice per answer."""
    texts = ["".join(tokens) for tokens in answer.choices]
    if answer.kind == "chat":
        choices = [{"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": answer.finish_reason} for index, text in enumerate(texts)]
        return _envelope(answer, "chat.completion", choices) | {"usage": answer.usage}
    choices = [{"index": index, "text": _echo(answer, index) + text,
                "logprobs": _text_logprobs(answer.choices[index], answer.logprobs, len(_echo(answer, index))),
                "finish_reason": answer.finish_reason}
               for index, text in enumerate(texts)]
    return _envelope(answer, "text_completion", choices) | {"usage": answer.usage}


#: the log probability the simulator gives every token it writes
TOKEN_LOGPROB = -0.25


def _echo(answer: Answer, index: int) -> str:
    return answer.echoes[index] if answer.echoes else ""


def _text_logprobs(tokens: list[str], top: int | None, start: int = 0) -> dict[str, Any] | None:
    """A completions choice's `logprobs` for its generated tokens, each its own only alternative, at their offsets in
    the choice's text (which begins with an echoed prompt of `start` characters); None when the request asked for
    none."""
    if top is None:
        return None
    offsets, offset = [], start
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": list(tokens), "token_logprobs": [TOKEN_LOGPROB] * len(tokens),
            "top_logprobs": [{token: TOKEN_LOGPROB} if top else {} for token in tokens], "text_offset": offsets}


def stream_script(answer: Answer, include_usage: bool) -> StreamScript:
    """Every chunk of the streamed answer, in order, the `n` answers' chunks side by side at each token's time;
    the last output token's time carries the tail."""
    length = len(answer.tokens)
    last = max(length - 1, 0)
    indexes = range(len(answer.choices))
    if answer.kind == "chat":
        chunks = [(0, _chat_chunk(answer, k, {"role": "assistant", "content": ""}, None, include_usage))
                  for k in indexes]
        chunks += [(i, _chat_chunk(answer, k, {"content": answer.choices[k][i]}, None, include_usage))
                   for i in range(length) for k in indexes]
        chunks += [(last, _chat_chunk(answer, k, {}, answer.finish_reason, include_usage)) for k in indexes]
        head = len(indexes)
    else:
        chunks = [(0, _text_chunk(answer, k, answer.echoes[k], None, include_usage))
                  for k in indexes if answer.echoes and answer.echoes[k]]
        chunks += [(i, _text_chunk(answer, k, answer.choices[k][i], None, include_usage))
                   for i in range(length) for k in indexes]
        chunks += [(last, _text_chunk(answer, k, "", answer.finish_reason, include_usage)) for k in indexes]
        head = 0
    if include_usage:
        chunks.append((last, _usage_chunk(answer)))
    return StreamScript(chunks, drop_after=head + max(1, length // 2) * len(indexes))


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


def _chat_chunk(answer: Answer, index: int, delta: dict[str, Any], finish_reason: str | None,
                include_usage: bool) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = _envelope(answer, "chat.completion.chunk", [choice])
    return chunk | {"usage": None} if include_usage else chunk


def _text_chunk(answer: Answer, index: int, text: str, finish_reason: str | None,
                include_usage: bool) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    chunk = _envelope(answer, "text_completion", [choice])
    return chunk | {"usage": None} if include_usage else chunk


def _usage_chunk(answer: Answer) -> dict[str, Any]:
    object_name = "chat.completion.chunk" if answer.kind == "chat" else "text_completion"
    return _envelope(answer, object_name, []) | {"usage": answer.usage}
