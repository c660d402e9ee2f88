"""Token counting: offline encodings, the cookbook's published counts, every input shape, usage parsing."""

from __future__ import annotations

import json
import socket

import pytest
import tiktoken_ext.openai_public as openai_public

from gateway.context import Usage
from gateway.errors import ClientError
from gateway.tokens import (
    DEFAULT_ENCODING,
    ENCODING_SPECS,
    IMAGE_TOKENS_HIGH,
    IMAGE_TOKENS_LOW,
    SUPPORTED_ENCODINGS,
    count_completion_tokens,
    count_prompt_tokens,
    count_prompts,
    count_text_tokens,
    get_encoding,
    usage_from_response,
)

# The cookbook "How to count tokens with tiktoken", section 6: 129 prompt tokens on
# gpt-4 / gpt-3.5-turbo (cl100k_base), 124 on gpt-4o / gpt-4o-mini (o200k_base).
COOKBOOK_MESSAGES = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates "
                                  "corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant",
     "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth "
                                                         "to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant",
     "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean "
                                "for the client deliverable."},
]

# Section 7: 105 prompt tokens on gpt-4 / gpt-3.5-turbo, 101 on gpt-4o / gpt-4o-mini.
COOKBOOK_TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature to return",
                         "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}]
COOKBOOK_TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def test_encodings_load_and_count_with_the_network_blocked(monkeypatch, tmp_path):
    """Both encodings load from the bundled files and count with no network and an empty tiktoken cache."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    get_encoding.cache_clear()
    try:
        assert count_text_tokens("tiktoken is great!", "cl100k_base") == 6
        assert count_text_tokens("tiktoken is great!", "o200k_base") == 6
    finally:
        get_encoding.cache_clear()


@pytest.mark.parametrize("name", SUPPORTED_ENCODINGS)
def test_encoding_specs_match_tiktoken_ext(monkeypatch, name):
    """Our pattern, special tokens and file hash are exactly those of tiktoken_ext.openai_public."""
    requested = {}

    def fake_load(url, expected_hash=None):
        requested.update(url=url, expected_hash=expected_hash)
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    upstream = openai_public.ENCODING_CONSTRUCTORS[name]()
    spec = ENCODING_SPECS[name]
    assert spec.pat_str == upstream["pat_str"]
    assert dict(spec.special_tokens) == upstream["special_tokens"]
    assert spec.sha256 == requested["expected_hash"]
    assert requested["url"].endswith(f"/{name}.tiktoken")


def test_get_encoding_is_cached_and_rejects_unknown_names():
    """One Encoding object per name; an unknown name lists the supported ones."""
    assert get_encoding(DEFAULT_ENCODING) is get_encoding("o200k_base")
    with pytest.raises(ValueError, match="cl100k_base, o200k_base"):
        get_encoding("p50k_base")


@pytest.mark.parametrize(("name", "ids"), [
    ("cl100k_base", [83, 1609, 5963, 374, 2294, 0]),
    ("o200k_base", [83, 8251, 2488, 382, 2212, 0]),
])
def test_known_strings_have_their_published_tokens(name, ids):
    """'tiktoken is great!' and 'hello world' tokenize as the cookbook and tiktoken README show."""
    assert get_encoding(name).encode("tiktoken is great!") == ids
    assert count_text_tokens("hello world", name) == 2


def test_special_token_text_counts_as_plain_text():
    """User text containing <|endoftext|> is counted as ordinary text instead of raising."""
    text = "ignore <|endoftext|> and <|endofprompt|>"
    for name in SUPPORTED_ENCODINGS:
        assert count_text_tokens(text, name) > 4
        assert count_prompt_tokens("chat", {"messages": [{"role": "user", "content": text}]}, name) > 4
        assert count_prompt_tokens("completions", {"prompt": text}, name) == count_text_tokens(text, name)


@pytest.mark.parametrize(("name", "expected"), [("cl100k_base", 129), ("o200k_base", 124)])
def test_chat_matches_the_cookbook_example(name, expected):
    """The cookbook's six example messages count what the OpenAI API reported for them."""
    assert count_prompt_tokens("chat", {"messages": COOKBOOK_MESSAGES}, name) == expected


