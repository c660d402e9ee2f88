"""The simulated backend at its edges, driven by the official openai SDK over real HTTP: several choices (`n`),
embedding batches, long prompts and settings that are not finite numbers."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import openai
import pytest

from gateway.simulator import SimConfig, start_simulators
from gateway.simulator.cli import main
from tests.test_simulator import control

HELLO = [{"role": "user", "content": "hello world!"}]


@pytest.fixture
async def sim():
    """A simulator with no delays, no failures and a small context window."""
    [running] = await start_simulators([SimConfig("sim-small", ttft_ms=0, tpot_ms=0, context_window=100)])
    yield running
    await running.stop()


@pytest.fixture
async def client(sim):
    """An async openai client for `sim`, without retries."""
    async with openai.AsyncOpenAI(base_url=sim.url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


async def test_n_gives_n_choices_and_counts_their_tokens(client):
    """`n: 3` answers with three choices (index 0..2), and usage counts the output tokens of all three."""
    answer = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=4, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    single = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=4)
    assert single.choices[0].message.content == answer.choices[0].message.content
    text = await client.completions.create(model="m", prompt="hi", max_tokens=2, n=2)
    assert [c.index for c in text.choices] == [0, 1] and text.usage.completion_tokens == 4


async def test_streamed_n_sends_every_choice_and_usage_for_all(client):
    """A streamed `n: 2` answer carries both choices' deltas and finish reasons, and the usage chunk counts both."""
    stream = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=3, n=2, stream=True,
                                                  stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, {}, None
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts[0] and texts[1] and finished == {0: "length", 1: "length"}
    assert usage.completion_tokens == 6


async def test_a_completions_batch_gets_n_choices_for_each_prompt_in_prompt_order(client):
    """Two prompts with `n: 2` get four choices (index 0..3), prompt by prompt, streamed or not, as OpenAI answers
    a batch; usage counts them all."""
    answer = await client.completions.create(model="m", prompt=["one", "two"], n=2, max_tokens=3)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3] and answer.usage.completion_tokens == 12
    stream = await client.completions.create(model="m", prompt=["one", "two"], n=2, max_tokens=3, stream=True)
    finished = {c.index for chunk in [chunk async for chunk in stream] for c in chunk.choices if c.finish_reason}
    assert finished == {0, 1, 2, 3}


async def test_echo_logprobs_and_max_tokens_0_score_a_prompt(client):
    """`echo` writes each prompt before its answer; `logprobs` gives each generated token's; `max_tokens: 0` with
    `echo` answers the prompt alone (how evaluation harnesses score one)."""
    answer = await client.completions.create(model="m", prompt="Score me", max_tokens=2, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text.startswith("Score me") and len(choice.text) > len("Score me")
    assert len(choice.logprobs.tokens) == 2 and len(choice.logprobs.token_logprobs) == 2
    scored = await client.completions.create(model="m", prompt=["a b", "c"], max_tokens=0, echo=True)
    assert [c.text for c in scored.choices] == ["a b", "c"] and scored.usage.completion_tokens == 0


async def test_bad_n_is_an_openai_400(client):
    """`n` that is not a whole number from 1 to 128 is a 400 naming the parameter."""
    for bad in (0, 129, 1.5):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=HELLO, n=bad)
        assert caught.value.body["param"] == "n"


async def test_embedding_batches_meet_the_context_window_input_by_input(client):
    """A batch whose inputs each fit is embedded however long the batch; one input too long is a 400 naming
    `input`."""
    batch = await client.embeddings.create(model="m", input=["word " * 60] * 5)
    assert len(batch.data) == 5 and batch.usage.prompt_tokens == 300
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="m", input=["short", "word " * 150])
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "input"


async def test_completions_context_error_names_the_prompt(client):
    """A text completion over the context window is a context_length_exceeded 400 naming `prompt`."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="m", prompt="word " * 150, max_tokens=1)
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "prompt"


async def test_a_prompt_of_megabytes_meets_the_context_window(client):
    """A 2 MiB prompt (under the gateway's 20 MiB body limit) gets OpenAI's context_length_exceeded 400, as at a
    real model server, not a bare 413."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a " * 2**20}])
    assert caught.value.code == "context_length_exceeded"


