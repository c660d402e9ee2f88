"""End to end: the response cache with real model servers' answer shapes, and single-flight past an entry whose
model may not answer.

Most tests run the gateway in front of `raw`, a scripted model server (tests/support/raw_upstream.py), with route
`raw-cached` caching its answers in the embedded in-memory store or a real redis-server; the last one runs the
simulated small and large models. Clients are the official openai SDK.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tests.support.harness import RAW_CACHED_ROUTE, Harness, raw_model_policy, reset_raw_model
from tests.support.policies import standard_models
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, json_answer, sse

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}


def environ(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "GATEWAY_REDIS_URL"}
    return {**base, "OTEL_SDK_DISABLED": "true", **extra}


@pytest.fixture(scope="module", params=["memory", "redis"])
def env(request):
    """A gateway (no tenants: every caller is anonymous) with the cached route, over each store, and its raw model."""
    extra = {}
    if request.param == "redis":
        extra["GATEWAY_REDIS_URL"] = request.getfixturevalue("module_redis_server").url
    raw = RawUpstream().start()
    gw = Harness(raw_model_policy(raw.url, first_byte_s=2, tail=RAW_CACHED_ROUTE),
                 sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")},
                 environ=environ(**extra)).start()
    yield gw, raw
    gw.stop()
    raw.stop()


@pytest.fixture
def gw(env):
    gw, raw = env
    reset_raw_model(gw, raw)
    return gw, raw


def ask(content: str, **changes) -> dict:
    """A cacheable chat request (temperature 0) on the cached route."""
    return {"model": "raw-cached", "messages": [{"role": "user", "content": content}], "temperature": 0, **changes}


def chat(gw: Harness, **request):
    """A non-streamed chat through the SDK: (completion, x-gateway-cache)."""
    raw = gw.openai().chat.completions.with_raw_response.create(**request)
    return raw.parse(), raw.headers["x-gateway-cache"]


def stream(gw: Harness, **request):
    """A streamed chat through the SDK: (chunks, x-gateway-cache)."""
    raw = gw.openai().chat.completions.with_raw_response.create(**request, stream=True)
    return list(raw.parse()), raw.headers["x-gateway-cache"]


def settle() -> None:
    """Let a background cache write land (Redis writes run after the answer)."""
    time.sleep(0.3)


# tool steps are never replayed ------------------------------------------------------------------

def tool_answer(finish_reason: str) -> dict:
    """A non-streamed tool call, as vLLM answers a named or `required` tool_choice: finish_reason `stop`."""
    return {"id": "chatcmpl-tool", "object": "chat.completion", "created": 1700000000, "model": "m",
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}


def test_a_tool_call_that_finishes_with_stop_is_not_replayed(gw):
    """A tool call whose model reports finish_reason `stop` (vLLM with a named or required tool_choice) is a tool
    step like any other: it is not stored, and the identical next request runs at the model again."""
    gw, raw = gw
    raw.script = json_answer(tool_answer("stop"))
    request = ask("Weather in Oslo?", tools=TOOLS, tool_choice="required")
    first, status = chat(gw, **request)
    assert first.choices[0].message.tool_calls[0].function.name == "get_weather"
    settle()
    second, status_again = chat(gw, **request)
    assert (status, status_again) == ("miss", "miss")
    assert len(raw.requests) == 2


def test_a_streamed_tool_call_that_finishes_with_stop_is_not_replayed(gw):
    """The same for a streamed tool call ending in finish_reason `stop`: nothing is stored, the next one calls."""
    gw, raw = gw
    base = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, **TOOL_CALL, "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}]}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    raw.script = [(SSE_HEAD + sse(*(json.dumps(e).encode() for e in events), b"[DONE]"), 0.0)]
    named = {"type": "function", "function": {"name": "get_weather"}}
    request = ask("Weather in Bergen?", tools=TOOLS, tool_choice=named)
    chunks, _ = stream(gw, **request)
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    settle()
    _, status = stream(gw, **request)
    assert status == "miss"
    assert len(raw.requests) == 2


def test_an_answer_with_an_empty_tool_calls_list_is_still_cached(gw):
    """vLLM sends `"tool_calls": []` on every plain answer: such an answer is no tool step, and is cached."""
    gw, raw = gw
    answer = tool_answer("stop")
    answer["choices"][0]["message"] = {"role": "assistant", "content": "Sunny.", "tool_calls": []}
    raw.script = json_answer(answer)
    request = ask("Just say the weather")
    assert chat(gw, **request)[1] == "stored"
    settle()
    again, status = chat(gw, **request)
    assert status == "hit" and again.choices[0].message.content == "Sunny."
    assert len(raw.requests) == 1


# a streamed answer's identity ---------------------------------------------------------------------

def test_a_stream_that_opens_with_an_empty_header_chunk_is_cached_with_its_real_identity(gw):
    """Azure OpenAI opens a stream with a prompt-filter chunk whose id and model are empty and created is 0: the
    answer cached from that stream still carries the real id, model and created of the chunks that follow."""
    gw, raw = gw
    filter_chunk = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    base = {"id": "chatcmpl-azure", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o",
            "system_fingerprint": "fp_az"}
    events = [filter_chunk,
              {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}]
    raw.script = [(SSE_HEAD + sse(*(json.dumps(e).encode() for e in events), b"[DONE]"), 0.0)]
    request = ask("Hello from Azure")
    stream(gw, **request)
    settle()
    completion, status = chat(gw, **request)
    assert status == "hit"
    assert (completion.id, completion.model, completion.created) == ("chatcmpl-azure", "gpt-4o", 1700000000)
    assert completion.system_fingerprint == "fp_az"
    assert completion.choices[0].message.content == "Hello"
    replayed, status = stream(gw, **request)
    assert status == "hit"
    assert {(c.id, c.model) for c in replayed} == {("chatcmpl-azure", "gpt-4o")}
    assert len(raw.requests) == 1


# single-flight when the stored entry may not answer -----------------------------------------------

TIERED = standard_models("small", "large") + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small, large]
    cache: {{enabled: true, ttl_s: 60}}
"""


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_requests_a_stored_entry_may_not_answer_still_share_one_call(store, request):
    """With the small model's answer stored, eight identical requests asking for tier 3 at once miss it, and make
    one call to the large model between them (single-flight), not eight."""
    extra = {"GATEWAY_REDIS_URL": request.getfixturevalue("redis_server").url} if store == "redis" else {}
    gw = Harness(TIERED, {"small": dict(ttft_ms=5, tpot_ms=1), "large": dict(ttft_ms=5, tpot_ms=1)},
                 environ(**extra)).start()
    try:
        question = {**ask("Which tier?"), "model": "auto", "max_tokens": 5}
        assert chat(gw, **question)[1] == "stored"
        settle()
        gw.sim_config("large", ttft_ms=600)

        async def stampede():
            client = gw.async_openai()
            try:
                return await asyncio.gather(*(client.chat.completions.with_raw_response.create(
                    **question, extra_headers={"x-gateway-min-tier": "3"}) for _ in range(8)))
            finally:
                await client.close()

        raws = asyncio.run(stampede())
        assert {raw.parse().model for raw in raws} == {"sim-large"}
        assert gw.sim_stats("large")["total"] == 1
        assert sorted(raw.headers["x-gateway-cache"] for raw in raws) == ["hit"] * 7 + ["stored"]
    finally:
        gw.stop()
