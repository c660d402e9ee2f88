"""The simulated backend's Responses API (`POST /v1/responses`), driven by the official openai SDK over real HTTP."""

from __future__ import annotations

import time

import aiohttp
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.simulator.text import count_chat_tokens, count_text_tokens
from tests import test_simulator
from tests.test_simulator import control, post_raw

#: the events of a streamed answer before its deltas and after them, in OpenAI's order
HEAD = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
#: the simulator tests' fixtures: a simulator with no delays and no failures, and an SDK client for it
sim, client = test_simulator.sim, test_simulator.client
RESPONSE_EVENT = TypeAdapter(ResponseStreamEvent)


async def test_a_response_has_openai_shape_and_counts_its_tokens(client):
    """A response cut by max_output_tokens is `incomplete`, its text holds exactly that many tokens, and its usage
    counts the input as a one-message chat prompt."""
    answer = await client.responses.create(model="m", input="hi", max_output_tokens=20)
    assert answer.id.startswith("resp_") and answer.object == "response" and answer.model == "sim-small"
    assert (answer.status, answer.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    [message] = answer.output
    assert (message.type, message.role, message.id[:4], message.content[0].type) == (
        "message", "assistant", "msg_", "output_text")
    assert answer.output_text and answer.usage.output_tokens == count_text_tokens(answer.output_text) == 20
    assert answer.usage.input_tokens == count_chat_tokens([{"role": "user", "content": "hi"}])
    assert answer.usage.total_tokens == answer.usage.input_tokens + 20
    assert answer.usage.input_tokens_details.cached_tokens == answer.usage.output_tokens_details.reasoning_tokens == 0


async def test_a_response_without_a_limit_is_completed_and_validates(sim):
    """Without max_output_tokens the drawn answer is `completed` and the raw body passes the SDK's `Response` model."""
    status, body = await post_raw(sim, "responses", orjson.dumps({"model": "m", "input": "hello"}))
    assert status == 200
    answer = Response.model_validate(body)
    assert (answer.status, answer.incomplete_details) == ("completed", None)
    assert answer.output[0].status == "completed"
    assert answer.usage.output_tokens == count_text_tokens(answer.output_text) >= 1


async def test_instructions_and_input_items_count_as_prompt(client):
    """Instructions and every countable input item (message text parts, a function call's output) add input tokens;
    images and unknown items are accepted and add nothing."""
    bare = await client.responses.create(model="m", input="hi", max_output_tokens=16)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                          {"type": "input_image", "image_url": "https://example.com/cat.png"}]},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny and warm"}]
    rich = await client.responses.create(model="m", input=items, instructions="Be brief.", max_output_tokens=16,
                                         temperature=0.2, store=False, previous_response_id="resp_earlier")
    expected = count_chat_tokens([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "tool", "content": "sunny and warm"}])
    assert rich.usage.input_tokens == expected > bare.usage.input_tokens


async def test_a_stream_sends_openai_events_in_order(client):
    """A stream sends the head events, one delta per token, the tail events and `response.incomplete` carrying the
    whole response; sequence numbers count from 0 and the deltas join to its text."""
    stream = await client.responses.create(model="m", input="hi", max_output_tokens=16, stream=True)
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types == HEAD + ["response.output_text.delta"] * 16 + TAIL + ["response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    final = events[-1].response
    assert "".join(event.delta for event in deltas) == final.output_text == events[-4].text
    assert {(event.item_id, event.output_index, event.content_index) for event in deltas} == {
        (final.output[0].id, 0, 0)}
    assert all(event.logprobs == [] for event in deltas)
    assert final.usage.output_tokens == 16 and final.usage.input_tokens == count_chat_tokens(
        [{"role": "user", "content": "hi"}])


async def test_a_stream_is_named_events_without_done(sim):
    """On the wire each event is `event: <type>` then its `data:`, which the SDK's event models accept strictly, and
    no `[DONE]` ends the stream."""
    body = orjson.dumps({"model": "m", "input": "hi", "stream": True})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/responses", data=body) as response:
            raw = await response.read()
    blocks = raw.decode().strip().split("\n\n")
    for block in blocks:
        name, data = block.split("\n")
        event = RESPONSE_EVENT.validate_json(data.removeprefix("data: "))
        assert name.removeprefix("event: ") == event.type
    assert blocks[-1].startswith("event: response.completed") and b"[DONE]" not in raw


async def test_the_sdk_stream_helper_gets_the_final_response(sim):
    """`client.responses.stream(...)` reads a completed answer's deltas, and its final response has their text and
    counts their tokens (the helper takes only `response.completed` as the end, so no limit cuts this one)."""
    async with openai.AsyncOpenAI(base_url=sim.url, api_key="sk-test", max_retries=0) as sdk:
        async with sdk.responses.stream(model="m", input="hello") as stream:
            pieces = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert final.status == "completed" and "".join(pieces) == final.output_text
    assert final.usage.output_tokens == len(pieces) == count_text_tokens(final.output_text)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "hi", "max_output_tokens": 15}, "max_output_tokens", "integer_below_min_value"),
    ({"input": "hi", "max_output_tokens": "20"}, "max_output_tokens", "invalid_type"),
    ({"input": 5}, "input", "invalid_request"),
    ({"input": []}, "input", "invalid_request"),
    ({"input": [{"role": "user", "content": 7}]}, "input", "invalid_request"),
    ({"input": "hi", "instructions": ["x"]}, "instructions", "invalid_request"),
    ({"input": "hi", "stream": "yes"}, "stream", "invalid_request"),
])
async def test_bad_requests_are_openai_400s_naming_the_parameter(sim, body, param, code):
    """A max_output_tokens below 16 or not an integer, an input of the wrong type, bad instructions or stream are
    400s in OpenAI's error shape, naming the parameter, counted as bad requests."""
    status, answer = await post_raw(sim, "responses", orjson.dumps({"model": "m"} | body))
    assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, param, code)
    assert (await control(sim, "GET", "stats"))[1]["by_endpoint"] == {"/v1/responses": {"bad_request": 1}}


