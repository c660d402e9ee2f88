"""Request bodies checked and reduced to what the simulator needs; bad input is a ClientError (400)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.errors import ClientError
from gateway.simulator.text import count_chat_tokens, count_prompt_tokens

#: the most answers one request may ask for (`n`), as OpenAI allows
MAX_CHOICES = 128
#: the most vector dimensions and embedding inputs one request may ask for (text-embedding-3-large's 3072,
#: and OpenAI's 2048 inputs per request): larger asks are a 400, not minutes of work on the simulator's loop
MAX_DIMENSIONS = 3072
MAX_EMBEDDING_INPUTS = 2048
#: the fewest output tokens a Responses API request may ask for (`max_output_tokens`), as OpenAI allows
MIN_OUTPUT_TOKENS = 16


@dataclass(frozen=True)
class SimRequest:
    """One parsed model request."""

    kind: str                       # chat | completions | embeddings | responses
    prompt: Any                     # what seeds the answer: the messages, the prompt or the input
    prompt_tokens: int
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    inputs: tuple[Any, ...] = ()    # embeddings: one item per vector
    dimensions: int | None = None
    encoding_format: str = "float"
    choices: int = 1                # answers generated together: `n` (for each prompt of a completions batch)
    echoes: tuple[str, ...] = ()    # completions with `echo`: each choice's prompt text, written before its answer
    logprobs: int | None = None     # completions: the top alternatives per token asked for (`logprobs`)
    longest_prompt_tokens: int | None = None    # a batch's longest prompt or input (each is read on its own)
    background: bool = False        # responses with `background: true`: answered at once, made in simulated time

    @property
    def context_tokens(self) -> int:
        """The prompt tokens the context window must hold at once: a batch's longest prompt, else the prompt."""
        return self.prompt_tokens if self.longest_prompt_tokens is None else self.longest_prompt_tokens


