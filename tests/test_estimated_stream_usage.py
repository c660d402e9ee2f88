"""Estimated output tokens count every text the model generated, not only its `content`: tool calls, legacy
function calls, reasoning, refusals and completions text, each part joined whole before it is counted.

The end-to-end tests run the gateway against `raw`, a scripted model server priced at 1 USD / 2 USD per million
tokens; route `raw-cached` may store its answers in the cache (the requests pin temperature 0), route `raw-plain` may
not. Expected counts are
computed here with tiktoken's encoder for the model's encoding.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
import uuid
from decimal import Decimal

import pytest
from tiktoken import Encoding

from gateway.context import Attempt, RequestContext, Usage
from gateway.policy.model import Model
from gateway.stages.answers import settle_attempt
from gateway.stages.relay import StreamState
from gateway.tokens import get_encoding
from tests.support import accounting
from tests.support.harness import DEFAULT_SIMS, Harness, reset_raw_model
from tests.support.policies import standard_models
from tests.support.raw_upstream import COMPLETION, SSE_HEAD, RawUpstream, chunk, json_answer, sse

ARGUMENT_PIECES = ['{"', 'loc', 'ation', '":"', 'San', ' Franc', 'isco', ',', ' CA', '",', '"unit', '":"',
                   'cel', 'sius', '"}']
ARGUMENTS = "".join(ARGUMENT_PIECES)

ROUTES = ["raw-cached", "raw-plain"]


def tokens(text: str, encoding: str = "o200k_base") -> int:
    return len(get_encoding(encoding).encode_ordinary(text))


# settle_attempt on a stream's record -----------------------------------------------------------------------

MODEL = Model(name="m", endpoint="http://127.0.0.1:1/v1", upstream_model="m", size_b=1)


def delta_chunk(delta: dict, index: int = 0, finish: str | None = None) -> dict:
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def settled(chunks: list[dict], *, endpoint: str = "chat", status: int = 200,
            usage: Usage | None = None, body: dict | None = None) -> Usage:
    """The usage settle_attempt gives an attempt whose stream, absorbed by the relay's StreamState, sent
    `chunks` (in answer to `body`)."""
    state = StreamState(assemble_for=None)
    for each in chunks:
        state.absorb(each)
    ctx = RequestContext(http=None, policy=None, request_id="r", endpoint=endpoint, prompt_tokens=7,
                         bytes_sent=True, body=body or {})
    ctx.stream_record = state
    attempt = Attempt(model=MODEL, started_s=0.0, status=status, usage=usage)
    ctx.attempts.append(attempt)
    asyncio.run(settle_attempt(ctx, attempt))
    return attempt.usage


def test_tool_call_arguments_are_counted_joined_with_the_name():
    """A tool call's name and its arguments, streamed in fragments, count as the two whole texts (fragments
    counted one by one would count more), beside the content, estimated."""
    chunks = [delta_chunk({"role": "assistant", "content": "Let me check."}),
              delta_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "get_weather", "arguments": ""}}]}),
              *(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                for piece in ARGUMENT_PIECES),
              delta_chunk({}, finish="tool_calls")]
    usage = settled(chunks)
    assert sum(map(tokens, ARGUMENT_PIECES)) > tokens(ARGUMENTS)
    assert usage == Usage(input_tokens=7, estimated=True,
                          output_tokens=tokens("Let me check.") + tokens("get_weather") + tokens(ARGUMENTS))


def test_parallel_tool_calls_are_each_joined_apart():
    """Two tool calls whose fragments interleave are joined call by call, and so are two choices' calls."""
    first, second = ['{"a"', ': 1}'], ['{"b"', ': 22}']
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "one", "arguments": first[0]}},
                                          {"index": 1, "function": {"name": "two", "arguments": second[0]}}]}),
              delta_chunk({"tool_calls": [{"index": 1, "function": {"arguments": second[1]}}]}),
              delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": first[1]}}]}),
              delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "three", "arguments": "{}"}}]},
                          index=1)]
    expected = sum(map(tokens, ["one", "".join(first), "two", "".join(second), "three", "{}"]))
    assert settled(chunks).output_tokens == expected
    state = StreamState(assemble_for=None)
    for each in chunks:
        state.absorb(each)
    assert sorted(text for _, _, text in state.parts.items()) == \
        sorted(["one", "".join(first), "two", "".join(second), "three", "{}"])


