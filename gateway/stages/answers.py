"""What an attempt's answer says about itself, and its tokens when the upstream gave none."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson

from gateway.context import Attempt, RequestContext, Usage
from gateway.stages.parse import prompts_in
from gateway.tokens import (DEFAULT_ENCODING, count_completion_tokens, count_prompt_tokens, is_token_array,
                            usage_from_response)


def read_answer(attempt: Attempt, body: dict, endpoint: str = "chat") -> None:
    """What a non-streamed answer says about itself: id, model, finish reasons, usage."""
    read_identity(attempt, body)
    attempt.usage = usage_from_response(body)
    if endpoint == "responses":
        reason = responses_finish_reason(body)
        attempt.finish_reasons = (reason,) if reason is not None else ()
        return
    choices = body.get("choices")
    attempt.finish_reasons = tuple(c["finish_reason"] for c in choices if isinstance(c, dict)
                                   and isinstance(c.get("finish_reason"), str) and c["finish_reason"]) \
        if isinstance(choices, list) else ()


def responses_finish_reason(response: dict, status: object = None) -> str | None:
    """A Responses API answer's end told as chat's finish reason: `stop` when completed, `length` when cut short
    by max_output_tokens (`content_filter` when by the filter); None for any other status. `status`: the one its
    stream's end event says, when given (the response's own otherwise)."""
    status = response.get("status") if status is None else status
    if status == "completed":
        return "stop"
    if status != "incomplete":
        return None
    details = response.get("incomplete_details")
    return "content_filter" if isinstance(details, dict) and details.get("reason") == "content_filter" else "length"


#: the longest answer `id` or `model` kept (OpenAI's are under 64 characters): they are span attributes, a metric
#: label and ledger-adjacent log fields, and a server's answer may be up to `server.max_answer_bytes`
MAX_IDENTITY_CHARS = 256


def read_identity(attempt: Attempt, answer: dict) -> None:
    """The answer's `id` and `model`, kept only when they are strings of at most MAX_IDENTITY_CHARS: they become
    span attributes and metric labels, and a list or an object there (a server's bug) must not break the request's
    recording. A value already
    read is kept: a stream's later chunks fill in what its first left empty (Azure opens with a content-filter
    chunk whose `id` and `model` are "")."""
    answer_id, model = answer.get("id"), answer.get("model")
    if not attempt.response_id:
        attempt.response_id = answer_id if isinstance(answer_id, str) and 0 < len(answer_id) <= MAX_IDENTITY_CHARS \
            else None
    if not attempt.response_model:
        attempt.response_model = model if isinstance(model, str) and 0 < len(model) <= MAX_IDENTITY_CHARS else None


#: estimates with more text than this to encode (characters of answer, bytes of a prompt counted again in the
#: model's own encoding) are counted in a thread, off the event loop: a megabyte takes the encoder 0.2 to 0.4 s
LARGE_ESTIMATE = 64 * 1024


class Estimate:
    """Tokens counted by the gateway when the upstream reported none: the prompt, and every text the model
    generated (content, reasoning, refusals, function and tool calls), its reasoning also counted apart; a prompt
    a completion echoed is not generated output. The texts are gathered on the event loop when the attempt ends;
    `count` encodes them, and reads nothing the loop still changes, so a large one can run in a thread."""

    __slots__ = ("ctx", "encoding", "generated", "size")

    def __init__(self, ctx: RequestContext, attempt: Attempt) -> None:
        self.ctx = ctx
        self.encoding = attempt.model.encoding
        self.generated = _generated_texts(ctx) if ctx.endpoint != "embeddings" else None
        self.size = sum(map(len, self.generated.texts)) + sum(map(len, self.generated.reasoning)) \
            if self.generated is not None else 0
        if self.encoding != DEFAULT_ENCODING:
            self.size += ctx.body_bytes

    @property
    def large(self) -> bool:
        return self.size > LARGE_ESTIMATE

    def count(self) -> Usage:
        output = reasoning = 0
        if (generated := self.generated) is not None:
            reasoning = count_completion_tokens(generated.reasoning, self.encoding)
            output = count_completion_tokens(generated.texts, self.encoding) + reasoning
            output = max(reasoning, output - generated.echoed_ids)
        return Usage(input_tokens=prompt_tokens(self.ctx, self.encoding), output_tokens=output,
                     reasoning_tokens=reasoning, estimated=True)


async def count_usage(attempt: Attempt, estimate: Estimate) -> None:
    """Set the attempt's usage to the estimate's count, made in a thread when it is large. A cancellation
    meanwhile (the client left, the drain ran out) still waits for the count: a call is billed however it ended."""
    if not estimate.large:
        attempt.usage = estimate.count()
        return
    counting = asyncio.ensure_future(asyncio.to_thread(estimate.count))
    try:
        attempt.usage = await asyncio.shield(counting)
    except asyncio.CancelledError:
        attempt.usage = await counting
        raise


class _Generated:
    """The texts an answer generated: reasoning apart from the rest, and the token ids of prompts it echoed
    (their text is among `texts`, written back by the model)."""

    __slots__ = ("texts", "reasoning", "echoes", "echoed_ids")

    def __init__(self, echoes: list[object] | None) -> None:
        self.texts: list[str] = []
        self.reasoning: list[str] = []
        self.echoes = echoes
        self.echoed_ids = 0

    def add(self, part: str, text: str, index: int) -> None:
        """One part of choice `index`; its text (CONTENT) without the prompt echoed before it."""
        if part == REASONING:
            self.reasoning.append(text)
            return
        echoed = self.echoes[index] if part == CONTENT and self.echoes and 0 <= index < len(self.echoes) else None
        if isinstance(echoed, str) and text.startswith(echoed):
            text = text[len(echoed):]
        elif isinstance(echoed, list) and text:
            self.echoed_ids += len(echoed)
        self.texts.append(text)


def _generated_texts(ctx: RequestContext) -> _Generated:
    """The texts the model generated: a non-streamed answer's choices, or what a stream sent the client, each part
    of each choice joined whole (its text, a tool call's arguments: they come in fragments that split tokens
    apart, so counted one by one they would count more)."""
    generated = _Generated(_echoes(ctx))
    if ctx.response_body is not None and ctx.endpoint == "responses":
        for index, part, text in responses_output_parts(_listed(ctx.response_body.get("output"))):
            generated.add(part, text, index)
    elif ctx.response_body is not None:
        choices = ctx.response_body.get("choices")
        for position, choice in enumerate(choices if isinstance(choices, list) else ()):
            if isinstance(choice, dict):
                index = choice.get("index", position)
                index = index if type(index) is int else position
                generated.add(CONTENT, _choice_text(choice), index)
                message = choice.get("message")
                for part, text in generated_parts(message) if isinstance(message, dict) else ():
                    generated.add(part, text, index)
    elif (record := ctx.stream_record) is not None:
        for index, part, text in record.parts.items():
            generated.add(part, text, index)
    return generated


def _echoes(ctx: RequestContext) -> list[object] | None:
    """A completions request with `echo`: each choice's prompt (choice `i * n + j` answers prompt `i`), a text or
    token ids, which the model wrote before its answer and did not generate; None otherwise."""
    body = ctx.body
    if ctx.endpoint != "completions" or not isinstance(body, dict) or body.get("echo") is not True:
        return None
    prompt = body.get("prompt")
    prompts = prompt if prompts_in("completions", body) > 1 else [prompt]
    n = body.get("n")
    n = n if type(n) is int and n > 0 else 1
    return [each if isinstance(each, str) or isinstance(each, list) and is_token_array(each) else None
            for each in prompts for _ in range(n)]


#: the part of an answer that is its reasoning (counted apart as reasoning tokens too)
REASONING = "reasoning"
#: the part of an answer that is its text (a chat choice's `content`, a completion's `text`)
CONTENT = "content"
#: a part's pieces kept apart before they are joined into one: a long reasoning stream holds its text, not
#: a string object for each of its thousands of pieces
JOIN_EVERY = 64


class GeneratedParts:
    """What a stream generated, by choice and part (its text, reasoning, a refusal, each function call's name
    and arguments), for the usage estimate: each part joined whole, since its pieces split tokens apart.

    Some servers send a function call's name or arguments again: whole with the last chunk, or all of it so
    far in every chunk. A piece that repeats everything kept for its part so far (two characters at least,
    or all of it) replaces it rather than adding to it, so the call is counted once.
    """

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: dict[tuple[int, str], _Part] = {}

    def add(self, index: int, delta: dict) -> None:
        """Keep what the delta of choice `index` generated besides its text."""
        for part, piece in generated_parts(delta):
            self.add_piece(index, part, piece)

    def add_piece(self, index: int, part: str, piece: str) -> None:
        """Keep a piece of part `part` of choice (or output item) `index`."""
        kept = self._parts.get((index, part))
        if kept is None:
            self._parts[(index, part)] = _Part(piece)
        elif part.endswith(_FUNCTION_FIELDS) and kept.repeated_by(piece):
            kept.replace(piece)
        else:
            kept.append(piece)

    def add_text(self, index: int, text: str) -> None:
        """Keep a piece of choice `index`'s text."""
        kept = self._parts.get((index, CONTENT))
        if kept is None:
            self._parts[(index, CONTENT)] = _Part(text)
        else:
            kept.append(text)

    def items(self) -> list[tuple[int, str, str]]:
        """(choice index, part, its text joined) of each choice's parts; the part as `generated_parts` names it,
        or CONTENT."""
        return [(index, part, kept.text()) for (index, part), kept in self._parts.items()]

    def texts(self) -> list[tuple[int, str]]:
        """(choice index, its text joined) of each choice that sent text, by index."""
        return sorted((index, kept.text()) for (index, part), kept in self._parts.items() if part == CONTENT)


