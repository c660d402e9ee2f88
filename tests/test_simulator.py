"""The simulated OpenAI-compatible backend, driven by the official openai SDK over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.errors import is_context_length_error
from gateway.simulator import SimConfig, build_sim_app, start_simulators
from gateway.simulator.cli import build_parser, configs_from_args, main
from gateway.simulator.parse import parse_chat
from gateway.simulator.plan import plan_answer
from gateway.simulator.text import count_chat_tokens
from tests.test_cache_lock_edges import wait_until
from tests.test_cli import ipv6_loopback

REPO_ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "hello world!"}]


@pytest.fixture
async def sim():
    """A simulator with no delays and no failures."""
    [running] = await start_simulators([SimConfig("sim-small", ttft_ms=0, tpot_ms=0)])
    yield running
    await running.stop()


@pytest.fixture
async def client(sim):
    """An async openai client for `sim`, without retries."""
    async with openai.AsyncOpenAI(base_url=sim.url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


async def control(sim, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Call a `/sim/*` control endpoint; (status, JSON)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{sim.control_url}/{path}", json=body) as response:
            return response.status, await response.json()


async def post_raw(sim, path: str, data: bytes) -> tuple[int, dict]:
    """POST raw bytes to a `/v1` endpoint; (status, JSON)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/{path}", data=data,
                                headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.json()


async def test_chat_completion_has_openai_shape_and_counts(client):
    """A non-streamed chat answer has OpenAI's shape, the rule's prompt count and max_tokens words."""
    answer = await client.chat.completions.create(model="anything", messages=HELLO, max_tokens=7)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.model == "sim-small"
    choice = answer.choices[0]
    assert (choice.index, choice.message.role, choice.finish_reason, choice.logprobs) == (0, "assistant", "length", None)
    assert len(choice.message.content.split()) == 7
    assert answer.usage.prompt_tokens == count_chat_tokens(HELLO) == 3 + 3 + 3
    assert (answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 16)


async def test_chat_without_max_tokens_stops_and_is_deterministic(sim, client):
    """Without max_tokens the length is drawn (finish 'stop') and a reset replays the same answer."""
    first = await client.chat.completions.create(model="m", messages=HELLO)
    await control(sim, "POST", "reset")
    again = await client.chat.completions.create(model="m", messages=HELLO)
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == len(first.choices[0].message.content.split()) >= 1
    assert first.choices[0].message.content == again.choices[0].message.content


async def test_sync_client_chat_and_stream(sim):
    """The synchronous SDK gets a completion and parses a stream into the same text."""
    def call() -> tuple[str, str]:
        with openai.OpenAI(base_url=sim.url, api_key="sk-test", max_retries=0) as sdk:
            whole = sdk.chat.completions.create(model="m", messages=HELLO, max_tokens=5)
            stream = sdk.chat.completions.create(model="m", messages=HELLO, max_tokens=5, stream=True)
            pieces = [c.choices[0].delta.content or "" for c in stream]
            return whole.choices[0].message.content, "".join(pieces)
    whole_text, streamed_text = await asyncio.to_thread(call)
    assert whole_text == streamed_text and len(whole_text.split()) == 5


async def test_stream_is_paced_and_shaped(sim, client):
    """Chunks arrive one per TPOT after TTFT: role chunk first, content deltas, then finish_reason."""
    await control(sim, "POST", "config", {"ttft_ms": 50, "tpot_ms": 40})
    started = time.perf_counter()
    stream = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=6, stream=True)
    arrivals, chunks = [], []
    async for chunk in stream:
        arrivals.append(time.perf_counter() - started)
        chunks.append(chunk)
    assert chunks[0].object == "chat.completion.chunk"
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 7 + ["length"]
    assert arrivals[0] >= 0.045
    assert arrivals[-1] - arrivals[1] >= 5 * 0.040 * 0.8     # five TPOT gaps between 6 tokens
    assert all(c.usage is None for c in chunks)


async def test_include_usage_chunk_only_when_asked(client):
    """The usage chunk (no choices) comes last only when stream_options.include_usage is true."""
    plain = [c async for c in await client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=3, stream=True)]
    counted = [c async for c in await client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=3, stream=True, stream_options={"include_usage": True})]
    assert all(c.choices for c in plain)
    assert counted[-1].choices == [] and all(c.choices for c in counted[:-1])
    assert (counted[-1].usage.prompt_tokens, counted[-1].usage.completion_tokens) == (9, 3)