def tool_call_chunks(*arguments: str, name_every_time: bool = False) -> list[dict]:
    """A streamed tool call get_weather whose argument pieces are `arguments`."""
    return [delta_chunk({"tool_calls": [{"index": 0, "function": {
        **({"name": "get_weather"} if name_every_time or position == 0 else {}), "arguments": piece}}]})
        for position, piece in enumerate(arguments)]


@pytest.mark.parametrize("shape", ["resent-at-the-end", "name-and-arguments-resent", "name-every-time",
                                   "cumulative"])
def test_a_tool_call_a_server_sends_again_is_counted_once(shape):
    """Servers that send the whole arguments again with the last chunk, the name in every delta, or all the
    arguments so far in every chunk (a cumulative mode some providers have) are not billed for the repeats."""
    if shape == "resent-at-the-end":
        chunks = tool_call_chunks(*ARGUMENT_PIECES, ARGUMENTS)
    elif shape == "name-and-arguments-resent":
        chunks = [*tool_call_chunks(*ARGUMENT_PIECES),
                  delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather",
                                                                        "arguments": ARGUMENTS}}]},
                              finish="tool_calls")]
    elif shape == "name-every-time":
        chunks = tool_call_chunks(*ARGUMENT_PIECES, name_every_time=True)
    else:
        chunks = tool_call_chunks(*("".join(ARGUMENT_PIECES[:end]) for end in range(1, len(ARGUMENT_PIECES) + 1)))
    assert settled(chunks).output_tokens == tokens("get_weather") + tokens(ARGUMENTS)


def test_a_name_streamed_in_pieces_and_arguments_that_start_alike_are_still_joined():
    """Only a piece that repeats all that was kept replaces it: a name in two pieces, and argument pieces that
    merely begin like the text so far, are joined as sent."""
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "get_", "arguments": "{"}}]}),
              delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '"a": "{'}}]}),
              delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"}'}}]})]
    assert settled(chunks).output_tokens == tokens("get_weather") + tokens('{"a": "{"}')


def test_arguments_sent_as_a_json_object_are_counted_as_their_json():
    """A server that sends a tool call's arguments as an object (OpenAI sends a string) is billed its JSON."""
    arguments = {"location": "San Francisco, CA", "unit": "celsius"}
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "get_weather",
                                                                    "arguments": arguments}}]})]
    assert settled(chunks).output_tokens == tokens("get_weather") + tokens(json.dumps(arguments,
                                                                                     separators=(",", ":")))


def test_a_long_reasoning_stream_is_held_joined_not_piece_by_piece():
    """Reasoning pieces are joined every JOIN_EVERY, so a long stream holds its text, not an object a piece;
    the count is the same as the whole text's."""
    from gateway.stages.answers import JOIN_EVERY

    pieces = [f" step {n}" for n in range(1000)]
    state = StreamState(assemble_for=None)
    for piece in pieces:
        state.absorb(delta_chunk({"reasoning_content": piece}))
    (kept,) = state.parts._parts.values()
    assert len(kept.pieces) < JOIN_EVERY and len(kept.groups) == len(pieces) // JOIN_EVERY
    assert state.parts.items() == [(0, "reasoning", "".join(pieces))]


def test_reasoning_content_is_counted():
    """Reasoning streamed as `reasoning_content` counts, joined, beside the answer's text, and is the usage's
    reasoning tokens (a part of its output tokens, as upstreams report them)."""
    chunks = [delta_chunk({"reasoning_content": "The user"}), delta_chunk({"reasoning_content": " greets me."}),
              delta_chunk({"content": "Hello!"})]
    usage = settled(chunks)
    assert usage.output_tokens == tokens("The user greets me.") + tokens("Hello!")
    assert usage.reasoning_tokens == tokens("The user greets me.")


