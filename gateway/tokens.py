"""Token counting with tiktoken, offline: the encodings ship with the gateway.

Prompt counts follow the OpenAI cookbook "How to count tokens with tiktoken":

- chat: 3 tokens per message, plus the tokens of each string value in it
  (role, content, name, tool_call_id, ...), plus 1 when `name` is present,
  plus 3 priming the reply (`<|start|>assistant<|message|>`). Content parts
  count their text; an image counts IMAGE_TOKENS_LOW (detail "low") or
  IMAGE_TOKENS_HIGH (any other detail: a 1024x1024 image at detail "high" is
  85 + 4 tiles x 170 tokens in OpenAI's vision pricing); audio and file parts
  count 0 (their size cannot be known without decoding them). Assistant
  `tool_calls` / `function_call` count each function's name and arguments.
- tools / functions: the cookbook's `num_tokens_for_tools` rule, whose
  per-function overhead differs between the gpt-4o family (o200k_base) and
  gpt-4 / gpt-3.5 (cl100k_base). Keys the cookbook's flat schemas lack (a
  property's nested `properties` or `items`, the parameters' `$defs`, a custom
  tool's `format`) add the tokens of their JSON; a custom tool counts its
  name and description as a function does.
- completions / embeddings: a string, a list of strings, a token array or a
  list of token arrays (their lengths).

User text is encoded with `encode_ordinary`, so `<|endoftext|>` in a prompt is
plain text, never an error. Each string is encoded once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFPROMPT, ENDOFTEXT, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

from gateway.context import Usage
from gateway.errors import ClientError

DEFAULT_ENCODING = "o200k_base"
ENCODINGS_DIR = Path(__file__).parent / "encodings"

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 765


@dataclass(frozen=True)
class EncodingSpec:
    """What tiktoken needs besides the ranks file: as in `tiktoken_ext.openai_public`."""

    sha256: str
    pat_str: str
    special_tokens: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ToolOverhead:
    """The cookbook's fixed token costs of function definitions."""

    func_init: int
    prop_init: int = 3
    prop_key: int = 3
    enum_init: int = -3
    enum_item: int = 3
    func_end: int = 12


# tiktoken_ext.openai_public builds these patterns inside its loader functions, which
# download the ranks; they are repeated here verbatim (tests check they still agree).
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

ENCODING_SPECS = MappingProxyType({
    "cl100k_base": EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PAT,
        special_tokens=((ENDOFTEXT, 100257), (FIM_PREFIX, 100258), (FIM_MIDDLE, 100259),
                        (FIM_SUFFIX, 100260), (ENDOFPROMPT, 100276)),
    ),
    "o200k_base": EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PAT,
        special_tokens=((ENDOFTEXT, 199999), (ENDOFPROMPT, 200018)),
    ),
})
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(ENCODING_SPECS)

