"""Generated request bodies and headers against the running gateway: every one is answered 200 or an OpenAI-shaped
4xx, never a 5xx or a stack trace, and the gateway still serves a normal request afterwards.

The generator is seeded: a failure prints the exact body and headers, and the same run reproduces it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from typing import Any

import aiohttp
import pytest
import requests

from gateway.errors import ClientError
from gateway.simulator.parse import parse_embeddings
from gateway.stages.parse import parse_json_object
from tests.support.harness import DEFAULT_POLICY, Harness
from tests.support.policies import tenants

SEED = 20240611
#: requests per gateway; the whole module stays well under a minute
CASES = 2400
CONCURRENCY = 24

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
RESPONSES_PATH = "/v1/responses"
AZURE_CHAT_PATH = "/openai/deployments/{name}/chat/completions?api-version=2024-06-01"

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city."},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer"}}},
        "required": ["city"], "$defs": {"x": {"type": "string"}}}}}

#: valid requests the mutations start from: (path, body)
SEEDS: list[tuple[str, dict]] = [
    (CHAT_PATH, {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    (CHAT_PATH, {"model": "auto", "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "system", "content": "be brief", "name": "sys"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}),
    (CHAT_PATH, {"model": "gpt-4o-mini", "max_completion_tokens": 4, "seed": 7, "tools": [TOOL],
                 "tool_choice": "auto", "parallel_tool_calls": True, "messages": [
                     {"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]}),
    (CHAT_PATH, {"model": "smart", "max_tokens": 4, "n": 2, "stop": ["\n", "END"], "logit_bias": {"50256": -100},
                 "stream": True, "stream_options": {"include_usage": True}, "top_p": 0.5,
                 "response_format": {"type": "json_schema", "json_schema": {
                     "name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
                 "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
                 "messages": [{"role": "user", "content": "hello", "name": "alice"}],
                 "user": "u-1", "metadata": {"k": "v"}}),
    (COMPLETIONS_PATH, {"model": "auto", "prompt": "Once upon", "max_tokens": 4, "stop": "\n", "n": 1}),
    (COMPLETIONS_PATH, {"model": "auto", "prompt": [[1, 2, 3], "text", [4]], "max_tokens": 3, "stream": True,
                        "logprobs": 2, "echo": False}),
    (EMBEDDINGS_PATH, {"model": "text-embedding-3-small", "input": "hello"}),
    (EMBEDDINGS_PATH, {"model": "text-embedding-3-small", "input": ["a", "b"], "dimensions": 8,
                       "encoding_format": "base64"}),
    (AZURE_CHAT_PATH.format(name="auto"), {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    (RESPONSES_PATH, {"model": "auto", "input": "hi", "instructions": "be brief", "max_output_tokens": 16}),
    (RESPONSES_PATH, {"model": "auto", "max_output_tokens": 16, "stream": True, "store": False,
                      "previous_response_id": "resp_unknown", "temperature": 0,
                      "tools": [{"type": "function", "name": "get_weather",
                                 "parameters": TOOL["function"]["parameters"]}],
                      "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}},
                      "input": [
                          {"role": "user", "content": [
                              {"type": "input_text", "text": "what is this?"},
                              {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                              {"type": "input_file", "file_id": "file-1"}]},
                          {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}]},
                          {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                          {"type": "function_call_output", "call_id": "c1", "output": "cold"},
                          {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                           "content": [{"type": "output_text", "text": "It is cold."}]}]}),
]

#: values a field may be replaced with; the strings NAN, INF, BIG stand for raw JSON the json module cannot write
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, -(2 ** 63), 2 ** 63, 2 ** 64 + 1, 10 ** 30, 1.5, -0.0, 1e308, -1e308, 5e-324,
    "", " ", "x", "auto", "\ud800", "\udfff\ud800", "😀" * 3, "\x00", "\u202e", "a" * 70_000, "<|endoftext|>",
    "{}", "null", [], {}, [None], [[]], [{}], [1, "a", None], {"": None}, {"type": None}, {"type": "text"},
    {"type": "image_url", "image_url": None}, {"type": "image_url", "image_url": "http://x"},
    {"type": "image_url", "image_url": {"url": 5, "detail": ["low"]}}, {"type": ["text"], "text": {"a": 1}},
    [{"type": "text", "text": None}], [{"type": "refusal", "refusal": 3}], ["plain string part"],
    [{"type": "image_url", "image_url": {"detail": {}}}], [{"type": "function", "function": None}],
    [{"type": "function", "function": {"name": None, "parameters": {"properties": {"a": None}}}}],
    [{"type": "function", "function": {"name": 5, "description": [1], "parameters": {
        "properties": {"a": {"enum": "notalist", "type": {}}, "b": {"enum": [None, {}], "type": [None, 1]}}}}}],
    [{"type": "custom", "custom": {"name": "c", "format": {"type": "grammar"}}}], [{"type": 5}],
    [{"id": None, "type": "function", "function": {"name": {}, "arguments": {"a": [1]}}}], [{"function": "f"}],
    {"include_usage": "yes"}, {"include_usage": None}, {"type": "json_object"}, {"type": 1, "json_schema": []},
    {"50256": "x"}, {"not-a-token": 1e308}, "NAN", "INF", "-INF", "BIG",
]


#: numbers at the edges of what JSON parsers, Decimal, float and Redis take
ODD_NUMBERS: list[Any] = [0, -1, 1, 2, 128, 129, 3072, 3073, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
                          -(2 ** 63), 1.0, 0.5, -0.0, 2.5, 1e308, 5e-324, 1e-320, "NAN", "INF", "BIG"]


def nested(depth: int) -> Any:
    value: Any = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value: keys of objects and indexes of arrays, the value itself first."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(paths(child, prefix + (key,)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.extend(paths(child, prefix + (index,)))
    return found


def odd_value(rng: random.Random, current: Any) -> Any:
    roll = rng.random()
    if roll < 0.08:
        return nested(rng.choice([3, 40, 120]))
    if roll < 0.14 and isinstance(current, dict):
        return [current]                        # an array instead of an object
    if roll < 0.18 and isinstance(current, list) and current:
        return current[0]                       # an object (or scalar) instead of an array
    if roll < 0.22 and isinstance(current, (int, float)) and not isinstance(current, bool):
        return str(current)                     # a number as a string
    if roll < 0.5 and isinstance(current, (int, float)) and not isinstance(current, bool):
        return rng.choice(ODD_NUMBERS)
    return copy.deepcopy(rng.choice(ODD_VALUES))


def mutate(rng: random.Random, body: dict) -> dict:
    """One to three changes at random places: a value replaced, a key removed, a key added, a null."""
    body = copy.deepcopy(body)
    for _ in range(rng.choice((1, 1, 2, 3))):
        path = rng.choice(paths(body)[1:] or [()])
        if not path:
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = rng.random()
        if action < 0.12 and isinstance(parent, dict):
            del parent[last]
        elif action < 0.2 and isinstance(parent, dict):
            parent[rng.choice(["extra", "", "\ud800", "role", "name", "content", "tool_calls", "n", "stop",
                               "logit_bias", "stream", "stream_options", "response_format", "seed", "dimensions",
                               "max_tokens", "temperature", "top_p"])] = odd_value(rng, rng.choice((None, 1)))
        elif action < 0.28:
            parent[last] = None
        else:
            parent[last] = odd_value(rng, parent[last])
    return body


def encode(rng: random.Random, body: Any) -> bytes:
    """JSON text of `body`, with raw NaN / Infinity / huge numbers, and now and then a duplicate key,
    trailing garbage, a cut body, or bytes that are not UTF-8."""
    text = json.dumps(body, allow_nan=True)
    text = (text.replace('"NAN"', "NaN").replace('"-INF"', "-Infinity").replace('"INF"', "Infinity")
            .replace('"BIG"', "1" + "0" * 400))
    roll = rng.random()
    if roll < 0.05 and text.startswith("{") and len(text) > 2:
        key = rng.choice(["model", "messages", "stream", "n", "prompt", "input"])
        dup = rng.choice(["null", "1", '"auto"', "[]", "true", "NaN"])
        text = "{" + f'"{key}": {dup}, ' + text[1:] if rng.random() < 0.5 else text[:-1] + f', "{key}": {dup}}}'
    elif roll < 0.07:
        text = text[: rng.randrange(len(text))]
    elif roll < 0.09:
        text += rng.choice([" x", "}", ",", "\x00"])
    elif roll < 0.10:
        return text.encode() + b"\xff\xfe"
    elif roll < 0.11:
        return "\ufeff".encode() + text.encode()
    return text.encode("utf-8", "surrogatepass")


HEADER_VALUES = {
    "x-gateway-min-tier": ["0", "1", "3", "-1", "", " ", "abc", "1.5", "99999999999999999999999", "1e3", "٣",
                           "0x2", "+2", " 2 ", "１"],
    "x-gateway-max-latency-ms": ["1", "5000", "0", "-5", "nan", "inf", "-inf", "1e400", "1e-400", "1_000", "x",
                                 "", "0x10", "5e3", "Infinity", "١٠٠٠"],
    "x-gateway-max-ttft-ms": ["1", "0.0001", "nan", "1e309", "-0", "abc"],
    "x-gateway-max-cost-usd": ["0", "0.01", "-0", "-1", "NaN", "sNaN", "Infinity", "1e999999999", "1e-999999999",
                               "1" * 200, "0.0000000000000000000000000001", "abc", "", "1,5"],
    "x-gateway-max-energy-j": ["1", "1e-320", "nan", "0", "1e308", "x"],
    "x-gateway-task-id": ["t-1", "", " ", "a" * 5000, "é", "\u202e", "null", "{}", "../../etc", "*"],
    "x-gateway-workflow": ["wf", "", "a" * 5000, "é", "*", "a:b:c", "{}"],
    "cache-control": ["no-cache", "no-store", "no-cache, no-store", "max-age=abc", "", ",,,", "=", "NO-CACHE",
                      "no-cache=\"x\"", "private, max-age=-1", "a" * 3000],
    "x-request-id": ["", "abc", "a" * 5000, "../x", "id with spaces", "é", "\u202e", "0" * 32, "-", "{}"],
}


def odd_headers(rng: random.Random) -> dict[str, str]:
    chosen = rng.sample(sorted(HEADER_VALUES), rng.choice((0, 0, 1, 2, 3)))
    return {name: rng.choice(HEADER_VALUES[name]) for name in chosen}


def generate(rng: random.Random, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """`count` (path, body, headers): mostly mutated seeds, some seeds as they are with odd headers,
    some streamed, some whole bodies of the wrong kind."""
    cases = []
    for _ in range(count):
        path, seed = rng.choice(SEEDS)
        body: Any = copy.deepcopy(seed)
        roll = rng.random()
        if roll < 0.12:
            pass
        elif roll < 0.15:
            body = rng.choice([[body], "text", 1, None, [], nested(300)])
        else:
            body = mutate(rng, body)
        if isinstance(body, dict) and "stream" not in body and rng.random() < 0.3:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": rng.choice([True, False, None, 1])}
        if path.startswith("/openai/") and rng.random() < 0.3:
            path = AZURE_CHAT_PATH.format(name=rng.choice(["smart", "nope", "%20", "%F0%9F%98%80", "a" * 300,
                                                           "auto%00"]))
        cases.append((path, encode(rng, body), odd_headers(rng)))
    return cases


def is_openai_error(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and {"message", "type", "code", "param"} <= error.keys() \
        and isinstance(error["message"], str) and isinstance(error["type"], str)


def problem(status: int, text: str, stream: bool) -> str | None:
    """What is wrong with an answer, or None when it is a 200 or an OpenAI-shaped 4xx without a stack trace."""
    if "Traceback" in text or "internal_error" in text:
        return "a stack trace or an internal error in the answer"
    if status == 200:
        if stream and text.lstrip().startswith("data:") and "[DONE]" not in text:
            return "a stream that did not end with [DONE]"
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if status == 503 and is_openai_error(payload) and payload["error"]["code"] == "sla_unmet":
        return None         # an x-gateway-* header asked for more than the route's models offer: documented 503
    if not 400 <= status < 500:
        return f"status {status}"
    return None if is_openai_error(payload) else "a 4xx that is not an OpenAI-shaped JSON error"


async def send_all(base_url: str, cases, auth: dict[str, str]) -> list[str]:
    failures: list[str] = []
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(path: str, data: bytes, headers: dict[str, str]) -> None:
            async with limit:
                sent = {"Content-Type": "application/json", **auth, **headers}
                try:
                    async with session.post(base_url + path, data=data, headers=sent) as reply:
                        text = (await reply.read()).decode("utf-8", "replace")
                        status = reply.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    status, text = -1, f"{type(exc).__name__}: {exc}"
                wrong = problem(status, text, b'"stream": true' in data)
                if wrong:
                    failures.append(f"{wrong}: POST {path} headers={headers!r}\n  body={data[:600]!r}\n"
                                    f"  answer={status} {text[:600]!r}")
        await asyncio.gather(*(one(*case) for case in cases))
    return failures


def normal_request_works(gw: Harness, auth: dict[str, str]) -> None:
    reply = gw.http("POST", f"{gw.base_url}{CHAT_PATH}", {"model": "auto", "max_tokens": 3, "messages": [
        {"role": "user", "content": "still there?"}]}, headers=auth)
    assert reply["choices"][0]["message"]["content"]


def run_cases(gw: Harness, seed: int, count: int, auth: dict[str, str]) -> None:
    cases = generate(random.Random(seed), count)
    started = time.monotonic()
    failures = asyncio.run(send_all(gw.base_url, cases, auth))
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} of {count} answers were wrong (seed {seed}); first ones:\n" + \
        "\n".join(failures[:5])
    normal_request_works(gw, auth)
    assert elapsed < 40, f"{count} requests took {elapsed:.1f}s"


@pytest.fixture(scope="module")
def gw():
    policy = DEFAULT_POLICY.replace("endpoints: [chat, completions]}", "endpoints: [chat, completions, responses]}", 1)
    harness = Harness(policy, sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")}).start()
    yield harness
    harness.stop()


TENANT_KEY = "key-fuzz-tenant"
TENANT_POLICY = DEFAULT_POLICY + tenants({"open": "key-open"}) + \
    '  limited: {{keys_sha256: ["%s"], limits: {{requests_per_minute: 100000, tokens_per_minute: 100000000, ' \
    'concurrent: 64}}, budget: {{usd_per_day: 1000}}}}\n'


@pytest.fixture(scope="module")
def tenant_gw(module_redis_server):
    from gateway.tenancy.identity import sha256_hex

    policy = TENANT_POLICY % sha256_hex(TENANT_KEY)
    harness = Harness(policy, sims={name: dict(ttft_ms=1, tpot_ms=0) for name in ("small", "medium", "large")},
                      environ={"GATEWAY_REDIS_URL": module_redis_server.url}).start()
    yield harness
    harness.stop()


def test_generated_requests_get_200_or_an_openai_shaped_4xx(gw):
    """Thousands of mutated bodies and odd headers on every endpoint: 200 or an OpenAI-shaped 4xx, never a 5xx."""
    run_cases(gw, SEED, CASES, {})


def test_every_seed_request_is_served(gw):
    """The requests the mutations start from are valid: each is answered 200 (so mutating them explores what is
    near a served request, the Responses API's included)."""
    for path, body in SEEDS:
        response = requests.post(f"{gw.base_url}{path}", json=body, timeout=10)
        assert response.status_code == 200, (path, response.text[:300])


def test_generated_requests_with_tenants_limits_and_budgets(tenant_gw):
    """The same generated traffic from a tenant with Redis rate limits and a budget: still never a 5xx."""
    run_cases(tenant_gw, SEED + 1, CASES // 3, {"Authorization": f"Bearer {TENANT_KEY}"})


# inputs the generated traffic found ----------------------------------------------------------------------------
def test_a_max_cost_header_too_large_to_print_is_a_400(gw):
    """`x-gateway-max-cost-usd: 1e999999999` (a Decimal that overflows when printed) is a 400 naming the header."""
    reply = requests.post(f"{gw.base_url}{CHAT_PATH}", json={"model": "auto", "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-gateway-max-cost-usd": "1e999999999",
                                                      "x-gateway-min-tier": "9"}, timeout=20)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "invalid_header"
    assert reply.json()["error"]["param"] == "x-gateway-max-cost-usd"


def test_a_max_cost_header_finer_than_a_pico_dollar_is_read_to_the_pico_dollar():
    """`x-gateway-max-cost-usd: 1e-900000` is read as 0 (to the pico-dollar): an `sla_unmet` message naming the
    ceiling stays one short line, not 900 KB of zeros."""
    from gateway.routing import tighten_from_headers

    assert tighten_from_headers({"x-gateway-max-cost-usd": "1e-900000"}).max_cost_usd == 0
    assert str(tighten_from_headers({"x-gateway-max-cost-usd": "0.0000000000019"}).max_cost_usd) == "1E-12"


def test_the_simulator_refuses_more_embedding_dimensions_than_openai_offers():
    """An embeddings `dimensions` of 2**63 is a 400 from the simulator, not an endless vector on its loop."""
    with pytest.raises(ClientError) as refused:
        parse_embeddings({"input": "hi", "dimensions": 2 ** 63})
    assert refused.value.param == "dimensions"
    assert parse_embeddings({"input": "hi", "dimensions": 3072}).dimensions == 3072


def test_a_body_that_is_not_an_object_is_named_by_its_json_type():
    """A body of `null` is refused as "not null", in JSON's words rather than Python's (`NoneType`)."""
    with pytest.raises(ClientError, match="must be an object, not null$"):
        parse_json_object(b"null")


def test_budget_flushes_wait_only_for_the_ones_before_them(redis_server):
    """While a tenant's first budget flush is held in Redis, its later flushes wait for it and go out in order, and
    every charge lands, each once (a call carries the parts before its own not sent yet); a flush used to skip past
    itself in the shrinking list of those before it, go out of order and, under load, wait on a later flush that
    waited on it (charges stuck until the drain cut them)."""
    from decimal import Decimal

    import redis.asyncio as aioredis

    from gateway.policy.model import Budget, Tenant
    from gateway.tenancy.budgets import CHARGE_FLUSH_S
    from gateway.tenancy.budgets_redis import RedisBudgets
    from tests.support.redis_delay import DelayingRedisProxy

    proxy = DelayingRedisProxy(redis_server.port, 0.0).start()

    async def scenario() -> Decimal:
        client = aioredis.Redis.from_url(proxy.url)
        await client.ping()
        budgets = RedisBudgets(client, "test", timeout_s=5.0)
        await client.script_load(budgets.flush_script.script)   # no NOSCRIPT reply to send the first part again
        tenant = Tenant(name="t", keys_sha256=(), budget=Budget(usd_per_day=Decimal(100)))
        proxy.holding.set()                 # the first flush's reply is held: the others queue behind it
        charges = []
        for cents in range(1, 6):
            charges.append(asyncio.ensure_future(budgets.charge(tenant, Decimal(cents) / 100)))
            await asyncio.sleep(CHARGE_FLUSH_S * 3)
        proxy.holding.clear()
        await asyncio.wait_for(asyncio.gather(*charges), 10)
        spent = (await budgets.read(tenant)).spent_day_usd
        await client.aclose()
        return spent

    try:
        assert asyncio.run(scenario()) == Decimal("0.15")
    finally:
        proxy.stop()
    sent = [nanos for arrival in proxy.arrivals if arrival.name == "EVALSHA" and ":budget:applied:" in arrival.args[2]
            for nanos in day_nanos_flushed(arrival.args)]
    assert sent == [10_000_000 * cents for cents in range(1, 6)], sent


def day_nanos_flushed(args: tuple[str, ...]) -> list[int]:
    """The day nanos of each part a flush script call carries, in its order (see budget_lua.FLUSH)."""
    keys_count = int(args[1])
    keys, argv = args[2:2 + keys_count], args[2 + keys_count:]
    day_nanos, at = [], 2
    for _ in range(int(argv[1])):
        totals, members = int(argv[at + 1]), int(argv[at + 2])
        at += 3
        day_nanos += [int(argv[i + 1]) for i in range(at, at + totals * 3, 3) if ":day:" in keys[int(argv[i]) - 1]]
        at += totals * 3 + members
    return day_nanos