def test_reasoning_is_counted():
    """Reasoning streamed as `reasoning` (the name some servers use) counts too."""
    chunks = [delta_chunk({"reasoning": "Think"}), delta_chunk({"reasoning": "ing hard."})]
    usage = settled(chunks)
    assert usage.output_tokens == usage.reasoning_tokens == tokens("Thinking hard.")


def test_reasoning_sent_under_both_names_is_counted_once():
    """A server that sends the same reasoning as both `reasoning_content` and `reasoning` is counted once."""
    pieces = ["Consider", " the", " weather", " in Paris."]
    chunks = [delta_chunk({"reasoning_content": piece, "reasoning": piece}) for piece in pieces]
    assert settled(chunks).output_tokens == tokens("".join(pieces))


def test_a_legacy_function_call_is_counted():
    """A legacy `function_call` delta counts its name and its joined arguments."""
    chunks = [delta_chunk({"function_call": {"name": "get_weather", "arguments": ""}}),
              *(delta_chunk({"function_call": {"arguments": piece}}) for piece in ARGUMENT_PIECES)]
    assert settled(chunks).output_tokens == tokens("get_weather") + tokens(ARGUMENTS)


def test_a_refusal_is_counted():
    """A refusal streamed in pieces counts as its whole text."""
    chunks = [delta_chunk({"refusal": "I can't"}), delta_chunk({"refusal": " help with that."})]
    assert settled(chunks).output_tokens == tokens("I can't help with that.")


def test_completions_text_is_counted():
    """A completions stream's `choices[].text` counts, joined whole."""
    chunks = [{"choices": [{"index": 0, "text": "Once upon"}]}, {"choices": [{"index": 0, "text": " a time"}]}]
    assert settled(chunks, endpoint="completions").output_tokens == tokens("Once upon a time")


def test_text_streamed_a_character_at_a_time_counts_as_its_whole_text():
    """A server that streams one character per chunk is charged the tokens of the text it sent, not one or more
    for each character (64 for 11 tokens, counted chunk by chunk)."""
    text = "The quick brown fox jumps over the lazy dog, then naps until noon."
    chunks = [delta_chunk({"content": character}) for character in text]
    assert settled(chunks).output_tokens == tokens(text) < len(text) // 3


def test_the_choices_of_a_stream_are_each_counted_whole():
    """Two choices streamed side by side are each joined before counting, not mixed into one text."""
    first, second = ["Sun", "ny and", " warm"], ["Rain", "y and", " cold"]
    chunks = [delta_chunk({"content": piece}, index=i) for pair in zip(first, second) for i, piece in enumerate(pair)]
    assert settled(chunks).output_tokens == tokens("".join(first)) + tokens("".join(second))


def test_a_stream_cut_by_the_client_counts_what_it_was_sent():
    """An attempt whose client left (499) after a tool call began is charged the call's pieces it was sent."""
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "search", "arguments": ""}}]}),
              *(delta_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                for piece in ARGUMENT_PIECES[:5])]
    usage = settled(chunks, status=499)
    assert usage.estimated and usage.output_tokens == tokens("search") + tokens("".join(ARGUMENT_PIECES[:5]))


def test_reported_usage_is_untouched():
    """An answer whose usage the model reported keeps it: nothing is estimated."""
    reported = Usage(input_tokens=3, output_tokens=2)
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ARGUMENTS}}]})]
    assert settled(chunks, usage=reported) is reported