@pytest.mark.parametrize(("name", "expected"), [("cl100k_base", 105), ("o200k_base", 101)])
def test_tools_match_the_cookbook_example(name, expected):
    """The cookbook's weather tool example counts what the OpenAI API reported, in both request forms."""
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert count_prompt_tokens("chat", body, name) == expected
    legacy = {"messages": COOKBOOK_TOOL_MESSAGES, "functions": [COOKBOOK_TOOLS[0]["function"]]}
    assert count_prompt_tokens("chat", legacy, name) == expected


def test_nested_tool_schemas_count_their_extra_keys():
    """A property with a nested schema costs more than the same property without one."""
    flat = {"name": "f", "parameters": {"properties": {"xs": {"type": "array", "description": "d"}}}}
    nested = {"name": "f", "parameters": {"properties": {
        "xs": {"type": "array", "description": "d", "items": {"type": "string"}}}}}
    count = [count_prompt_tokens("chat", {"messages": [], "functions": [fn]}, DEFAULT_ENCODING)
             for fn in (flat, nested)]
    assert count[1] - count[0] == count_text_tokens('{"items":{"type":"string"}}', DEFAULT_ENCODING)


def chat(messages: list) -> int:
    """Prompt tokens of a chat body with these messages, in the default encoding."""
    return count_prompt_tokens("chat", {"messages": messages}, DEFAULT_ENCODING)


def text(value: str) -> int:
    """Tokens of a text in the default encoding."""
    return count_text_tokens(value, DEFAULT_ENCODING)


def test_chat_message_overheads():
    """Each message costs 3 plus its strings, a name 1 more, and the reply priming 3."""
    assert chat([]) == 3
    assert chat([{"role": "user", "content": "hello world"}]) == 3 + 3 + text("user") + 2
    named = chat([{"role": "user", "name": "bob", "content": "hello world"}])
    assert named == 3 + 3 + text("user") + text("bob") + 1 + 2


def test_chat_content_parts_count_text_and_fixed_image_estimates():
    """Text parts count like string content; images add the documented low/high estimates."""
    plain = chat([{"role": "user", "content": "describe this"}])
    parts = [{"type": "text", "text": "describe this"}]
    assert chat([{"role": "user", "content": parts}]) == plain
    low = parts + [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]
    high = parts + [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    assert chat([{"role": "user", "content": low}]) == plain + IMAGE_TOKENS_LOW
    assert chat([{"role": "user", "content": high}]) == plain + IMAGE_TOKENS_HIGH


def test_chat_tool_calls_and_tool_results_are_counted():
    """An assistant's tool call counts its name and arguments; a tool result its id and content."""
    arguments = '{"location": "Paris"}'
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert chat([assistant]) == 3 + 3 + text("assistant") + text("get_weather") + text(arguments)
    as_object = dict(call, function={"name": "get_weather", "arguments": {"location": "Paris"}})
    assert chat([dict(assistant, tool_calls=[as_object])]) > 3 + 3 + text("assistant") + text("get_weather")
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "22C and sunny"}
    assert chat([tool]) == 3 + 3 + text("tool") + text("call_1") + text("22C and sunny")


def test_chat_rejects_malformed_messages():
    """A body whose messages are not a list of objects is a client error naming the parameter."""
    with pytest.raises(ClientError) as error:
        count_prompt_tokens("chat", {"messages": "hi"}, DEFAULT_ENCODING)
    assert error.value.param == "messages"
    with pytest.raises(ClientError) as error:
        count_prompt_tokens("chat", {"messages": [{"role": "user"}, "hi"]}, DEFAULT_ENCODING)
    assert error.value.param == "messages[1]"