async def test_text_completions_plain_and_streamed(client):
    """`/v1/completions` answers `text_completion` objects, whole and streamed."""
    whole = await client.completions.create(model="m", prompt="Say hi, please", max_tokens=4)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert len(whole.choices[0].text.split()) == 4 and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (4, 4)
    chunks = [c async for c in await client.completions.create(
        model="m", prompt="Say hi, please", max_tokens=4, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == 8


async def test_embeddings_are_deterministic_unit_vectors(client):
    """Embeddings honour `dimensions`, are unit length, and depend only on the input (base64 and float)."""
    encoded = await client.embeddings.create(model="m", input=["alpha", "beta"], dimensions=8)
    floats = await client.embeddings.create(model="m", input="alpha", dimensions=8, encoding_format="float")
    assert encoded.object == "list" and [d.index for d in encoded.data] == [0, 1]
    alpha, beta = (d.embedding for d in encoded.data)
    assert len(alpha) == 8 and math.isclose(sum(v * v for v in alpha), 1.0, rel_tol=1e-5)
    assert alpha != beta
    assert floats.data[0].embedding == pytest.approx(alpha, rel=1e-6)
    assert (encoded.usage.prompt_tokens, encoded.usage.total_tokens) == (2, 2)
    default = await client.embeddings.create(model="m", input="alpha")
    assert len(default.data[0].embedding) == 1536


async def test_models_lists_the_configured_model(client):
    """`GET /v1/models` lists exactly the configured model name."""
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sim-small"]


async def test_injected_server_error(sim, client):
    """error_rate 1 answers every request with a 500 in OpenAI's error shape."""
    await control(sim, "POST", "config", {"error_rate": 1})
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert caught.value.status_code == 500 and "message" in caught.value.body


async def test_injected_rate_limit_has_retry_after(sim, client):
    """rate_limit_rate 1 answers 429 with the configured Retry-After."""
    await control(sim, "POST", "config", {"rate_limit_rate": 1.0, "retry_after_s": 3})
    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model="m", input="x")
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "rate_limit_exceeded"


async def test_context_window_exceeded_is_openai_400(sim, client):
    """A prompt plus max_tokens over the context window is a 400 the gateway recognises."""
    await control(sim, "POST", "config", {"context_window": 20})
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="m", messages=HELLO, max_tokens=12)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 20" in caught.value.message
    assert is_context_length_error({"error": caught.value.body})
    fits = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=11)
    assert fits.usage.total_tokens == 20


async def test_drop_cuts_stream_and_body(sim, client):
    """drop_rate 1 sends part of a stream (no [DONE]: the role chunk and the first half of its tokens) or body,
    then the SDK raises a connection error."""
    await control(sim, "POST", "config", {"drop_rate": 1})
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in await client.chat.completions.create(
                model="m", messages=HELLO, max_tokens=6, stream=True):
            received.append(chunk)
    assert len(received) == 1 + 6 // 2 and all(c.choices[0].finish_reason is None for c in received)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=HELLO, max_tokens=6)
    _, stats = await control(sim, "GET", "stats")
    assert stats["by_endpoint"]["/v1/chat/completions"]["drop"] == 2


async def test_hang_until_client_times_out(sim, client):
    """hang_rate 1 never answers: the client times out and the request leaves in-flight afterwards."""
    await control(sim, "POST", "config", {"hang_rate": 1})
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=HELLO, timeout=0.3)
    for _ in range(50):
        _, stats = await control(sim, "GET", "stats")
        if stats["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert stats["in_flight"] == 0 and stats["by_outcome"] == {"hang": 1}


async def test_stop_releases_hanging_requests():
    """Stopping a simulator with a hanging request returns promptly."""
    [running] = await start_simulators([SimConfig("hangs", hang_rate=1.0)])
    async with openai.AsyncOpenAI(base_url=running.url, api_key="k", max_retries=0) as sdk:
        pending = asyncio.create_task(sdk.chat.completions.create(model="m", messages=HELLO, timeout=10))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        await running.stop()
        assert time.perf_counter() - started < 1.0
        with pytest.raises(openai.APIConnectionError):
            await pending


async def test_config_changes_take_effect_and_reset(sim, client):
    """`POST /sim/config` makes the model slow at once; bad fields are 400; reset restores the start config."""
    status, config = await control(sim, "POST", "config", {"ttft_ms": 150, "mean_output_tokens": 2})
    assert status == 200 and config["ttft_ms"] == 150.0
    started = time.perf_counter()
    await client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)
    assert time.perf_counter() - started >= 0.14
    assert (await control(sim, "POST", "config", {"colour": "red"}))[0] == 400
    assert (await control(sim, "POST", "config", {"error_rate": 0.7, "drop_rate": 0.7}))[0] == 400
    assert (await control(sim, "POST", "config", {"tpot_ms": "fast"}))[0] == 400
    status, config = await control(sim, "POST", "reset")
    assert status == 200 and config["ttft_ms"] == 0.0
    assert (await control(sim, "GET", "stats"))[1]["total"] == 0