def test_a_plain_answer_counts_its_message_whole():
    """A non-streamed answer without usage counts its content, reasoning, refusal, tool and function calls."""
    message = {"role": "assistant", "content": "Checking.", "reasoning_content": "Need weather.",
               "reasoning": "Need weather.", "refusal": "Partly not.",
               "tool_calls": [{"id": "c1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ARGUMENTS}}],
               "function_call": {"name": "legacy", "arguments": "{}"}}
    ctx = RequestContext(http=None, policy=None, request_id="r", prompt_tokens=7)
    ctx.response_body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    attempt = Attempt(model=MODEL, started_s=0.0, status=200)
    ctx.attempts.append(attempt)
    asyncio.run(settle_attempt(ctx, attempt))
    texts = ["Checking.", "Need weather.", "Partly not.", "get_weather", ARGUMENTS, "legacy", "{}"]
    assert attempt.usage == Usage(input_tokens=7, output_tokens=sum(map(tokens, texts)),
                                  reasoning_tokens=tokens("Need weather."), estimated=True)


def settled_whole(body: dict, answer: dict, endpoint: str = "chat") -> Usage:
    """The usage settle_attempt gives a non-streamed attempt that answered `answer` to `body`, without usage."""
    ctx = RequestContext(http=None, policy=None, request_id="r", endpoint=endpoint, prompt_tokens=7, body=body)
    ctx.response_body = answer
    attempt = Attempt(model=MODEL, started_s=0.0, status=200)
    ctx.attempts.append(attempt)
    asyncio.run(settle_attempt(ctx, attempt))
    return attempt.usage


def test_a_streamed_custom_tool_call_is_counted():
    """A custom tool's call (`custom: {name, input}`, its input streamed in pieces) counts its name and its whole
    input, as a function call counts its name and arguments."""
    chunks = [delta_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "custom",
                                           "custom": {"name": "run_sql", "input": ""}}]}),
              *(delta_chunk({"tool_calls": [{"index": 0, "custom": {"input": piece}}]})
                for piece in ["SELECT name", " FROM users", " WHERE id = 7"])]
    assert settled(chunks).output_tokens == tokens("run_sql") + tokens("SELECT name FROM users WHERE id = 7")