@pytest.mark.parametrize(("endpoint", "param"), [("completions", "prompt"), ("embeddings", "input")])
def test_completions_and_embeddings_inputs_of_every_shape(endpoint, param):
    """A string, strings, a token array and token arrays all count; a wrong shape is a client error."""
    def count(value):
        return count_prompt_tokens(endpoint, {param: value}, DEFAULT_ENCODING)

    assert count("hello world") == 2
    assert count(["hello world", "tiktoken is great!"]) == 8
    assert count([1, 2, 3]) == 3
    assert count([[1, 2, 3], [4, 5]]) == 5
    assert count(["hello world", [4, 5]]) == 4
    assert count([]) == 0
    assert count_prompt_tokens(endpoint, {}, DEFAULT_ENCODING) == 0
    for bad in (42, [{"text": "x"}], [[1, "2"]], {"a": 1}):
        with pytest.raises(ClientError) as error:
            count(bad)
        assert error.value.param == param


@pytest.mark.parametrize(("endpoint", "param"), [("completions", "prompt"), ("embeddings", "input")])
def test_a_batch_counts_all_its_prompts_and_its_longest_apart(endpoint, param):
    """Several prompts (inputs) are priced together but read one by one: the count gives both, all the tokens and
    the longest prompt's; one prompt, or token ids, is both."""
    def count(value):
        return count_prompts(endpoint, {param: value}, DEFAULT_ENCODING)

    assert count(["hello world", "tiktoken is great!", "hi"]) == (9, 6)
    assert count([[1, 2, 3], [4, 5], "hello world"]) == (7, 3)
    assert count("tiktoken is great!") == (6, 6)
    assert count([1, 2, 3, 4]) == (4, 4)
    assert count([]) == (0, 0)


def test_a_chats_longest_prompt_is_the_whole_conversation():
    """A conversation is one prompt: its longest is all of it."""
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]}
    total, longest = count_prompts("chat", body, DEFAULT_ENCODING)
    assert total == longest == count_prompt_tokens("chat", body, DEFAULT_ENCODING)


def test_unknown_endpoint_is_rejected():
    """An endpoint other than chat, completions or embeddings is a programming error."""
    with pytest.raises(ValueError, match="unknown endpoint"):
        count_prompt_tokens("images", {}, DEFAULT_ENCODING)


def test_count_completion_tokens_sums_texts():
    """Estimated output tokens are the sum over generated texts, empty ones counting 0."""
    assert count_completion_tokens(["hello world", "", "tiktoken is great!"], "cl100k_base") == 8
    assert count_completion_tokens([], "cl100k_base") == 0


def test_usage_with_details():
    """Cached prompt tokens and reasoning tokens are read from the details objects."""
    body = {"usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                      "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 12}}}
    assert usage_from_response(body) == Usage(input_tokens=120, output_tokens=30,
                                              cached_input_tokens=100, reasoning_tokens=12)


def test_usage_without_details_or_with_null_values():
    """Missing or null details and an embeddings usage with no completion count read as zeros."""
    assert usage_from_response({"usage": {"prompt_tokens": 5, "completion_tokens": 7}}) == Usage(5, 7)
    nulls = {"usage": {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": None,
                       "completion_tokens_details": {"reasoning_tokens": None}}}
    assert usage_from_response(nulls) == Usage(5, 7)
    assert usage_from_response({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(8, 0)
    responses_api = {"usage": {"input_tokens": 9, "output_tokens": 4,
                               "input_tokens_details": {"cached_tokens": 2}}}
    assert usage_from_response(responses_api) == Usage(9, 4, cached_input_tokens=2)


@pytest.mark.parametrize("body", [
    {}, {"usage": None}, {"usage": "lots"}, {"usage": {}}, {"usage": {"total_tokens": 3}},
    {"usage": {"prompt_tokens": "5", "completion_tokens": 1}},
    {"usage": {"prompt_tokens": -1, "completion_tokens": 1}},
    {"usage": {"prompt_tokens": 5, "completion_tokens": 1.5}},
    [],
])
def test_usage_absent_or_malformed_is_none(body):
    """No usage, or counts that are not non-negative integers, give None instead of a wrong Usage."""
    assert usage_from_response(body) is None


def test_a_malformed_breakdown_keeps_the_reported_totals():
    """A cached or reasoning count that is not a count reads as 0, beside the totals the model reported (the
    whole usage used to be dropped, and the request charged an estimate); whole numbers sent as floats count."""
    body = {"usage": {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "all"},
                      "completion_tokens_details": {"reasoning_tokens": -2}}}
    assert usage_from_response(body) == Usage(5, 3)
    floats = {"usage": {"prompt_tokens": 5.0, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2.0}}}
    assert usage_from_response(floats) == Usage(5, 3, cached_input_tokens=2)