async def test_requests_are_recorded_with_headers(sim, client):
    """`GET /sim/requests` shows the last requests' path, lower-cased headers and JSON body."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await client.models.list()
    await client.chat.completions.create(model="m", messages=HELLO, max_tokens=1,
                                         extra_headers={"traceparent": traceparent})
    _, recorded = await control(sim, "GET", "requests?last=1")
    [last] = recorded["requests"]
    assert last["path"] == "/v1/chat/completions" and last["headers"]["traceparent"] == traceparent
    assert last["body"]["messages"] == HELLO and last["body"]["max_tokens"] == 1
    assert len((await control(sim, "GET", "requests"))[1]["requests"]) == 2


async def test_bad_input_gets_openai_400(sim):
    """Malformed JSON, missing messages and bad max_tokens get 400s in OpenAI's error shape."""
    for path, data in [("chat/completions", b"{not json"), ("chat/completions", b'{"model": "m"}'),
                       ("chat/completions", b'{"messages": [{"role": "user"}], "max_tokens": 0}'),
                       ("embeddings", b'{"input": []}'), ("completions", b'{"prompt": 5}')]:
        status, body = await post_raw(sim, path, data)
        assert status == 400, (path, data)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    _, stats = await control(sim, "GET", "stats")
    assert stats["by_outcome"] == {"bad_request": 5}


async def test_stats_count_by_endpoint_and_outcome(sim, client):
    """`GET /sim/stats` counts requests per endpoint and outcome."""
    await client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)
    await client.embeddings.create(model="m", input="x")
    await control(sim, "POST", "config", {"error_rate": 1})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=HELLO)
    _, stats = await control(sim, "GET", "stats")
    assert stats["by_endpoint"] == {"/v1/chat/completions": {"ok": 1, "error": 1}, "/v1/embeddings": {"ok": 1}}
    assert (stats["total"], stats["in_flight"]) == (3, 0)


async def test_zero_delays_are_cheap(client, monkeypatch):
    """With zero delays a hundred concurrent requests, whole and streamed, are answered without the simulator
    waiting at all (no sleep of any length: its time is the machine's, which a loaded one stretches)."""
    from gateway.simulator import delivery

    slept: list[float] = []

    class Watched:
        """The asyncio module as the simulator's delivery sees it, with its sleeps written down."""

        def __getattr__(self, name: str):
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(delay: float, *args):
            slept.append(delay)
            return await asyncio.sleep(delay, *args)

    monkeypatch.setattr(delivery, "asyncio", Watched())
    started = time.perf_counter()
    answers = await asyncio.gather(*(client.chat.completions.create(model="m", messages=HELLO, max_tokens=16)
                                     for _ in range(100)))
    streams = await asyncio.gather(*(client.chat.completions.create(model="m", messages=HELLO, max_tokens=16,
                                                                    stream=True) for _ in range(20)))
    for stream in streams:
        assert [chunk async for chunk in stream]
    assert all(answer.choices[0].message.content for answer in answers)
    assert slept == []
    assert time.perf_counter() - started < 30.0          # a hang guard, not a speed figure