def test_a_whole_custom_tool_call_is_counted():
    """A non-streamed answer's custom tool call counts its name and input."""
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1"}}]}
    usage = settled_whole({}, {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
    assert usage.output_tokens == tokens("run_sql") + tokens("SELECT 1")


PROMPT = "The capital of France is"


def test_an_echoed_prompt_is_not_generated_output():
    """A completion asked to `echo` writes the prompt before its answer: only the answer is output."""
    body = {"model": "m", "prompt": PROMPT, "echo": True}
    answer = {"choices": [{"index": 0, "text": PROMPT + " Paris, of course.", "finish_reason": "stop"}]}
    assert settled_whole(body, answer, "completions").output_tokens == tokens(" Paris, of course.")


def test_a_streamed_echo_is_not_generated_output():
    """A streamed completion's echoed prompt (its first chunk) is not output either."""
    chunks = [{"choices": [{"index": 0, "text": PROMPT}]}, {"choices": [{"index": 0, "text": " Paris"}]},
              {"choices": [{"index": 0, "text": "."}]}]
    usage = settled(chunks, endpoint="completions", body={"model": "m", "prompt": PROMPT, "echo": True})
    assert usage.output_tokens == tokens(" Paris.")


def test_a_batch_echo_takes_each_choice_its_own_prompt_off():
    """With a batch of prompts and `n` 2, choice `i * 2 + j` echoes prompt `i`: each has its own prompt taken
    off, not another's."""
    prompts = ["Roses are", "Violets are"]
    answers = [" red.", " crimson.", " blue.", " violet."]
    body = {"model": "m", "prompt": prompts, "n": 2, "echo": True}
    choices = [{"index": k, "text": prompts[k // 2] + text, "finish_reason": "stop"} for k, text in enumerate(answers)]
    assert settled_whole(body, {"choices": choices}, "completions").output_tokens == sum(map(tokens, answers))


def test_an_echoed_prompt_of_token_ids_is_taken_off_by_its_length():
    """A prompt sent as token ids comes back as text: its length in tokens is taken off the count."""
    ids = get_encoding("o200k_base").encode_ordinary(PROMPT)
    body = {"model": "m", "prompt": ids, "echo": True}
    answer = {"choices": [{"index": 0, "text": PROMPT + " Paris.", "finish_reason": "stop"}]}
    assert settled_whole(body, answer, "completions").output_tokens == tokens(PROMPT + " Paris.") - len(ids)


def test_an_echo_of_token_ids_the_server_did_not_write_never_makes_output_negative():
    """A server that ignores `echo` for a prompt of 40 token ids writes only its answer (2 tokens): taking the ids
    off never leaves less than no output, which would price the attempt below zero."""
    body = {"model": "m", "prompt": list(range(100, 140)), "echo": True}
    answer = {"choices": [{"index": 0, "text": " Paris.", "finish_reason": "stop"}]}
    assert 0 <= settled_whole(body, answer, "completions").output_tokens <= 2


def test_without_echo_the_prompt_text_in_an_answer_is_output():
    """An answer that happens to repeat the prompt, not asked to echo it, is all output."""
    answer = {"choices": [{"index": 0, "text": PROMPT + " Paris.", "finish_reason": "stop"}]}
    usage = settled_whole({"model": "m", "prompt": PROMPT}, answer, "completions")
    assert usage.output_tokens == tokens(PROMPT + " Paris.")

# end to end: a scripted model server, the ledger and the cost ----------------------------------------------

TOOL_EVENTS = [
    json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode()
    for delta in [{"role": "assistant", "content": None,
                   "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]},
                  *({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in ARGUMENT_PIECES)]
]
FINISH = chunk(None, finish="tool_calls")


def policy(raw_url: str, ledger: str) -> str:
    head = standard_models(*DEFAULT_SIMS)
    return head + f"""  raw:
    endpoint: {raw_url}
    upstream_model: fake
    size_b: 1
    price: {{{{input_per_mtok: 1.00, output_per_mtok: 2.00}}}}
    timeouts: {{{{connect_s: 1, first_byte_s: 5, total_s: 10}}}}
  raw-cl100k:
    endpoint: {raw_url}
    upstream_model: fake
    size_b: 1
    encoding: cl100k_base
    context_window: 4000000
    timeouts: {{{{connect_s: 1, first_byte_s: 5, total_s: 10}}}}
routes:
  - name: raw-cl100k
    match: {{{{models: ["raw-cl100k"]}}}}
    candidates: [raw-cl100k]
  - name: raw-plain
    match: {{{{models: ["raw-plain"]}}}}
    candidates: [raw]
  - name: raw-cached
    match: {{{{models: ["raw-cached"]}}}}
    candidates: [raw]
    cache: {{{{enabled: true, ttl_s: 60}}}}
ledger: {{{{path: "{ledger}"}}}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ledger = tmp_path_factory.mktemp("ledger") / "requests.jsonl"
    raw = RawUpstream().start()
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    environ.update(OTEL_SDK_DISABLED="true")
    harness = Harness(policy(raw.url, str(ledger)), sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS},
                      environ=environ).start()
    harness.ledger_path = ledger
    try:
        yield harness, raw
    finally:
        harness.stop()
        raw.stop()


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


def unique_messages() -> list[dict]:
    """A prompt no other request sent, so a cached route never answers from the cache."""
    return [{"role": "user", "content": f"Weather in San Francisco? ({uuid.uuid4().hex[:8]})"}]


def raw_cost(input_tokens: int, output_tokens: int) -> Decimal:
    return accounting.api_cost(input_tokens, output_tokens, "1.00", "2.00")


@pytest.mark.parametrize("route", ROUTES)
def test_a_streamed_tool_call_without_usage_is_charged_its_tokens(env, route):
    """A model that streams a tool call's arguments and no usage chunk is charged, in the ledger and the cost,
    output tokens equal to tiktoken's count of the name and arguments the SDK received (it used to be 0), and the
    client, which asked for usage, is sent that count."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(*TOOL_EVENTS, FINISH, b"[DONE]"), 0.0)]
    response = harness.openai().chat.completions.with_raw_response.create(
        model=route, messages=unique_messages(), temperature=0, stream=True, stream_options={"include_usage": True},
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    chunks = list(response.parse())
    calls = [call for c in chunks for choice in c.choices for call in choice.delta.tool_calls or ()]
    name = "".join(call.function.name or "" for call in calls)
    arguments = "".join(call.function.arguments or "" for call in calls)
    assert (name, arguments) == ("get_weather", ARGUMENTS) and all(c.usage is None for c in chunks[:-1])
    request_id = response.headers["x-request-id"]
    record = accounting.ledger_record(harness.ledger_path, request_id)
    output_tokens = tokens(name) + tokens(arguments)
    assert (record["output_tokens"], record["tokens_estimated"]) == (output_tokens, True)
    # the client asked for usage: it gets the count it is billed, as the stream's last chunk
    assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.prompt_tokens) == (output_tokens,
                                                                                   record["input_tokens"])
    assert Decimal(record["cost_usd"]) == raw_cost(record["input_tokens"], output_tokens)


@pytest.mark.parametrize("route", ROUTES)
def test_a_client_leaving_mid_tool_call_is_charged_the_arguments_it_was_sent(env, route):
    """A client that hangs up while a tool call's arguments stream is charged the name and the fragments it was
    sent, counted joined, estimated."""
    harness, raw = env
    sent, rest = TOOL_EVENTS[:8], TOOL_EVENTS[8:]
    raw.script = [(SSE_HEAD + sse(*sent), 0.0), (sse(*rest, FINISH, b"[DONE]"), 0.5)]
    request_id = f"leaves-{route}"
    body = json.dumps({"model": route, "stream": True, "temperature": 0, "messages": unique_messages()}).encode()
    client = socket.create_connection(("127.0.0.1", harness.port))
    client.settimeout(10)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"x-request-id: %s\r\nContent-Length: %d\r\n\r\n" % (request_id.encode(), len(body)) + body)
    received = b""
    while received.count(b"data:") < len(sent):
        received += client.recv(65536)
    client.close()
    until_answered(raw)
    record = accounting.ledger_record(harness.ledger_path, request_id)
    output_tokens = tokens("get_weather") + tokens("".join(ARGUMENT_PIECES[:len(sent) - 1]))
    assert record["status"] == 499 and record["tokens_estimated"] is True
    assert record["output_tokens"] == output_tokens
    assert Decimal(record["cost_usd"]) == raw_cost(record["input_tokens"], output_tokens)


def until_answered(raw: RawUpstream, timeout_s: float = 5.0) -> None:
    """Wait until the model server has written its whole script (to a gateway that hung up)."""
    deadline_s = time.monotonic() + timeout_s
    while raw.in_flight and time.monotonic() < deadline_s:
        time.sleep(0.02)


def test_a_streamed_tool_call_with_usage_keeps_the_models_count(env):
    """A stream that ends with the model's usage chunk is charged that usage, not an estimate."""
    harness, raw = env
    usage = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                        "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9,
                                                 "total_tokens": 49}}).encode()
    raw.script = [(SSE_HEAD + sse(*TOOL_EVENTS, FINISH, usage, b"[DONE]"), 0.0)]
    response = harness.openai().chat.completions.with_raw_response.create(
        model="raw-plain", messages=unique_messages(), stream=True)
    list(response.parse())
    record = accounting.ledger_record(harness.ledger_path, response.headers["x-request-id"])
    assert (record["input_tokens"], record["output_tokens"], record["tokens_estimated"]) == (40, 9, False)
    assert Decimal(record["cost_usd"]) == raw_cost(40, 9)


def test_a_plain_tool_call_answer_without_usage_is_charged_its_tokens(env):
    """A non-streamed tool call answer without usage is charged the tokens of its call's name and arguments."""
    harness, raw = env
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ARGUMENTS}}]}
    raw.script = json_answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
                              "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]})
    response = harness.openai().chat.completions.with_raw_response.create(model="raw-plain",
                                                                         messages=unique_messages())
    assert response.parse().choices[0].message.tool_calls[0].function.arguments == ARGUMENTS
    record = accounting.ledger_record(harness.ledger_path, response.headers["x-request-id"])
    output_tokens = tokens("get_weather") + tokens(ARGUMENTS)
    assert (record["output_tokens"], record["tokens_estimated"]) == (output_tokens, True)
    assert Decimal(record["cost_usd"]) == raw_cost(record["input_tokens"], output_tokens)