_FUNCTION_FIELDS = (".name", ".arguments")


class _Part:
    """One part's text: the groups of JOIN_EVERY pieces already joined, the pieces since, their total length."""

    __slots__ = ("groups", "pieces", "length")

    def __init__(self, piece: str) -> None:
        self.groups: list[str] = []
        self.pieces, self.length = [piece], len(piece)

    def repeated_by(self, piece: str) -> bool:
        """Whether `piece` starts with everything kept so far (the length test first: a new fragment is short)."""
        if len(piece) < self.length or (self.length < 2 and piece != self.text()):
            return False
        return piece.startswith(self.text())

    def replace(self, piece: str) -> None:
        self.groups, self.pieces, self.length = [], [piece], len(piece)

    def append(self, piece: str) -> None:
        self.pieces.append(piece)
        self.length += len(piece)
        if len(self.pieces) >= JOIN_EVERY:      # each piece is copied once here, once in `text`
            self.groups.append("".join(self.pieces))
            self.pieces = []

    def text(self) -> str:
        return "".join((*self.groups, *self.pieces))


def generated_parts(message: dict) -> Iterator[tuple[str, str]]:
    """The texts a model generated in a chat message or stream delta besides its `content`, each with the part
    of the answer it belongs to: reasoning (`reasoning_content`, else `reasoning`: a server that sends both
    sends the same text twice), a refusal, a legacy `function_call`, and each tool call, by name and arguments
    (a custom tool's: its name and input)."""
    reasoning = message.get("reasoning_content")
    if not _is_text(reasoning):
        reasoning = message.get("reasoning")
    if _is_text(reasoning):
        yield REASONING, reasoning
    if _is_text(refusal := message.get("refusal")):
        yield "refusal", refusal
    yield from _function_parts("function_call", message.get("function_call"))
    tool_calls = message.get("tool_calls")
    for position, call in enumerate(tool_calls if isinstance(tool_calls, list) else ()):
        if isinstance(call, dict):
            index = call.get("index", position)
            function = call.get("function")
            if function is None and isinstance(custom := call.get("custom"), dict):
                function = {"name": custom.get("name"), "arguments": custom.get("input")}
            yield from _function_parts(f"tool_calls[{index if type(index) is int else position}]", function)