def parse_chat(body: dict[str, Any]) -> SimRequest:
    """A chat completions request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError("'messages' must be a non-empty array.", param="messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ClientError("Each message must be an object with a 'role'.", param="messages")
    max_tokens = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    return SimRequest("chat", messages, count_chat_tokens(messages), max_tokens, *_streaming(body),
                      choices=_choices(body))


def parse_completions(body: dict[str, Any]) -> SimRequest:
    """A text completions request: a batch of prompts gets `n` choices for each, in prompt order (choice
    `i * n + j` is prompt i's j-th); `max_tokens` 0 scores the prompt alone (with `echo`, it is the answer)."""
    prompt = body.get("prompt")
    if not _is_prompt(prompt):
        raise ClientError("'prompt' must be a string, an array of strings or token ids.", param="prompt")
    prompts = prompt if isinstance(prompt, list) and not all(_is_int(item) for item in prompt) else [prompt]
    n = _choices(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 5):
        raise ClientError("'logprobs' must be an integer from 0 to 5.", param="logprobs")
    echoes = tuple(item if isinstance(item, str) else "" for item in prompts for _ in range(n)) \
        if body.get("echo") is True else ()
    counts = [count_prompt_tokens(item) for item in prompts]
    return SimRequest("completions", prompt, sum(counts), _max_tokens(body, "max_tokens", 0), *_streaming(body),
                      choices=n * len(prompts), echoes=echoes, logprobs=logprobs, longest_prompt_tokens=max(counts))


def parse_embeddings(body: dict[str, Any]) -> SimRequest:
    """An embeddings request."""
    given = body.get("input")
    inputs = _embedding_inputs(given)
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= MAX_DIMENSIONS):
        raise ClientError(f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.", param="dimensions")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ClientError("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    counts = [count_prompt_tokens(item) for item in inputs]
    return SimRequest("embeddings", given, sum(counts), inputs=inputs, dimensions=dimensions,
                      encoding_format=encoding_format, longest_prompt_tokens=max(counts))


def parse_responses(body: dict[str, Any]) -> SimRequest:
    """A Responses API request: `instructions` and the text of `input` are counted as a chat prompt would be;
    `tools`, `previous_response_id` and the sampling settings are accepted and ignored. `background: true` is
    refused with `store: false` (as OpenAI refuses it)."""
    messages = _responses_messages(body)
    stream, _ = _streaming(body)
    background = body.get("background") is True
    if background and body.get("store") is False:
        raise ClientError("Background responses require store=true.", param="store")
    return SimRequest("responses", messages, count_chat_tokens(messages), _max_output_tokens(body), stream,
                      background=background)


def parse_retrieve_stream(query: Mapping[str, str]) -> int | None:
    """`GET /v1/responses/{id}`'s query: None unless `stream` is true (or 1), else the number of the event the
    stream starts after (`starting_after`, -1 when absent: from the first)."""
    stream = query.get("stream", "false").lower()
    if stream not in ("true", "1", "false", "0"):
        raise ClientError("'stream' must be true or false.", param="stream")
    if stream in ("false", "0"):
        return None
    starting_after = query.get("starting_after")
    if starting_after is None:
        return -1
    if not (starting_after.isascii() and starting_after.isdigit()):
        raise ClientError("'starting_after' must be an integer of at least 0.", param="starting_after")
    return int(starting_after)


def _max_output_tokens(body: dict[str, Any]) -> int | None:
    """`max_output_tokens`: absent, or an integer of at least MIN_OUTPUT_TOKENS, refused as OpenAI refuses it."""
    value = body.get("max_output_tokens")
    if value is None:
        return None
    if not _is_int(value):
        raise ClientError("Invalid type for 'max_output_tokens': expected an integer.", param="max_output_tokens",
                          code="invalid_type")
    if value < MIN_OUTPUT_TOKENS:
        raise ClientError(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                          f"{MIN_OUTPUT_TOKENS}, but got {value} instead.",
                          param="max_output_tokens", code="integer_below_min_value")
    return value


def _responses_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request as chat messages: the instructions, then each input item whose text can be counted (a message,
    a function call's output); other items (reasoning, tool calls) add nothing."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ClientError("'instructions' must be a string.", param="instructions")
    given = body.get("input")
    if isinstance(given, str):
        items: list[Any] = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given and all(isinstance(item, dict) for item in given):
        items = given
    else:
        raise ClientError("'input' must be a string or a non-empty array of input items.", param="input")
    if not all(_is_input_item(item) for item in items):
        raise ClientError("Each input message must have a string 'role' and a string or array 'content'.",
                          param="input")
    messages = [{"role": "developer", "content": instructions}] if instructions else []
    for item in items:
        if "role" in item:
            messages.append(item)
        elif item.get("type") == "function_call_output" and isinstance(item.get("output"), str):
            messages.append({"role": "tool", "content": item["output"]})
    return messages


def _is_input_item(item: dict[str, Any]) -> bool:
    """Whether an input item is well formed as far as the simulator reads it: a message needs its role and
    content, any other item (it has no role) is taken as it is."""
    if "role" not in item:
        return True
    return isinstance(item["role"], str) and isinstance(item.get("content"), str | list)


def _max_tokens(body: dict[str, Any], key: str, low: int = 1) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < low:
        raise ClientError(f"'{key}' must be an integer of at least {low}.", param=key)
    return value


def _choices(body: dict[str, Any]) -> int:
    """`n`, the number of answers: 1 when absent, at most MAX_CHOICES, as OpenAI allows."""
    value = body.get("n")
    if value is None:
        return 1
    if not _is_int(value) or not 1 <= value <= MAX_CHOICES:
        raise ClientError(f"'n' must be an integer from 1 to {MAX_CHOICES}.", param="n")
    return value


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) from the body."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ClientError("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ClientError("'stream_options' must be an object.", param="stream_options")
    return stream, stream and options.get("include_usage") is True


def _embedding_inputs(given: Any) -> tuple[Any, ...]:
    """One item per vector asked for."""
    if isinstance(given, str):
        return (given,)
    if isinstance(given, list) and len(given) > MAX_EMBEDDING_INPUTS and not all(_is_int(item) for item in given):
        raise ClientError(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items.", param="input")
    if isinstance(given, list) and given and all(_is_int(item) for item in given):
        return (tuple(given),)
    if isinstance(given, list) and given and all(_is_text_or_ids(item) for item in given):
        return tuple(item if isinstance(item, str) else tuple(item) for item in given)
    raise ClientError("'input' must be a string, an array of strings or token ids.", param="input")


def _is_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and bool(prompt) and (
        all(_is_int(item) for item in prompt) or all(_is_text_or_ids(item) for item in prompt))


def _is_text_or_ids(item: Any) -> bool:
    if isinstance(item, str):
        return True
    return isinstance(item, list) and bool(item) and all(_is_int(i) for i in item)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