@pytest.mark.parametrize("first_stream", [True, False], ids=["stored-from-a-stream", "stored-whole"])
def test_a_cache_hit_streamed_to_a_client_that_asked_for_usage_ends_with_the_counted_usage(env, first_stream):
    """A model that reports no usage, on a cached route: the answer is stored with the gateway's count, so an
    identical request served from the cache as a stream that asks for usage ends with the same usage chunk the
    live stream had (it got none)."""
    harness, raw = env
    messages = unique_messages()
    if first_stream:
        raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Sunny"), chunk(None, finish="stop"), b"[DONE]"),
                       0.0)]
    else:
        raw.script = json_answer({**COMPLETION, "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Sunny"}}], "usage": None})
    sdk = harness.openai()
    options = dict(model="raw-cached", messages=messages, temperature=0)
    live = sdk.chat.completions.with_raw_response.create(
        **options, **(dict(stream=True, stream_options={"include_usage": True}) if first_stream else {}))
    counted = list(live.parse())[-1].usage if first_stream else live.parse().usage
    hit = sdk.chat.completions.with_raw_response.create(**options, stream=True, stream_options={"include_usage": True})
    chunks = list(hit.parse())
    assert hit.headers["x-gateway-cache"] == "hit"
    record = accounting.ledger_record(harness.ledger_path, live.headers["x-request-id"])
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (record["input_tokens"],
                                                                                     record["output_tokens"])
    if counted is not None:
        assert chunks[-1].usage.completion_tokens == counted.completion_tokens


