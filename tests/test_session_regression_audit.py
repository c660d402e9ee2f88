"""Regression audit of the day that added the Responses API: what chat completions, completions and embeddings
did before it, and must still do (parse, routing, the stream cache)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.harness import RAW_CACHED_ROUTE, raw_model_gateway, reset_raw_model
from tests.support.raw_upstream import SSE_HEAD, sse

TAIL = RAW_CACHED_ROUTE + """  - name: text
    match: {{models: ["auto"]}}
    candidates: [small, medium, large]
  - name: agents
    match: {{models: ["agents"], endpoints: [responses]}}
    candidates: [small, medium, large]
"""


@pytest.fixture(scope="module")
def env():
    with raw_model_gateway(first_byte_s=2, tail=TAIL) as (gw, raw):
        yield gw, raw


@pytest.fixture
def gw(env):
    gw, raw = env
    reset_raw_model(gw, raw)
    return gw, raw


HELLO = [{"role": "user", "content": "Say hello."}]


def test_a_chat_requests_stray_max_output_tokens_does_not_move_it_to_a_larger_model(gw):
    """`max_output_tokens` is the Responses API's; a chat request carrying it (a client sharing its settings
    between the two APIs) was routed, and served by vLLM, as if it were not there. It must not be taken as the
    chat answer's limit: 20,000 tokens would drop small (8,192 tokens of context) for medium, at ten times the
    price, and ask nothing of the model that answers."""
    gw, _ = gw
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, extra_body={"max_output_tokens": 20_000})
    assert raw.status_code == 200
    assert raw.headers["x-gateway-model"] == "small"


@pytest.mark.parametrize("stray", [{"max_output_tokens": 0}, {"previous_response_id": 7},
                                   {"max_output_tokens": 200_000}])
def test_responses_only_fields_on_a_chat_request_are_not_judged_as_the_responses_apis(gw, stray):
    """The checks parse added for the Responses API's fields (`max_output_tokens` at least 1, and the context it
    needs; `previous_response_id` a string) apply to that API alone: on chat they are a field chat does not have,
    passed on as before (vLLM ignores it), not a 400 the gateway did not give before."""
    gw, _ = gw
    raw = gw.openai().chat.completions.with_raw_response.create(model="auto", messages=HELLO, extra_body=stray)
    assert raw.status_code == 200


def test_an_embeddings_request_is_not_judged_by_the_responses_apis_fields(gw):
    """An embeddings request carrying `max_output_tokens: 0` (a field embeddings do not have) was embedded as
    before the Responses API came; it must not be refused as that API's output limit below 1."""
    gw, _ = gw
    raw = gw.openai().embeddings.with_raw_response.create(model="auto", input="hello",
                                                         extra_body={"max_output_tokens": 0})
    assert raw.status_code == 200


def logprob_chunk(index: int, top: int) -> bytes:
    """One chat chunk of one token, its logprob and `top` alternatives (as OpenAI streams `top_logprobs`)."""
    alternatives = [{"token": f"t{i}", "logprob": -1.0 - i, "bytes": [116, 48 + i % 10]} for i in range(top)]
    return json.dumps({"id": "chatcmpl-lp", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": [{"index": 0, "delta": {"content": f" w{index}"}, "finish_reason": None,
                                    "logprobs": {"content": [{"token": f" w{index}", "logprob": -0.5,
                                                              "bytes": [32, 119], "top_logprobs": alternatives}]}}]
                       }).encode()


def logprob_tokens(chunks) -> list[str]:
    """The tokens of a chat stream's logprobs, in order, however its chunks share them out."""
    return [entry.token for c in chunks if c.choices and c.choices[0].logprobs
            for entry in c.choices[0].logprobs.content or ()]


def test_a_streamed_answer_with_top_logprobs_that_the_cache_can_store_is_still_cached(gw):
    """A cacheable chat stream of 700 tokens with `top_logprobs: 20` adds up to under 1 MB of JSON, a few hundred
    KB stored: it was cached, as its non-streamed twin still is. Counting each logprob entry as 400 characters
    against the assembler's 4 MiB limit gives it up at about 500 tokens ("over 4194304 characters"), so the same
    request asked again goes to the model each time; the hit must replay every token's logprobs."""
    gw, raw = gw
    finish = json.dumps({"id": "chatcmpl-lp", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
    raw.script = [(SSE_HEAD + sse(*(logprob_chunk(i, 20) for i in range(700)), finish, b"[DONE]"), 0)]
    ask = {"model": "raw-cached", "messages": HELLO, "temperature": 0, "logprobs": True, "top_logprobs": 20,
           "stream": True}
    first = gw.openai().chat.completions.with_raw_response.create(**ask)
    tokens = logprob_tokens(first.parse())
    assert len(tokens) == 700
    time.sleep(0.2)
    second = gw.openai().chat.completions.with_raw_response.create(**ask)
    replayed = logprob_tokens(second.parse())
    assert second.headers["x-gateway-cache"] == "hit"
    assert replayed == tokens