async def test_the_sdk_raises_bad_request_below_sixteen_output_tokens(client):
    """The SDK sees max_output_tokens 5 as a BadRequestError with OpenAI's code."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="m", input="hi", max_output_tokens=5)
    assert (caught.value.code, caught.value.param) == ("integer_below_min_value", "max_output_tokens")


async def test_an_injected_error_is_a_500_as_on_chat(sim, client):
    """error_rate 1 answers /v1/responses with a 500 in OpenAI's error shape, counted as an error."""
    await control(sim, "POST", "config", {"error_rate": 1})
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="m", input="hi")
    assert (await control(sim, "GET", "stats"))[1]["by_endpoint"] == {"/v1/responses": {"error": 1}}


async def test_a_drop_cuts_the_stream_after_half_the_tokens(sim, client):
    """drop_rate 1 sends the head events and the first half of the deltas, then cuts the connection (no
    `response.completed`), and cuts a whole answer too; both are counted as drops."""
    await control(sim, "POST", "config", {"drop_rate": 1})
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for event in await client.responses.create(model="m", input="hi", max_output_tokens=16, stream=True):
            received.append(event.type)
    assert received == HEAD + ["response.output_text.delta"] * 8
    with pytest.raises(openai.APIConnectionError):
        await client.responses.create(model="m", input="hi", max_output_tokens=16)
    assert (await control(sim, "GET", "stats"))[1]["by_endpoint"] == {"/v1/responses": {"drop": 2}}


async def test_the_first_delta_waits_for_ttft_and_the_rest_for_tpot(sim, client):
    """The first delta comes after ttft_ms and the sixteen deltas span fifteen tpot_ms gaps."""
    await control(sim, "POST", "config", {"ttft_ms": 150, "tpot_ms": 20})
    started = time.perf_counter()
    arrivals = []
    async for event in await client.responses.create(model="m", input="hi", max_output_tokens=16, stream=True):
        if event.type == "response.output_text.delta":
            arrivals.append(time.perf_counter() - started)
    assert 0.145 <= arrivals[0] < 5.0
    assert arrivals[-1] - arrivals[0] >= 15 * 0.020 * 0.8


async def test_requests_are_recorded_and_counted(sim, client):
    """`/sim/requests` records a Responses API request's body and `/sim/stats` counts it by endpoint."""
    await client.responses.create(model="m", input="hi", max_output_tokens=16)
    [last] = (await control(sim, "GET", "requests?last=1"))[1]["requests"]
    assert (last["path"], last["body"]["input"], last["body"]["max_output_tokens"]) == ("/v1/responses", "hi", 16)
    assert (await control(sim, "GET", "stats"))[1]["by_endpoint"] == {"/v1/responses": {"ok": 1}}


async def test_a_context_window_overflow_names_the_input(sim, client):
    """An input plus max_output_tokens over the context window is OpenAI's context_length_exceeded, naming `input`."""
    await control(sim, "POST", "config", {"context_window": 20})
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="m", input="hi", max_output_tokens=16)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "input")


async def test_usage_off_leaves_usage_out(sim, client):
    """With the model set to report no usage, neither a whole nor a streamed response carries any."""
    await control(sim, "POST", "config", {"usage": False})
    whole = await client.responses.create(model="m", input="hi", max_output_tokens=16)
    events = [event async for event in await client.responses.create(model="m", input="hi", stream=True)]
    assert whole.usage is None and events[-1].response.usage is None