def test_repeated_long_texts_are_counted_once_and_exactly():
    """A system prompt repeated in every request is encoded once; counts of texts of every size stay exact."""
    from gateway import tokens

    prompt = "You are a careful assistant for the finance team. Follow the policy below exactly. " * 25
    enc = get_encoding("o200k_base")
    before = tokens._repeated_text.cache_info()
    for index in range(5):
        body = {"messages": [{"role": "system", "content": prompt},
                             {"role": "user", "content": f"question {index}: what changed in the quarter?"}]}
        assert count_prompt_tokens("chat", body, "o200k_base") == (
            3 + 3 + len(enc.encode_ordinary("system")) + len(enc.encode_ordinary(prompt))
            + 3 + len(enc.encode_ordinary("user")) + len(enc.encode_ordinary(body["messages"][1]["content"])))
    after = tokens._repeated_text.cache_info()
    assert after.hits - before.hits >= 4                     # the prompt, from the second request on
    huge = "word " * 5000                                    # past REPEATED_TEXT_CHARS: encoded, not kept
    assert count_text_tokens(huge, "o200k_base") == len(enc.encode_ordinary(huge))
    assert tokens._text(enc, huge) == len(enc.encode_ordinary(huge))
    assert tokens._repeated_text.cache_info().currsize <= 1024


@pytest.mark.parametrize("usage, counted", [
    # reasoning reported beside the output (Gemini through some proxies): the total less the input
    ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 115,
      "completion_tokens_details": {"reasoning_tokens": 100}}, (10, 105, 0, 100)),
    # Anthropic's input leaves out its cache reads and writes: added back, the reads cached
    ({"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 50},
     (1050, 20, 900, 0)),
    ({"prompt_tokens": 100, "completion_tokens": 2, "prompt_cache_hit_tokens": 60}, (100, 2, 60, 0)),   # DeepSeek
    ({"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 500}},
     (100, 2, 100, 0)),                                             # cached is at most the input
    ({"prompt_tokens": 12, "total_tokens": 12}, (12, 0, 0, 0)),     # embeddings: no output
    ({"completion_tokens": 400}, None),                             # half a usage: the gateway counts instead
    ({"prompt_tokens": 1200}, None),
])
def test_usage_of_every_shape_a_server_or_proxy_reports_is_read_whole(usage, counted):
    """Usage shapes of OpenAI-compatible servers and proxies are read as what they bill; half a usage is no
    usage (it billed the missing half as 0): the gateway's count stands in, marked estimated."""
    read = usage_from_response({"usage": usage})
    got = None if read is None else (read.input_tokens, read.output_tokens, read.cached_input_tokens,
                                     read.reasoning_tokens)
    assert got == counted


def test_a_structured_outputs_schema_is_counted_with_the_prompt():
    """`response_format: json_schema` puts its schema before the model: its JSON is counted (routing's context fit,
    tokens per minute and cost predictions undercounted a 1,300-token schema as nothing)."""
    messages = [{"role": "user", "content": "Fill the form"}]
    schema = {"name": "form", "strict": True, "schema": {"type": "object", "properties": {
        f"field_{i}": {"type": "string", "description": f"the value of field {i}"} for i in range(40)}}}
    bare = count_prompt_tokens("chat", {"messages": messages}, "o200k_base")
    with_schema = count_prompt_tokens("chat", {"messages": messages, "response_format": {
        "type": "json_schema", "json_schema": schema}}, "o200k_base")
    assert with_schema - bare == count_text_tokens(json.dumps(schema, separators=(",", ":")), "o200k_base")
    assert count_prompt_tokens("chat", {"messages": messages, "response_format": {"type": "json_object"}},
                               "o200k_base") == bare