async def test_a_body_over_the_limit_is_an_openai_413(sim):
    """A body above the simulator's own limit is a 413 in OpenAI's error shape, counted as a bad request."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/chat/completions", data=b"x" * (65 * 2**20),
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 413
            body = await response.json()
        async with session.get(f"{sim.control_url}/stats") as response:
            stats = await response.json()
    assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"
    assert stats["by_outcome"] == {"bad_request": 1}


@pytest.mark.parametrize("setting", ["ttft_ms", "tpot_ms", "retry_after_s"])
def test_settings_must_be_finite(setting):
    """Infinite or NaN delays are refused by SimConfig and are a usage error (exit 2) on the command line."""
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            SimConfig("m", **{setting: value})
    with pytest.raises(SystemExit) as caught:
        main(["--port", "0", "--model", "m", f"--{setting.replace('_', '-')}", "inf"])
    assert caught.value.code == 2


async def test_max_completion_tokens_sets_the_output_length(client):
    """`max_completion_tokens`, which newer SDKs send instead of `max_tokens`, sets the output length."""
    answer = await client.chat.completions.create(model="m", messages=HELLO, max_completion_tokens=3)
    assert (answer.usage.completion_tokens, answer.choices[0].finish_reason) == (3, "length")


async def test_chat_prompt_counts_every_message_and_text_parts(client):
    """A chat prompt counts each message's text plus 3 per message plus 3, text given as parts included."""
    two = [{"role": "system", "content": "be brief"}, *HELLO]
    answer = await client.chat.completions.create(model="m", messages=two, max_tokens=1)
    assert answer.usage.prompt_tokens == (2 + 3) + 3 * 2 + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello world!"}]}]
    answer = await client.chat.completions.create(model="m", messages=parts, max_tokens=1)
    assert answer.usage.prompt_tokens == 3 + 3 + 3


async def test_token_id_prompts_count_one_token_per_id(client):
    """A completions prompt or an embedding input given as token ids counts one token per id, and token ids for
    an embedding are one input, one vector."""
    text = await client.completions.create(model="m", prompt=[11, 12, 13], max_tokens=1)
    assert text.usage.prompt_tokens == 3
    vectors = await client.embeddings.create(model="m", input=[11, 12, 13], dimensions=4)
    assert (len(vectors.data), vectors.usage.prompt_tokens) == (1, 3)


async def test_a_prompt_that_fills_the_window_is_refused(client):
    """A prompt of exactly the context window (100) leaves no room to answer: a context_length_exceeded 400; one
    token less is answered with the one token of room left."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 94}])
    assert caught.value.code == "context_length_exceeded"
    fits = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 93}])
    assert (fits.usage.total_tokens, fits.choices[0].finish_reason) == (100, "length")


async def test_a_drawn_length_is_cut_at_the_context_window(sim, client):
    """Without max_tokens, an output longer than the room left in the window stops there, finish 'length'."""
    await control(sim, "POST", "config", {"mean_output_tokens": 500})
    answer = await client.chat.completions.create(model="m", messages=HELLO)
    assert (answer.usage.total_tokens, answer.choices[0].finish_reason) == (100, "length")


async def test_echo_in_a_batch_writes_each_choice_its_own_prompt(client):
    """With a batch of prompts, `n: 2` and `echo`, choices 0-1 start with the first prompt and 2-3 with the second."""
    answer = await client.completions.create(model="m", prompt=["one", "two"], n=2, max_tokens=1, echo=True)
    assert [c.text[:3] for c in answer.choices] == ["one", "one", "two", "two"]


async def test_logprobs_text_offsets_are_character_positions(client):
    """Each generated token's `text_offset` is where it starts in the text: the previous tokens' characters."""
    answer = await client.completions.create(model="m", prompt="x", max_tokens=5, logprobs=1)
    logprobs = answer.choices[0].logprobs
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(5)]
    assert "".join(logprobs.tokens) == answer.choices[0].text


async def test_a_completions_batch_meets_the_context_window_prompt_by_prompt(client):
    """A batch of prompts that each fit the context window (100) is answered, as OpenAI completes each prompt on
    its own: the window is not measured against the batch's prompts added together."""
    answer = await client.completions.create(model="m", prompt=["word " * 30] * 5, max_tokens=5)
    assert len(answer.choices) == 5 and answer.usage.prompt_tokens == 150


async def test_echo_logprobs_text_offsets_point_into_the_echoed_text(client):
    """With `echo`, each generated token's `text_offset` is where it starts in the choice's text, after the prompt."""
    answer = await client.completions.create(model="m", prompt="Score me", max_tokens=3, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert [choice.text[offset:offset + len(token)]
            for token, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset, strict=True)] \
        == choice.logprobs.tokens


async def test_a_header_that_is_not_utf8_is_recorded_with_a_replacement_character(sim):
    """GET /sim/requests showed a request whose header bytes were not UTF-8 as a 500 (JSON cannot carry the
    surrogates aiohttp keeps them as): the header is kept with U+FFFD in their place."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Odd: caf\xe9\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.control_url}/requests?last=1") as resp:
            assert resp.status == 200
            [recorded] = (await resp.json())["requests"]
    assert recorded["headers"]["x-odd"] == "caf\ufffd"