def answered_counting_off_the_loop(harness: Harness, ask, monkeypatch) -> object:
    """Run `ask()` and return its result, having checked that every large text the gateway counted meanwhile
    (tiktoken's `encode_ordinary`, which lets go of the GIL) was counted on a thread other than the event loop's,
    and that there was one. A count on the loop holds every other request for its whole length."""
    counted: list[tuple[int, int]] = []
    encode_ordinary = Encoding.encode_ordinary

    def watched(self, text: str) -> list[int]:
        counted.append((threading.get_ident(), len(text)))
        return encode_ordinary(self, text)

    async def loop_thread() -> int:
        return threading.get_ident()

    loop_ident = asyncio.run_coroutine_threadsafe(loop_thread(), harness.loop).result(5)
    monkeypatch.setattr(Encoding, "encode_ordinary", watched)
    result = ask()
    large = [ident for ident, length in counted if length > 65_536]
    assert large and loop_ident not in large, (loop_ident, counted)
    return result


@pytest.mark.parametrize("shape", ["whole", "streamed", "streamed-with-usage"])
def test_a_large_answer_without_usage_is_counted_off_the_event_loop(env, shape, monkeypatch):
    """A model answering megabytes of text and no usage: the gateway counts it in a thread, so the event loop
    goes on serving (the count runs on another thread; before, it held the loop and every request waited for it),
    and the whole count is billed, as the client that asked for usage is told."""
    harness, raw = env
    text = base64.b64encode(os.urandom(2_400_000)).decode()
    output_tokens = tokens(text)
    if shape == "whole":
        raw.script = json_answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}]})
    else:
        pieces = [text[i:i + 65536] for i in range(0, len(text), 65536)]
        raw.script = [(SSE_HEAD + sse(*(chunk(piece) for piece in pieces), chunk(None, finish="stop"),
                                      b"[DONE]"), 0.0)]
    options = {"stream": True, "stream_options": {"include_usage": True}} if shape == "streamed-with-usage" \
        else {"stream": True} if shape == "streamed" else {}

    def ask():
        response = harness.openai().chat.completions.with_raw_response.create(
            model="raw-plain", messages=unique_messages(), **options)
        parsed = response.parse()
        answer = parsed.choices[0].message.content if shape == "whole" else list(parsed)
        return response.headers["x-request-id"], answer

    request_id, answer = answered_counting_off_the_loop(harness, ask, monkeypatch)
    if shape == "whole":
        assert answer == text
    else:
        assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices) == text
    if shape == "streamed-with-usage":
        assert answer[-1].usage.completion_tokens == output_tokens
    record = accounting.ledger_record(harness.ledger_path, request_id)
    assert (record["output_tokens"], record["tokens_estimated"]) == (output_tokens, True)