def responses_output_parts(output: list) -> Iterator[tuple[int, str, str]]:
    """(item index, part, text) of what a Responses API answer generated: its messages' text and refusals, its
    function and custom tool calls (name and arguments, or input), its reasoning (summary and text)."""
    for index, item in enumerate(output):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in _listed(item.get("content")):
                if not isinstance(part, dict):
                    continue
                refusal = part.get("type") == "refusal"
                if _is_text(text := part.get("refusal" if refusal else "text")):
                    yield index, "refusal" if refusal else CONTENT, text
        elif kind in ("function_call", "custom_tool_call"):
            arguments = item.get("arguments") if kind == "function_call" else item.get("input")
            for part, text in _function_parts(f"output[{index}]", {"name": item.get("name"),
                                                                   "arguments": arguments}):
                yield index, part, text
        elif kind == "reasoning":
            for field in ("summary", "content"):
                for part in _listed(item.get(field)):
                    if isinstance(part, dict) and _is_text(text := part.get("text")):
                        yield index, REASONING, text


def _listed(value: object) -> list | tuple:
    """`value` when it is a list, else nothing to go through (a server's odd answer must not break the count)."""
    return value if isinstance(value, list) else ()


def _function_parts(part: str, function: object) -> Iterator[tuple[str, str]]:
    """A function call's name and arguments (a stream sends the arguments in pieces; a server that sends them
    as a JSON object, not the string OpenAI sends, has them counted as that object's JSON)."""
    if isinstance(function, dict):
        if _is_text(name := function.get("name")):
            yield f"{part}.name", name
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)) and arguments:
            arguments = orjson.dumps(arguments).decode()
        if _is_text(arguments):
            yield f"{part}.arguments", arguments


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


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


async def settle_attempt(ctx: RequestContext, attempt: Attempt) -> None:
    """Fill in an ended attempt: the answer's fields, and estimated usage when it produced output."""
    if ctx.response_body is not None and attempt is ctx.attempts[-1] and attempt.status == 200:
        read_answer(attempt, ctx.response_body, ctx.endpoint)
    produced = attempt.status == 200 or (ctx.bytes_sent and attempt is ctx.attempts[-1])
    if attempt.usage is None and produced:
        await count_usage(attempt, Estimate(ctx, attempt))