async def test_failure_rates_are_seeded():
    """The same seed injects failures on the same requests."""
    async def outcomes() -> list[int]:
        app = build_sim_app(SimConfig("m", ttft_ms=0, tpot_ms=0, error_rate=0.5, seed=7))
        async with TestClient(TestServer(app)) as http:
            return [(await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status
                    for _ in range(20)]
    first, second = await outcomes(), await outcomes()
    assert first == second and {200, 500} == set(first)


def test_config_rejects_bad_values():
    """SimConfig refuses rates outside 0..1, rates adding past 1, and negative delays."""
    for bad in ({"error_rate": 1.5}, {"hang_rate": 0.6, "drop_rate": 0.6}, {"ttft_ms": -1}, {"name": ""}):
        with pytest.raises(ValueError):
            SimConfig(**{"name": "m"} | bad)


def test_cli_pairs_ports_with_models_and_spreads_settings():
    """`--port/--model` pairs repeat; a setting given once applies to all, given per model applies in order."""
    args = build_parser().parse_args(["--port", "1", "--model", "a", "--port", "2", "--model", "b",
                                      "--ttft-ms", "40", "--ttft-ms", "80", "--error-rate", "0.1"])
    small, large = configs_from_args(args)
    assert (small.name, small.port, small.ttft_ms, small.error_rate) == ("a", 1, 40.0, 0.1)
    assert (large.name, large.port, large.ttft_ms, large.error_rate) == ("b", 2, 80.0, 0.1)


def test_cli_rejects_unpaired_arguments():
    """Unpaired --port/--model, or a setting given a wrong number of times, is a usage error."""
    for argv in (["--port", "1", "--model", "a", "--port", "2"],
                 ["--port", "1", "--model", "a", "--tpot-ms", "1", "--tpot-ms", "2"],
                 ["--port", "1", "--model", "a", "--error-rate", "3"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2


def test_cli_serves_models_until_sigterm():
    """`main` serves each model on its own port, announces the URLs, and exits 0 on SIGTERM."""
    code = "import sys; from gateway.simulator import main; sys.exit(main(sys.argv[1:]))"
    argv = ["--port", "0", "--model", "tiny", "--port", "0", "--model", "huge", "--ttft-ms", "0"]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True,
                          env=env, cwd=REPO_ROOT) as process:
        try:
            lines = [process.stdout.readline().split() for _ in range(2)]
            urls = {words[1]: words[3] for words in lines}
            with openai.OpenAI(base_url=urls["huge"], api_key="k", max_retries=0) as sdk:
                assert sdk.models.list().data[0].id == "huge"
            assert urls["tiny"] != urls["huge"]
        finally:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


async def test_a_one_token_answer_takes_ttft_alone_whatever_the_tpot(sim, client):
    """One output token is sent at TTFT, whole or streamed (role, token, finish and usage chunks alike): no TPOT is
    spent before the first token or after the last (a TPOT of ten minutes would time the client out)."""
    await control(sim, "POST", "config", {"ttft_ms": 0, "tpot_ms": 600_000})
    whole = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=1, timeout=20)
    chunks = [c async for c in await client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=1, stream=True, stream_options={"include_usage": True}, timeout=20)]
    assert whole.usage.completion_tokens == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "length"]
    assert chunks[-1].usage.completion_tokens == 1


async def test_a_whole_answer_waits_for_every_token(sim, client):
    """A non-streamed answer of n tokens comes after TTFT + (n - 1) x TPOT, not after TTFT alone."""
    await control(sim, "POST", "config", {"ttft_ms": 0, "tpot_ms": 50})
    started = time.perf_counter()
    await client.completions.create(model="m", prompt="x", max_tokens=6)
    assert time.perf_counter() - started >= 5 * 0.050 * 0.95


def test_plan_delays_are_the_configured_milliseconds_in_seconds():
    """A plan's TTFT and TPOT are the config's milliseconds as seconds, and its total is TTFT + (n - 1) x TPOT."""
    config = SimConfig("m", ttft_ms=40, tpot_ms=8)
    plan = plan_answer(config, random.Random(0), parse_chat({"messages": HELLO, "max_tokens": 5}))
    assert (plan.ttft_s, plan.tpot_s) == pytest.approx((0.040, 0.008))
    assert plan.total_s == pytest.approx(0.040 + 4 * 0.008)