def test_a_large_prompt_counted_again_in_the_models_encoding_is_counted_off_the_event_loop(env, monkeypatch):
    """A model of another encoding than the default that reports no usage: its prompt is counted again in its own
    encoding, in a thread when large, so the event loop goes on serving meanwhile, and that count is billed."""
    harness, raw = env
    prompt = base64.b64encode(os.urandom(2_400_000)).decode()
    prompt_tokens = len(get_encoding("cl100k_base").encode_ordinary(prompt))
    raw.script = json_answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Noted."},
                                           "finish_reason": "stop"}]})

    def ask():
        response = harness.openai().chat.completions.with_raw_response.create(
            model="raw-cl100k", messages=[{"role": "user", "content": prompt}])
        return response.headers["x-request-id"], response.parse().choices[0].message.content

    request_id, answer = answered_counting_off_the_loop(harness, ask, monkeypatch)
    record = accounting.ledger_record(harness.ledger_path, request_id)
    assert answer == "Noted." and record["tokens_estimated"] is True
    assert prompt_tokens < record["input_tokens"] < prompt_tokens + 16      # the message's framing tokens


def test_a_large_stream_without_usage_read_whole_then_closed_is_a_success_and_stored(env):
    """A client that closes as soon as it has a long stream without usage (curl, an HTTP/1.0 client) got the
    whole answer: 200 success, stored by a cached route (the next asks are hits), not a 499 because its close
    came while the gateway counted the answer's tokens."""
    harness, raw = env
    text = "word " * 40_000                             # 200,000 characters: counted in a thread
    pieces = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    raw.script = [(SSE_HEAD + sse(*(chunk(piece) for piece in pieces), chunk(None, finish="stop"), b"[DONE]"), 0.0)]
    body = json.dumps({"model": "raw-cached", "stream": True, "temperature": 0, "messages": unique_messages()})
    caches = []
    for attempt in range(2):
        client = socket.create_connection(("127.0.0.1", harness.port))
        client.settimeout(20)
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"x-request-id: closes-at-once-%d\r\nContent-Length: %d\r\n\r\n%s"
                       % (attempt, len(body), body.encode()))
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):
            part = client.recv(1 << 16)
            assert part, received[-300:]
            received += part
        client.close()                                  # at once, as curl does
        assert b"data: [DONE]" in received
        caches.append(received.split(b"x-gateway-cache: ", 1)[1].split(b"\r\n", 1)[0].decode())
        record = accounting.ledger_record(harness.ledger_path, f"closes-at-once-{attempt}")
        assert (record["status"], record["outcome"]) == (200, "cache_hit" if attempt else "success"), record
    assert caches == ["miss", "hit"]
    first = accounting.ledger_record(harness.ledger_path, "closes-at-once-0")
    assert (first["output_tokens"], first["tokens_estimated"], first["cache"]) == (tokens(text), True, "stored")