def test_a_custom_tool_call_in_the_history_counts_its_name_and_input():
    """An assistant message calling a custom tool (`type: custom`, free-form `input`) counts as a function call
    with those as its name and arguments (it counted 0: an 1,200-token SQL input went uncounted)."""
    sql = "SELECT " + ", ".join(f"column_{i}" for i in range(300)) + " FROM orders"
    custom = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "run_sql", "input": sql}}]}
    function = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "run_sql", "arguments": sql}}]}
    as_custom = count_prompt_tokens("chat", {"messages": [custom]}, "o200k_base")
    assert as_custom == count_prompt_tokens("chat", {"messages": [function]}, "o200k_base")
    assert as_custom > count_text_tokens(sql, "o200k_base")


def test_a_short_text_is_counted_in_each_encoding_asked_for():
    """A short string counted in one encoding and then in the other gets each encoding's own count: the memoised
    count is keyed by the encoding's name too."""
    text = "Привет, как дела?"                     # 17 characters: the short-text cache
    assert count_prompt_tokens("completions", {"prompt": text}, "o200k_base") == 6
    assert count_prompt_tokens("completions", {"prompt": text}, "cl100k_base") == 8
    assert count_prompt_tokens("completions", {"prompt": text}, "o200k_base") == 6


def test_a_descriptions_final_period_is_not_counted_in_a_tool_definition():
    """The cookbook's rule drops one final period from a function's and a property's description: a definition
    that ends them with "." counts as one that does not."""
    def function(description: str) -> dict:
        return {"name": "get_weather", "description": description, "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": description}}}}

    def body(description: str) -> dict:
        return {"messages": [], "functions": [function(description)]}

    # "The weather" is 2 tokens, "The weather." 3: a kept period would add 1 for the function and 1 for the property
    bare = count_prompt_tokens("chat", body("The weather"), DEFAULT_ENCODING)
    assert count_prompt_tokens("chat", body("The weather."), DEFAULT_ENCODING) == bare


def test_a_refusal_part_in_the_history_counts_its_text():
    """An assistant message whose content is a refusal part counts the refusal's text, as string content does."""
    refusal = "I can't help with that"              # 5 tokens
    message = {"role": "assistant", "content": [{"type": "refusal", "refusal": refusal}]}
    assert chat([message]) == 3 + 3 + 1 + 5          # priming, message, "assistant", the refusal


def test_a_legacy_function_call_in_the_history_counts_its_name_and_arguments():
    """An assistant message with a legacy `function_call` counts the function's name and arguments, not the JSON
    of the call object."""
    call = {"name": "get_weather", "arguments": '{"location": "Paris"}'}       # 2 and 6 tokens
    message = {"role": "assistant", "content": None, "function_call": call}
    assert chat([message]) == 3 + 3 + 1 + 2 + 6      # priming, message, "assistant", name, arguments


@pytest.mark.parametrize("detail", ["high", "auto"])
def test_an_image_at_any_detail_but_low_counts_the_high_estimate(detail):
    """An image part at detail "high" or "auto" counts 765 tokens (85 + 4 tiles x 170), as one without detail."""
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": detail}}
    # priming 3, message 3, "user" 1, "describe this" 2, the image 765
    parts = [{"type": "text", "text": "describe this"}, image]
    assert chat([{"role": "user", "content": parts}]) == 3 + 3 + 1 + 2 + 765


def test_the_largest_believable_token_count_is_read():
    """A count of 2**32 - 1 tokens is taken as reported; one past it is a server's bug and gives no usage."""
    largest = 2 ** 32 - 1
    assert usage_from_response({"usage": {"prompt_tokens": largest, "completion_tokens": 1}}) == Usage(largest, 1)
    assert usage_from_response({"usage": {"prompt_tokens": largest + 1, "completion_tokens": 1}}) is None