def test_jitter_scales_delays_both_ways():
    """Jitter J scales each delay by uniform(1 - J, 1 + J): some planned TTFTs come out shorter, some longer, none
    outside the band."""
    config = SimConfig("m", ttft_ms=40, tpot_ms=0, jitter=0.5)
    rng, request = random.Random(3), parse_chat({"messages": HELLO, "max_tokens": 1})
    ttfts = [plan_answer(config, rng, request).ttft_s for _ in range(200)]
    assert 0.020 <= min(ttfts) < 0.030 and 0.050 < max(ttfts) <= 0.060


async def test_drawn_lengths_centre_on_the_mean(sim, client):
    """Without max_tokens the output lengths drawn centre on mean_output_tokens."""
    await control(sim, "POST", "config", {"mean_output_tokens": 40})
    answers = [await client.chat.completions.create(model="m", messages=HELLO) for _ in range(20)]
    lengths = [answer.usage.completion_tokens for answer in answers]
    assert 30 <= sum(lengths) / len(lengths) <= 50


async def test_a_new_seed_replays_the_draws_from_the_start(sim, client):
    """`POST /sim/config` with a seed restarts the RNG: the same drawn lengths come again."""
    async def lengths() -> list[int]:
        return [(await client.chat.completions.create(model="m", messages=HELLO)).usage.completion_tokens
                for _ in range(3)]
    first = await lengths()
    await control(sim, "POST", "config", {"seed": 0})
    assert await lengths() == first


async def test_a_rate_limit_rounds_retry_after_up(sim, client):
    """A Retry-After under a second is said as 1 (never 0, which invites an instant retry), and retry-after-ms
    carries the exact milliseconds."""
    await control(sim, "POST", "config", {"rate_limit_rate": 1.0, "retry_after_s": 0.2})
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="m", messages=HELLO)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "200")


async def test_a_finished_stream_is_counted_ok(sim, client):
    """A stream sent to its `[DONE]` counts as `ok` in `/sim/stats`."""
    async for _ in await client.chat.completions.create(model="m", messages=HELLO, max_tokens=2, stream=True):
        pass

    async def counted() -> bool:
        return (await control(sim, "GET", "stats"))[1]["by_endpoint"] == {"/v1/chat/completions": {"ok": 1}}
    await wait_until(counted, timeout_s=10)


async def test_base64_embeddings_are_little_endian_float32(sim):
    """`encoding_format: base64` answers each vector as base64 of little-endian float32, the float vector's bytes."""
    status, encoded = await post_raw(sim, "embeddings", orjson.dumps(
        {"input": "alpha", "dimensions": 4, "encoding_format": "base64"}))
    _, floats = await post_raw(sim, "embeddings", orjson.dumps({"input": "alpha", "dimensions": 4}))
    assert status == 200 and isinstance(encoded["data"][0]["embedding"], str)
    decoded = struct.unpack("<4f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)


@pytest.mark.parametrize("bad", [{"jitter": 1.5}, {"jitter": -0.1}, {"tpot_ms": -1}, {"retry_after_s": -1},
                                 {"mean_output_tokens": 0}, {"context_window": 0}, {"embedding_dims": 0},
                                 {"port": 65536}])
def test_config_rejects_each_bad_setting(bad):
    """Each setting out of its range (jitter past 0..1, a negative TPOT, a zero length or size) is refused."""
    with pytest.raises(ValueError):
        SimConfig("m", **bad)


def test_cli_options_set_their_own_fields():
    """Every per-model option of `gateway simulate-backend` lands in its own SimConfig field; --usage reads on/off."""
    args = build_parser().parse_args([
        "--port", "0", "--model", "m", "--ttft-ms", "11", "--tpot-ms", "12", "--jitter", "0.13",
        "--mean-output-tokens", "14", "--error-rate", "0.15", "--rate-limit-rate", "0.16", "--retry-after-s", "17",
        "--hang-rate", "0.18", "--drop-rate", "0.19", "--context-window", "20", "--embedding-dims", "21",
        "--seed", "22", "--usage", "off"])
    [config] = configs_from_args(args)
    assert config.as_dict() == {
        "name": "m", "port": 0, "ttft_ms": 11.0, "tpot_ms": 12.0, "jitter": 0.13, "mean_output_tokens": 14,
        "error_rate": 0.15, "rate_limit_rate": 0.16, "retry_after_s": 17.0, "hang_rate": 0.18, "drop_rate": 0.19,
        "context_window": 20, "embedding_dims": 21, "seed": 22, "usage": False}
    [reporting] = configs_from_args(build_parser().parse_args(["--port", "0", "--model", "m", "--usage", "on"]))
    assert reporting.usage is True


def test_cli_on_a_taken_port_exits_1():
    """`gateway simulate-backend` on a port in use says it cannot listen and exits 1, not 0 (in a process of its
    own, as the command runs: its event loop is uvloop's, which the test process must not import)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = subprocess.run([sys.executable, "-m", "gateway", "simulate-backend", "--port",
                               str(busy.getsockname()[1]), "--model", "m"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 1 and "cannot listen" in done.stderr, done.stderr


async def test_a_failed_start_frees_the_models_already_started():
    """When one model's port is taken, the models started before it are stopped, their ports free again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = SimConfig("second", port=busy.getsockname()[1])
        with pytest.raises(OSError):
            await start_simulators([SimConfig("first", port=free_port), taken])
    with socket.socket() as again:
        again.bind(("127.0.0.1", free_port))


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_simulator_on_ipv6_has_a_usable_url():
    """A simulator on ::1 gives its base URL with the address in brackets, and the SDK reaches it there."""
    [running] = await start_simulators([SimConfig("v6", ttft_ms=0, tpot_ms=0)], host="::1")
    try:
        assert running.url == f"http://[::1]:{running.port}/v1"
        async with openai.AsyncOpenAI(base_url=running.url, api_key="k", max_retries=0) as sdk:
            assert (await sdk.models.list()).data[0].id == "v6"
    finally:
        await running.stop()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("chat/completions", {"messages": HELLO, "stream": 1}, "stream"),
    ("embeddings", {"input": "x", "dimensions": 3073}, "dimensions"),
    ("embeddings", {"input": ["x"] * 2049}, "input"),
])
async def test_values_past_openai_limits_are_400s_naming_the_parameter(sim, path, body, param):
    """`logprobs` over 5, a `stream` that is no boolean, more than 3072 dimensions or 2048 embedding inputs are 400s
    naming the parameter, as at OpenAI (the last two would cost the simulator's loop minutes)."""
    status, answer = await post_raw(sim, path, orjson.dumps(body))
    assert (status, answer["error"]["param"]) == (400, param)