#: gpt-4o / gpt-4o-mini use 7 tokens per function, gpt-4 / gpt-3.5-turbo 10 (cookbook)
TOOL_OVERHEADS = MappingProxyType({
    "cl100k_base": ToolOverhead(func_init=10),
    "o200k_base": ToolOverhead(func_init=7),
})


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built from the bundled ranks file (no network), loaded once."""
    spec = ENCODING_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoding {name!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    path = ENCODINGS_DIR / f"{name}.tiktoken"
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=spec.sha256)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"bundled encoding file {path} is unreadable: {exc}") from exc
    return tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                             special_tokens=dict(spec.special_tokens))


def count_text_tokens(text: str, encoding_name: str) -> int:
    """Tokens of one text, special-token markers counted as plain text."""
    return len(get_encoding(encoding_name).encode_ordinary(text))


def count_completion_tokens(texts: list[str], encoding_name: str) -> int:
    """Estimated output tokens of generated texts, for upstreams that report no usage."""
    enc = get_encoding(encoding_name)
    return sum(len(enc.encode_ordinary(text)) for text in texts if text)


def count_prompt_tokens(endpoint: str, body: dict, encoding_name: str) -> int:
    """Prompt tokens of an OpenAI request body for the chat, completions or embeddings endpoint."""
    return count_prompts(endpoint, body, encoding_name)[0]


def count_prompts(endpoint: str, body: dict, encoding_name: str) -> tuple[int, int]:
    """(all the prompt tokens of a request body, its longest prompt's). A completions batch or an embeddings list
    holds several prompts, each of which a model reads, and its context window must hold, on its own (as OpenAI
    and vLLM check them); a request of one prompt has both the same."""
    enc = get_encoding(encoding_name)
    if endpoint == "chat":
        total = _chat_tokens(enc, body, TOOL_OVERHEADS[encoding_name])
        return total, total
    if endpoint == "completions":
        return _inputs_tokens(enc, body.get("prompt"), "prompt")
    if endpoint == "embeddings":
        return _inputs_tokens(enc, body.get("input"), "input")
    if endpoint == "responses":
        total = _responses_tokens(enc, body, TOOL_OVERHEADS[encoding_name])
        # `truncation: auto`: the server drops the oldest input items to fit its window, which need hold none
        return total, 0 if body.get("truncation") == "auto" else total
    raise ValueError(f"unknown endpoint {endpoint!r}; expected chat, completions, embeddings or responses")


#: strings this short (roles, names, tool names, tiny messages) are counted once and remembered
SHORT_TEXT_CHARS = 24
#: longer strings up to this size are remembered too, in a smaller cache: an application's system prompt
#: and tool schemas repeat in every request (2 KB takes about 50 µs to encode, under 1 µs to hash)
REPEATED_TEXT_CHARS = 16_384


def _text(enc: tiktoken.Encoding, text: str) -> int:
    size = len(text)
    if size <= SHORT_TEXT_CHARS:
        return _short_text(enc.name, text)
    if size <= REPEATED_TEXT_CHARS:
        return _repeated_text(enc.name, text)
    return len(enc.encode_ordinary(text))


@functools.lru_cache(maxsize=4096)
def _short_text(encoding_name: str, text: str) -> int:
    """Memoised count of a short string: the encoder releases the GIL per call, which costs more than it saves."""
    return len(get_encoding(encoding_name).encode_ordinary(text))


@functools.lru_cache(maxsize=1024)
def _repeated_text(encoding_name: str, text: str) -> int:
    """Memoised count of a longer string (at most 1024 × 16 KB held); one seen in every request stays."""
    return len(get_encoding(encoding_name).encode_ordinary(text))


def _json_text(value: Any) -> str:
    """A JSON value as the text a model would read; strings stay as they are."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def is_token_array(value: list) -> bool:
    """Whether a prompt list is token ids (a completions prompt, an embeddings input), not texts."""
    return all(type(item) is int for item in value)


def _inputs_tokens(enc: tiktoken.Encoding, value: Any, param: str) -> tuple[int, int]:
    """A completions prompt or embeddings input (text, texts, token array(s)): (all its tokens, its longest
    item's)."""
    if value is None:
        return 0, 0
    if isinstance(value, str):
        tokens = _text(enc, value)
        return tokens, tokens
    if not isinstance(value, list):
        raise ClientError(f"'{param}' must be a string, a list of strings or token arrays", param=param,
                          code="invalid_type")
    if is_token_array(value):
        return len(value), len(value)
    total = longest = 0
    for item in value:
        if isinstance(item, str):
            tokens = _text(enc, item)
        elif isinstance(item, list) and is_token_array(item):
            tokens = len(item)
        else:
            raise ClientError(f"'{param}' items must be strings or token arrays", param=param, code="invalid_type")
        total += tokens
        longest = max(longest, tokens)
    return total, longest


def _chat_tokens(enc: tiktoken.Encoding, body: dict, overhead: ToolOverhead) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ClientError("'messages' must be a list", param="messages", code="invalid_type")
    total = REPLY_PRIMING_TOKENS
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ClientError("each message must be an object", param=f"messages[{index}]", code="invalid_type")
        total += _message_tokens(enc, message)
    for param in ("tools", "functions"):
        total += _tools_tokens(enc, body.get(param), overhead, param)
    return total + _response_format_tokens(enc, body.get("response_format"))


def _responses_tokens(enc: tiktoken.Encoding, body: dict, overhead: ToolOverhead) -> int:
    """A Responses API request: its `instructions` and `input` (a text, or items: messages counted as chat's, a
    function call by its name and arguments, a tool's output by its text, a reasoning item by its summary, any
    other item by its JSON), its tools (flat function definitions, counted by the same rule) and the schema of
    its structured output (`text.format`)."""
    total = REPLY_PRIMING_TOKENS
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + _text(enc, instructions)
    given = body.get("input")
    if isinstance(given, str):
        total += TOKENS_PER_MESSAGE + _text(enc, given)
    elif isinstance(given, list):
        total += sum(_input_item_tokens(enc, item) for item in given)
    total += _tools_tokens(enc, body.get("tools"), overhead, "tools")
    text = body.get("text")
    output_format = text.get("format") if isinstance(text, dict) else None
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        total += _text(enc, _json_text({key: value for key, value in output_format.items() if key != "type"}))
    return total


def _input_item_tokens(enc: tiktoken.Encoding, item: Any) -> int:
    """One item of a Responses API `input`."""
    if isinstance(item, str):
        return _text(enc, item)
    if not isinstance(item, dict):
        return 0
    kind = item.get("type")
    if kind == "function_call":
        return TOKENS_PER_MESSAGE + _function_call_tokens(enc, item)
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        if isinstance(output, list):    # parts (input_text, input_image, input_file): an image is not its base64
            return TOKENS_PER_MESSAGE + sum(_part_tokens(enc, part) for part in output)
        return TOKENS_PER_MESSAGE + (_text(enc, _json_text(output)) if output is not None else 0)
    if kind == "reasoning":
        summary = item.get("summary")
        return sum(_part_tokens(enc, part) for part in summary) if isinstance(summary, list) else 0
    if "role" in item:                  # a message, `type: message` or none
        return _message_tokens(enc, {key: value for key, value in item.items() if key not in ("type", "id", "status")})
    return _text(enc, _json_text(item))


def _response_format_tokens(enc: tiktoken.Encoding, response_format: Any) -> int:
    """A structured output's schema, which the model reads with the prompt: the JSON of its `json_schema` (name,
    description, schema); 0 for `text` and `json_object`."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return 0
    schema = response_format.get("json_schema")
    return _text(enc, _json_text(schema)) if isinstance(schema, dict) else 0


def _message_tokens(enc: tiktoken.Encoding, message: dict) -> int:
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        total += _field_tokens(enc, key, value)
        if key == "name":
            total += TOKENS_PER_NAME
    return total


def _field_tokens(enc: tiktoken.Encoding, key: str, value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return _text(enc, value)
    if key == "content" and isinstance(value, list):
        return sum(_part_tokens(enc, part) for part in value)
    if key == "tool_calls" and isinstance(value, list):
        return sum(_tool_call_tokens(enc, call) for call in value if isinstance(call, dict))
    if key == "function_call":
        return _function_call_tokens(enc, value)
    return _text(enc, _json_text(value))


def _part_tokens(enc: tiktoken.Encoding, part: Any) -> int:
    """One content part: text and refusals by their text, images by a fixed estimate."""
    if isinstance(part, str):
        return _text(enc, part)
    if not isinstance(part, dict):
        return 0
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        return _text(enc, text) if isinstance(text, str) else 0
    if type(kind) is str and kind in RESPONSES_TEXT_PARTS:
        text = part.get("text")
        return _text(enc, text) if isinstance(text, str) else 0
    if kind == "image_url":
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, dict) else None
        return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH
    if kind == "input_image":           # the Responses API's: its detail beside its URL
        return IMAGE_TOKENS_LOW if part.get("detail") == "low" else IMAGE_TOKENS_HIGH
    return 0


#: the Responses API's content parts (and reasoning summaries) that carry their text as `text`
RESPONSES_TEXT_PARTS = frozenset(("input_text", "output_text", "summary_text", "reasoning_text"))


def _tool_call_tokens(enc: tiktoken.Encoding, call: dict) -> int:
    """A tool call the assistant made: a function's name and arguments, or a custom tool's name and input."""
    if call.get("type") == "custom":
        custom = call.get("custom")
        if not isinstance(custom, dict):
            return 0
        return _function_call_tokens(enc, {"name": custom.get("name"), "arguments": custom.get("input")})
    return _function_call_tokens(enc, call.get("function"))


def _function_call_tokens(enc: tiktoken.Encoding, function: Any) -> int:
    """A call the assistant made: the function's name and its (serialized) arguments."""
    if not isinstance(function, dict):
        return 0
    name = function.get("name")
    arguments = function.get("arguments")
    total = _text(enc, name) if isinstance(name, str) else 0
    return total + (_text(enc, _json_text(arguments)) if arguments is not None else 0)


def _tools_tokens(enc: tiktoken.Encoding, tools: Any, overhead: ToolOverhead, param: str) -> int:
    """Function definitions, by the cookbook's `num_tokens_for_tools` rule."""
    if not tools:
        return 0
    if not isinstance(tools, list):
        raise ClientError(f"'{param}' must be a list", param=param, code="invalid_type")
    total = overhead.func_end
    for tool in tools:
        if not isinstance(tool, dict):
            raise ClientError(f"each of '{param}' must be an object", param=param, code="invalid_type")
        total += _function_def_tokens(enc, _definition(tool), overhead)
    return total


def _definition(tool: dict) -> dict:
    """What a tool defines: the object its `type` names (`function`, `custom`), else the tool itself (a legacy
    `functions` entry)."""
    kind = tool.get("type")
    definition = tool.get(kind if isinstance(kind, str) else "function")
    return definition if isinstance(definition, dict) else tool


#: keys of a definition, and of its parameters' schema, that the cookbook's rule already counts (or, for
#: `strict` and `additionalProperties`, that it leaves out); any other key (`$defs` of a schema made from
#: nested models, a custom tool's `format` grammar) adds the tokens of its JSON
DEFINITION_KEYS = frozenset(("type", "name", "description", "parameters", "strict"))
SCHEMA_KEYS = frozenset(("type", "properties", "required", "additionalProperties"))


def _function_def_tokens(enc: tiktoken.Encoding, function: dict, overhead: ToolOverhead) -> int:
    name = str(function.get("name") or "")
    description = str(function.get("description") or "").removesuffix(".")
    total = overhead.func_init + _text(enc, f"{name}:{description}") + _extras_tokens(enc, function, DEFINITION_KEYS)
    parameters = function.get("parameters")
    if not isinstance(parameters, dict):
        return total
    total += _extras_tokens(enc, parameters, SCHEMA_KEYS)
    properties = parameters.get("properties")
    if isinstance(properties, dict) and properties:
        total += overhead.prop_init
        total += sum(_property_tokens(enc, key, prop, overhead) for key, prop in properties.items()
                     if isinstance(prop, dict))
    return total


def _extras_tokens(enc: tiktoken.Encoding, mapping: dict, counted: frozenset[str]) -> int:
    """The tokens of the JSON of `mapping`'s keys outside `counted`; 0 when it has none."""
    extras = {key: value for key, value in mapping.items() if key not in counted}
    return _text(enc, _json_text(extras)) if extras else 0


def _property_tokens(enc: tiktoken.Encoding, key: str, prop: dict, overhead: ToolOverhead) -> int:
    total = overhead.prop_key
    enum = prop.get("enum")
    if isinstance(enum, list):
        total += overhead.enum_init
        total += sum(overhead.enum_item + _text(enc, str(item)) for item in enum)
    kind = prop.get("type")
    kind = "|".join(map(str, kind)) if isinstance(kind, list) else str(kind or "")
    description = str(prop.get("description") or "").removesuffix(".")
    total += _text(enc, f"{key}:{kind}:{description}")
    extras = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
    return total + (_text(enc, _json_text(extras)) if extras else 0)


def usage_from_response(body: dict) -> Usage | None:
    """The upstream's reported usage (Chat/Completions or Responses naming), or None."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        return _parse_usage(usage)
    except _MalformedUsage:
        return None


class _MalformedUsage(ValueError):
    """A usage count that is not a non-negative integer, or is past MAX_REPORTED_TOKENS."""


#: the largest token count believed from a model server: no answer comes near it, and a count past int64 could not
#: be recorded at all (the ledger's JSON, OTLP's integer attributes, metric sums), so a larger one is a server's bug
MAX_REPORTED_TOKENS = 2 ** 32 - 1


def usage_body(usage: Usage) -> dict[str, Any]:
    """A usage count as OpenAI writes one (`prompt_tokens`, `completion_tokens`, `total_tokens`, and the reasoning
    and audio tokens among the completion's, and the audio among the prompt's, when there are any)."""
    body: dict[str, Any] = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                            "total_tokens": usage.input_tokens + usage.output_tokens}
    if usage.audio_input_tokens:
        body["prompt_tokens_details"] = {"audio_tokens": usage.audio_input_tokens}
    output_details = {name: count for name, count in (("reasoning_tokens", usage.reasoning_tokens),
                                                      ("audio_tokens", usage.audio_output_tokens)) if count}
    if output_details:
        body["completion_tokens_details"] = output_details
    return body


def _parse_usage(usage: dict) -> Usage | None:
    """The usage a model reported; None (the gateway counts instead) when it names no input count, or no output
    count and no total to take it from (half a usage billed the other half as 0).

    The shapes of OpenAI-compatible servers and proxies: a total past input and output carries reasoning
    reported beside the output (Gemini through some proxies): the output is the total less the input; Anthropic's
    `input_tokens` leaves out its cache reads and writes (`cache_read_input_tokens`, `cache_creation_input_tokens`),
    added back, the reads as cached input; DeepSeek's `prompt_cache_hit_tokens` are cached input. Input written
    to the prompt cache (OpenAI's `cache_write_tokens` among the details, Anthropic's `cache_creation_input_tokens`)
    is priced apart. Cached input is at most the input, written input at most what the cached leaves."""
    input_tokens = _count(usage, "prompt_tokens", "input_tokens")
    output_tokens = _count(usage, "completion_tokens", "output_tokens")
    total_tokens = _count(usage, "total_tokens")
    if input_tokens is None:
        return None
    input_details = _details(usage, "prompt_tokens_details", "input_tokens_details")
    output_details = _details(usage, "completion_tokens_details", "output_tokens_details")
    cached = _detail(input_details, "cached_tokens") or _detail(usage, "prompt_cache_hit_tokens")
    created = _detail(usage, "cache_creation_input_tokens")     # Anthropic's writes to its prompt cache
    written = _detail(input_details, "cache_write_tokens") or created
    if "prompt_tokens" not in usage:        # Anthropic's input count leaves its cache reads and writes out
        read = _detail(usage, "cache_read_input_tokens")
        input_tokens += read + created
        cached = cached or read
    if total_tokens is not None and (output_tokens is None or total_tokens > input_tokens + output_tokens):
        output_tokens = max(0, total_tokens - input_tokens)     # embeddings' none; reasoning reported beside it
    if output_tokens is None:
        return None
    cached = min(cached, input_tokens)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached,
                 cache_write_input_tokens=min(written, input_tokens - cached),
                 reasoning_tokens=_detail(output_details, "reasoning_tokens"),
                 audio_input_tokens=min(_detail(input_details, "audio_tokens"), input_tokens),
                 audio_output_tokens=min(_detail(output_details, "audio_tokens"), output_tokens))


def _count(mapping: dict, *keys: str) -> int | None:
    """The first count present among keys, None when none is; a whole number sent as a float (`12.0`) counts,
    one past MAX_REPORTED_TOKENS does not."""
    for key in keys:
        value = mapping.get(key)
        if value is None:
            continue
        if type(value) is float and value.is_integer():
            value = int(value)
        if type(value) is not int or not 0 <= value <= MAX_REPORTED_TOKENS:
            raise _MalformedUsage(f"{key}: {value!r}")
        return value
    return None


def _detail(details: dict, key: str) -> int:
    """A breakdown count (cached input, reasoning); 0 when absent or malformed: the totals the model reported
    still stand (input then priced in full)."""
    try:
        return _count(details, key) or 0
    except _MalformedUsage:
        return 0


def _details(usage: dict, *keys: str) -> dict:
    """The first details object present among keys, empty when none is."""
    for key in keys:
        value = usage.get(key)
        if isinstance(value, dict):
            return value
    return {}