async def test_a_wrong_method_is_an_openai_error_counted_as_a_bad_request(sim):
    """`GET /v1/chat/completions` is a 405 in OpenAI's error shape, counted as a bad request."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.url}/chat/completions") as response:
            status, body = response.status, await response.json()
    assert (status, body["error"]["type"]) == (405, "invalid_request_error")
    assert (await control(sim, "GET", "stats"))[1]["by_outcome"] == {"bad_request": 1}


async def test_reset_forgets_recorded_requests(sim, client):
    """`POST /sim/reset` empties `/sim/requests`."""
    await client.models.list()
    await control(sim, "POST", "reset")
    assert (await control(sim, "GET", "requests"))[1]["requests"] == []


async def test_control_endpoints_refuse_what_they_cannot_do(sim):
    """A runtime change of `port` (the socket cannot move), a boolean for a number and `last=abc` are 400s."""
    assert (await control(sim, "POST", "config", {"port": sim.port + 1}))[0] == 400
    assert (await control(sim, "POST", "config", {"ttft_ms": True}))[0] == 400
    assert (await control(sim, "GET", "requests?last=abc"))[0] == 400


async def test_a_stream_is_server_sent_events_ending_in_done(sim):
    """A stream is sent as uncached `text/event-stream` whose last event is `data: [DONE]`, as OpenAI's is."""
    body = orjson.dumps({"messages": HELLO, "max_tokens": 2, "stream": True})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as response:
            raw = await response.read()
            headers = response.headers
    assert headers["Content-Type"] == "text/event-stream" and headers["Cache-Control"] == "no-cache"
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.count(b"[DONE]") == 1


async def test_streamed_echo_writes_each_choice_its_own_prompt(client):
    """A streamed batch with `echo` and `n: 2` writes each choice the same text as the whole answer, prompt first."""
    asked = {"model": "m", "prompt": ["one", "two"], "n": 2, "max_tokens": 2, "echo": True}
    whole = await client.completions.create(**asked)
    texts = ["", "", "", ""]
    async for chunk in await client.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [choice.text for choice in whole.choices] and texts[3].startswith("two")
