"""Fuzzing what model servers send: a seeded stream of odd answers from a scripted model server, each asked for
streamed and not, with and without usage, cacheable and not; whatever comes back, the client gets a 200 (a JSON
object, or an SSE stream ending in [DONE] or an in-band error event) or an OpenAI-shaped error, never a stack
trace, within the model's timeouts; the ledger records the request, and the gateway serves the next one.

The odd model, `raw` (first_byte_s 1, total_s 10), is a RawUpstream: route `raw` falls back to `medium`,
`raw-only` has none, `raw-cached` caches (its requests pin temperature 0) and falls back to `medium`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gzip
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
import requests

from tests.support import accounting
from tests.support.harness import DEFAULT_SIMS, Harness, raw_model_policy
from tests.support.raw_upstream import COMPLETION, SSE_HEAD, TEXT_EVENTS, RawUpstream, http_head, json_answer, sse
from tests.test_e2e_telemetry import otel_environ

#: the seed of the generated cases; another one (FUZZ_SEED=...) explores further
SEED = int(os.environ.get("FUZZ_SEED", "20250611"))
#: how many cases are generated (FUZZ_CASES=...); each is asked once or twice (a cacheable one again, answered
#: from the cache when kept)
CASES = int(os.environ.get("FUZZ_CASES", "600"))
#: the raw model's timeouts (raw_model_policy): no request may take longer than total_s
FIRST_BYTE_S, TOTAL_S = 1.0, 10.0
SERVICE = "gw-upstream-fuzz"

Script = list[tuple[bytes, float]]


# the gateway ----------------------------------------------------------------------------------------------------

class ErrorLog(logging.Handler):
    """The gateway's log records at ERROR and above (an exception the pipeline caught, a recording that
    failed, a task whose exception nobody took): each one is a failure the client may not have seen."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in taken]


@pytest.fixture(scope="module")
def env(tmp_path_factory, receiver):
    ledger = tmp_path_factory.mktemp("ledger") / "requests.jsonl"
    tail = f"""  - name: raw-cached
    match: {{{{models: ["raw-cached"]}}}}
    candidates: [raw]
    fallback: [medium]
    cache: {{{{enabled: true, ttl_s: 60}}}}
ledger: {{{{path: "{ledger}"}}}}
"""
    raw = RawUpstream().start()
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    harness = Harness(raw_model_policy(raw.url, first_byte_s=FIRST_BYTE_S, tail=tail),
                      sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS},
                      environ=otel_environ(receiver.http_endpoint, "http/protobuf", SERVICE)).start()
    harness.ledger_path = ledger
    try:
        yield harness, raw, errors
    finally:
        harness.stop()
        raw.stop()
        logging.getLogger().removeHandler(errors)


@pytest.fixture(autouse=True)
def fresh(env):
    harness, raw, errors = env
    raw.script = []
    harness.services.fleet.breakers._circuits.clear()
    errors.take()


# what a client gets ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Ask:
    model: str = "raw-only"
    stream: bool = True
    include_usage: bool | None = None
    cacheable: bool = False

    def body(self, prompt: str) -> dict:
        body: dict = {"model": self.model, "stream": self.stream, "messages": [{"role": "user", "content": prompt}]}
        if self.stream and self.include_usage is not None:
            body["stream_options"] = {"include_usage": self.include_usage}
        if self.cacheable:
            body["temperature"] = 0
        return body


def ask(harness: Harness, asked: Ask, request_id: str, prompt: str = "hi") -> tuple[requests.Response, float]:
    started_s = time.monotonic()
    reply = requests.post(f"{harness.base_url}/v1/chat/completions", json=asked.body(prompt), timeout=TOTAL_S + 5,
                          headers={"x-request-id": request_id})
    return reply, time.monotonic() - started_s


def sse_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order (an event of several data lines joined, as SSE says)."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(b"\n".join(data))
    return events


def check_reply(reply: requests.Response, elapsed_s: float, *, upstream_4xx: bool, what: str,
                usage_asked: bool = True) -> None:
    """The reply is a 200 (a JSON object, or an SSE stream of JSON objects ending in [DONE] or an in-band error)
    or an OpenAI-shaped error (4xx only when the model itself answered 4xx), sent within the model's timeouts."""
    body = reply.content
    assert b"Traceback" not in body, what
    assert elapsed_s < TOTAL_S + 1, what
    if reply.status_code == 200:
        if reply.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = sse_events(body)
            assert events, what
            for data in events[:-1]:
                chunk = json.loads(data)
                assert isinstance(chunk, dict) and not chunk.get("error"), (what, data)
                assert usage_asked or "usage" not in chunk, (what, data)
            last = events[-1]
            if last != b"[DONE]":
                error = json.loads(last).get("error")
                assert isinstance(error, dict), (what, body[-300:])
                assert isinstance(error["message"], str) and error["type"], (what, last)
                assert error["code"] != "internal_error", (what, last)
            assert events.count(b"[DONE]") == (last == b"[DONE]"), what
        else:
            assert isinstance(json.loads(body), dict), what
        return
    assert reply.status_code >= 500 or (upstream_4xx and 400 <= reply.status_code < 500), (what, reply.status_code)
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str), (what, body)
    assert error["code"] != "internal_error", (what, body)


def check_ledger(harness: Harness, asked: dict[str, tuple[str, int]]) -> None:
    """Each request asked (request id: what it was, the status the client got) has its ledger line, with that
    status, an outcome, and token counts and a cost that are sane."""
    wanted = set(asked)
    deadline_s = time.monotonic() + 5
    while True:
        found = {r["request_id"]: r for r in accounting.ledger_lines(harness.ledger_path)
                 if r.get("request_id") in wanted and r.get("type") != "outcome"}
        if len(found) == len(wanted) or time.monotonic() > deadline_s:
            break
        time.sleep(0.01)
    assert not wanted - set(found), [asked[request_id][0] for request_id in wanted - set(found)][:20]
    for request_id, record in found.items():
        what, status = asked[request_id]
        assert record.get("status") == status and isinstance(record.get("outcome"), str), (what, record)
        for key in ("input_tokens", "output_tokens"):
            assert type(record[key]) is int and 0 <= record[key] < 2 ** 32, (what, record)
        assert Decimal(record["cost_usd"]) >= 0, (what, record)


def check_still_serves(harness: Harness, raw: RawUpstream, what: str) -> None:
    """A plain request to the same model right after is answered normally."""
    raw.script = json_answer(COMPLETION)
    harness.services.fleet.breakers._circuits.clear()
    reply, _ = ask(harness, Ask(stream=False), f"after-{uuid.uuid4().hex[:8]}")
    assert reply.status_code == 200, (what, reply.status_code, reply.content[:300])
    assert reply.json()["choices"][0]["message"]["content"] == "Hello there", what


def run_case(env, script: Script, asked: Ask, *, upstream_4xx: bool = False, name: str = "case",
             ledgered: dict[str, tuple[str, int]] | None = None, then_normal: bool = True) -> list:
    """Ask, with the model answering `script`; a cacheable case is asked again (the other way, streamed or
    not), to replay what the cache kept. The ledger lines are checked now, or left in `ledgered` (request id:
    what) for the caller to check at once; `then_normal`: a normal request follows. Returns the replies."""
    harness, raw, errors = env
    raw.script = script
    harness.services.fleet.breakers._circuits.clear()
    prompt = f"hi {uuid.uuid4().hex[:12]}"
    asks = [asked] + ([dataclasses.replace(asked, stream=not asked.stream)] if asked.cacheable else [])
    replies = []
    pending: dict[str, tuple[str, int]] = {} if ledgered is None else ledgered
    for number, this in enumerate(asks):
        what = f"{name} #{number} {this}"
        request_id = f"fuzz-{uuid.uuid4().hex[:12]}"
        reply, elapsed_s = ask(harness, this, request_id, prompt)
        check_reply(reply, elapsed_s, upstream_4xx=upstream_4xx, what=what, usage_asked=bool(this.include_usage))
        pending[request_id] = (what, reply.status_code)
        replies.append(reply)
    harness.call(asyncio.sleep(0))
    assert not errors.take(), name
    if then_normal:
        check_still_serves(harness, raw, name)
    if ledgered is None:
        check_ledger(harness, pending)
    return replies


# answers, mutated -----------------------------------------------------------------------------------------------

HUGE = 2 ** 70
ODD_VALUES: list = [None, True, False, 0, -1, -7, 1.5, -0.5, 1e308, HUGE, -HUGE, "", "x", "12", "-3", "NaN",
                    "\u0000", "\ud7ff\ue000", [], [None], [1, 2], {}, {"a": {"b": [{}]}}, "x" * 5000]


def odd_value(rng: random.Random):
    return copy.deepcopy(rng.choice(ODD_VALUES))


def paths(value, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON value (keys and indexes), the root's included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def replaced(value, path: tuple, new):
    """`value` with the item at `path` replaced by `new` (a deep copy; the root when `path` is empty)."""
    if not path:
        return new
    value = copy.deepcopy(value)
    holder = value
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = new
    return value


def mutated(value, rng: random.Random, times: int = 1):
    """`value` with `times` of its items (any, at any depth) replaced by odd values, wrapped in extra nesting,
    dropped, or given an extra key."""
    for _ in range(times):
        path = rng.choice([p for p in paths(value) if p])
        old = value
        for step in path:
            old = old[step]
        kind = rng.random()
        if kind < 0.6:
            value = replaced(value, path, odd_value(rng))
        elif kind < 0.75:
            value = replaced(value, path, rng.choice([[old], {"value": old}, [[old]]]))
        elif kind < 0.9 and isinstance(old, dict):
            value = replaced(value, path, {**old, rng.choice(["extra", "usage", "error", "choices", "index"]):
                                           odd_value(rng)})
        else:
            value = copy.deepcopy(value)
            parent = value
            for step in path[:-1]:
                parent = parent[step]
            del parent[path[-1]]
    return value


def named_mutations() -> list[tuple[str, dict]]:
    """The answer shapes servers have been seen to get wrong, one by one."""
    c = COMPLETION
    choice, message, usage = c["choices"][0], c["choices"][0]["message"], c["usage"]
    shapes = [
        ("choices-object", {**c, "choices": choice}),
        ("choices-null", {**c, "choices": None}),
        ("choices-string", {**c, "choices": "stop"}),
        ("choices-empty", {**c, "choices": []}),
        ("choice-list", {**c, "choices": [[choice]]}),
        ("message-list", {**c, "choices": [{**choice, "message": [message]}]}),
        ("message-string", {**c, "choices": [{**choice, "message": "Hello"}]}),
        ("message-null", {**c, "choices": [{**choice, "message": None}]}),
        ("content-number", {**c, "choices": [{**choice, "message": {**message, "content": 42}}]}),
        ("content-object", {**c, "choices": [{**choice, "message": {**message, "content": {"text": "x"}}}]}),
        ("content-parts", {**c, "choices": [{**choice, "message": {**message, "content": [{"type": "text",
                                                                                              "text": "Hi"}, 7]}}]}),
        ("role-number", {**c, "choices": [{**choice, "message": {**message, "role": 3}}]}),
        ("tool-calls-object", {**c, "choices": [{**choice, "message": {**message, "tool_calls": {"id": "x"}},
                                                 "finish_reason": "stop"}]}),
        ("tool-calls-strings", {**c, "choices": [{**choice, "message": {**message, "tool_calls": ["x", 1]}}]}),
        ("function-call-string", {**c, "choices": [{**choice, "message": {**message, "function_call": "f"}}]}),
        ("index-string", {**c, "choices": [{**choice, "index": "0"}]}),
        ("index-list", {**c, "choices": [{**choice, "index": [0]}]}),
        ("index-huge", {**c, "choices": [{**choice, "index": HUGE}]}),
        ("logprobs-string", {**c, "choices": [{**choice, "logprobs": "x"}]}),
        ("usage-list", {**c, "usage": [5, 2, 7]}),
        ("usage-string", {**c, "usage": "7"}),
        ("usage-strings", {**c, "usage": {k: str(v) for k, v in usage.items()}}),
        ("usage-negative", {**c, "usage": {**usage, "prompt_tokens": -5, "completion_tokens": -2}}),
        ("usage-huge", {**c, "usage": {**usage, "prompt_tokens": HUGE, "completion_tokens": HUGE}}),
        ("usage-int64", {**c, "usage": {**usage, "prompt_tokens": 2 ** 63 - 1, "completion_tokens": 2 ** 63 - 1}}),
        ("usage-large", {**c, "usage": {**usage, "prompt_tokens": 2 ** 53, "completion_tokens": 10 ** 15}}),
        ("usage-float", {**c, "usage": {**usage, "prompt_tokens": 5.5, "completion_tokens": 2.0}}),
        ("usage-float-huge", {**c, "usage": {**usage, "prompt_tokens": 1e300, "completion_tokens": 1e19}}),
        ("usage-bools", {**c, "usage": {**usage, "prompt_tokens": True, "completion_tokens": False}}),
        ("usage-details-odd", {**c, "usage": {**usage, "prompt_tokens_details": {"cached_tokens": HUGE},
                                              "completion_tokens_details": {"reasoning_tokens": "9"}}}),
        ("usage-details-over", {**c, "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 50},
                                               "completion_tokens_details": {"reasoning_tokens": 30}}}),
        ("usage-details-list", {**c, "usage": {**usage, "prompt_tokens_details": [1]}}),
        ("usage-responses-names", {**c, "usage": {"input_tokens": 3, "output_tokens": "x"}}),
        ("finish-number", {**c, "choices": [{**choice, "finish_reason": 1}]}),
        ("finish-list", {**c, "choices": [{**choice, "finish_reason": ["stop"]}]}),
        ("finish-empty", {**c, "choices": [{**choice, "finish_reason": ""}]}),
        ("finish-odd", {**c, "choices": [{**choice, "finish_reason": "eos_token\u0000\n"}]}),
        ("finish-long", {**c, "choices": [{**choice, "finish_reason": "s" * 20000}]}),
        ("id-list", {**c, "id": ["chatcmpl-1"]}),
        ("model-list", {**c, "model": ["fake"]}),
        ("model-object", {**c, "model": {"name": "fake"}}),
        ("model-long", {**c, "model": "m" * 100000}),
        ("id-number", {**c, "id": 12}),
        ("created-string", {**c, "created": "yesterday"}),
        ("created-huge", {**c, "created": HUGE}),
        ("object-odd", {**c, "object": ["chat.completion"]}),
        ("nested", {"data": c}),
        ("nested-choices", {**c, "choices": {"choices": [choice]}}),
        ("error-and-choices", {**c, "error": {"message": "half"}}),
        ("error-number", {"error": 500}),
        ("error-list", {"error": ["x"]}),
        ("error-message-list", {"error": {"message": ["x"], "type": 1}}),
        ("empty-object", {}),
        ("many-choices", {**c, "choices": [{**choice, "index": i} for i in range(300)]}),
        ("choices-sparse", {**c, "choices": [{**choice, "index": 5}, {**choice, "index": -1}]}),
        ("system-fingerprint-list", {**c, "system_fingerprint": [1], "service_tier": {"x": 1}}),
    ]
    return shapes


# raw bodies and transports --------------------------------------------------------------------------------------

def body_answer(body: bytes, *, status: int = 200, content_type: str | None = "application/json",
                headers: dict[str, tuple[str, int]] | None = None, length: int | None | str = "exact") -> Script:
    head_headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    length = len(body) if length == "exact" else length
    return [(http_head(status, head_headers, length) + body, 0.0)]


def deep(depth: int) -> bytes:
    return b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"


VALID = json.dumps(COMPLETION).encode()
GZIPPED = gzip.compress(VALID)

#: answers broken below JSON: (name, script, whether the model's status is a 4xx)
TRANSPORT_CASES: list[tuple[str, Script, bool]] = [
    ("invalid-json", body_answer(b'{"choices": [}'), False),
    ("not-json", body_answer(b"<html>Bad Gateway</html>"), False),
    ("empty-body", body_answer(b""), False),
    ("json-null", body_answer(b"null"), False),
    ("json-list", body_answer(b"[1, 2]"), False),
    ("json-string", body_answer(b'"hello"'), False),
    ("json-nan", body_answer(VALID.replace(b"5,", b"NaN,", 1)), False),
    ("json-huge-int", body_answer(VALID.replace(b"5,", b"1" + b"0" * 400 + b",", 1)), False),
    ("json-deep", body_answer(deep(5000)), False),
    ("json-trailing", body_answer(VALID + b" {}"), False),
    ("json-bad-utf8", body_answer(VALID.replace(b"Hello", b"\xff\xfe\xc3")), False),
    ("json-lone-surrogate", body_answer(VALID.replace(b"Hello", b"\\ud800")), False),
    ("json-bom", body_answer(b"\xef\xbb\xbf" + VALID), False),
    ("json-duplicate-keys", body_answer(VALID[:-1] + b', "choices": 5}'), False),
    ("truncated", body_answer(VALID[:40], length=len(VALID)), False),
    ("truncated-no-length", body_answer(VALID[:40], length=None), False),
    ("longer-than-length", body_answer(VALID + b"garbage", length=len(VALID)), False),
    ("content-type-html", body_answer(VALID, content_type="text/html"), False),
    ("content-type-sse", body_answer(VALID, content_type="text/event-stream"), False),
    ("content-type-none", body_answer(VALID, content_type=None), False),
    ("content-type-garbage", body_answer(VALID, content_type=";;;\u00e9"), False),
    ("gzip-claimed", body_answer(VALID, headers={"Content-Encoding": "gzip"}), False),
    ("deflate-claimed", body_answer(VALID, headers={"Content-Encoding": "deflate"}), False),
    ("br-claimed", body_answer(VALID, headers={"Content-Encoding": "br"}), False),
    ("zstd-claimed", body_answer(VALID, headers={"Content-Encoding": "zstd"}), False),
    ("unknown-encoding", body_answer(VALID, headers={"Content-Encoding": "x-unknown"}), False),
    ("gzip-sent", body_answer(GZIPPED, headers={"Content-Encoding": "gzip"}), False),
    ("gzip-truncated", body_answer(GZIPPED[:30], headers={"Content-Encoding": "gzip"}), False),
    ("chunked-bad-size", [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                           + b"zz\r\n" + VALID + b"\r\n0\r\n\r\n", 0.0)], False),
    ("chunked-short", [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                        + b"%x\r\n" % (len(VALID) + 50) + VALID, 0.0)], False),
    ("chunked-no-end", [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                         + b"%x\r\n" % len(VALID) + VALID + b"\r\n", 0.0)], False),
    ("chunked-and-length", [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                                       len(VALID)) + VALID, 0.0)], False),
    ("chunked-huge-size", [(http_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                            + b"ffffffffffffffffffff\r\n" + VALID, 0.0)], False),
    ("chunked-sse-broken", [(http_head(200, {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
                             + b"10\r\n" + sse(TEXT_EVENTS[0]) + b"\r\nq\r\n", 0.0)], False),
    ("length-negative", [(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n"
                          + VALID, 0.0)], False),
    ("length-garbage", [(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n"
                         + VALID, 0.0)], False),
    ("no-head", [(VALID, 0.0)], False),
    ("nothing", [(b"", 0.0)], False),
    ("garbage-status-line", [(b"ICY 200 OK\r\n\r\n" + VALID, 0.0)], False),
    ("status-not-a-number", [(b"HTTP/1.1 abc X\r\n\r\n" + VALID, 0.0)], False),
    ("http-0.9", [(b"HTTP/0.9 200 X\r\n\r\n" + VALID, 0.0)], False),
    ("header-bad-bytes", [(b"HTTP/1.1 200 X\r\nX-\x00Bad: \x01\r\nContent-Length: %d\r\n\r\n" % len(VALID)
                           + VALID, 0.0)], False),
    ("header-huge", [(b"HTTP/1.1 200 X\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n" + VALID, 0.0)], False),
    ("head-cut", [(b"HTTP/1.1 200 X\r\nContent-Ty", 0.0)], False),
    ("status-100-then-200", [(b"HTTP/1.1 100 Continue\r\n\r\n" + json_answer(COMPLETION)[0][0], 0.0)], False),
    ("status-103-then-200", [(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + json_answer(COMPLETION)[0][0],
                              0.0)], False),
    ("status-100-alone", [(b"HTTP/1.1 100 Continue\r\n\r\n", 0.0)], False),
    ("status-101", body_answer(VALID, status=101, headers={"Upgrade": "websocket"}), False),
    ("status-199", body_answer(VALID, status=199), False),
    ("status-201", body_answer(VALID, status=201), False),
    ("status-202-empty", body_answer(b"", status=202), False),
    ("status-203", body_answer(VALID, status=203), False),
    ("status-204", body_answer(b"", status=204), False),
    ("status-204-body", body_answer(VALID, status=204), False),
    ("status-205", body_answer(VALID, status=205), False),
    ("status-206", body_answer(VALID[:30], status=206), False),
    ("status-299", body_answer(VALID, status=299), False),
    ("status-300", body_answer(VALID, status=300), False),
    ("status-301-nowhere", body_answer(VALID, status=301), False),
    ("status-302-loop", body_answer(VALID, status=302, headers={"Location": "/v1/chat/completions"}), False),
    ("status-303-elsewhere", body_answer(b"", status=303, headers={"Location": "http://127.0.0.1:9/x"}), False),
    ("status-307-garbage", body_answer(b"", status=307, headers={"Location": "ht!tp://\u00e9::"}), False),
    ("status-308-scheme", body_answer(b"", status=308, headers={"Location": "file:///etc/passwd"}), False),
    ("status-304", body_answer(b"", status=304), False),
    ("status-399", body_answer(VALID, status=399), False),
    ("status-400-html", body_answer(b"<h1>no</h1>", status=400, content_type="text/html"), True),
    ("status-400-list", body_answer(b"[]", status=400), True),
    ("status-400-error-number", body_answer(b'{"error": 3}', status=400), True),
    ("status-400-error-odd", body_answer(b'{"error": {"message": [1], "param": 5, "code": {}}}', status=400), True),
    ("status-400-context", body_answer(b'{"error": {"message": "maximum context length"}}', status=400), True),
    ("status-401", body_answer(b"{}", status=401), True),
    ("status-404-vllm", body_answer(b'{"object": "error", "message": 7}', status=404), True),
    ("status-413", body_answer(b"x" * 3000, status=413), True),
    ("status-418", body_answer(VALID, status=418), True),
    ("status-422", body_answer(b'{"detail": [{"loc": ["body"]}]}', status=422), True),
    ("status-429-retry", body_answer(b"{}", status=429, headers={"Retry-After": "1e400"}), True),
    ("status-429-retry-ms", body_answer(b"{}", status=429, headers={"retry-after-ms": "nan"}), True),
    ("status-429-date", body_answer(b"{}", status=429, headers={"Retry-After": "Mon, 99 Foo 9999 99:99:99"}), True),
    ("status-499", body_answer(b"gone", status=499), True),
    ("status-500-json-error", body_answer(b'{"error": {"message": "boom", "type": "server_error"}}', status=500),
     False),
    ("status-500-empty", body_answer(b"", status=500), False),
    ("status-502-html", body_answer(b"<html>bad gateway</html>", status=502, content_type="text/html"), False),
    ("status-503-sse", body_answer(sse(b'{"error": "overloaded"}'), status=503, content_type="text/event-stream"),
     False),
    ("status-503-retry", body_answer(b"{}", status=503, headers={"Retry-After": "-1"}), False),
    ("status-504-truncated", body_answer(b'{"error": {"mess', status=504, length=200), False),
    ("status-599", body_answer(b"{}", status=599), False),
    ("status-600", body_answer(VALID, status=600), False),
    ("status-999", body_answer(VALID, status=999), False),
    ("status-0", [(b"HTTP/1.1 000 X\r\nContent-Length: 2\r\n\r\n{}", 0.0)], False),
    ("status-2000", [(b"HTTP/1.1 2000 X\r\nContent-Length: 2\r\n\r\n{}", 0.0)], False),
]


# streams, mutated -----------------------------------------------------------------------------------------------

def chunk_of(delta: dict | None = None, finish=None, **fields) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
            "choices": [{"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish}],
            **fields}


USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
#: a valid stream, as chunks: role, text, a finish, the usage chunk
STREAM_CHUNKS = [chunk_of({"role": "assistant", "content": ""}), chunk_of({"content": "Hello"}),
                 chunk_of({"content": " world"}), chunk_of({}, "stop"), USAGE_CHUNK]
TOOL_CHUNKS = [chunk_of({"role": "assistant", "content": None,
                         "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}),
               chunk_of({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
               chunk_of({}, "tool_calls"), USAGE_CHUNK]

NAMED_CHUNKS: list[tuple[str, object]] = [
    ("choices-object", {**chunk_of({"content": "x"}), "choices": {"index": 0, "delta": {"content": "x"}}}),
    ("choices-null-usage", {**USAGE_CHUNK, "choices": None}),
    ("choices-string", {**chunk_of(), "choices": "x"}),
    ("choice-number", {**chunk_of(), "choices": [1, None, "x"]}),
    ("delta-list", {**chunk_of(), "choices": [{"index": 0, "delta": [{"content": "x"}]}]}),
    ("delta-string", {**chunk_of(), "choices": [{"index": 0, "delta": "x"}]}),
    ("delta-null", {**chunk_of(), "choices": [{"index": 0, "delta": None, "finish_reason": None}]}),
    ("content-number", chunk_of({"content": 42})),
    ("content-list", chunk_of({"content": [{"type": "text", "text": "x"}, 1]})),
    ("content-object", chunk_of({"content": {"a": 1}})),
    ("role-list", chunk_of({"role": ["assistant"]})),
    ("refusal-number", chunk_of({"refusal": 1})),
    ("reasoning-list", chunk_of({"reasoning_content": ["x"], "reasoning": {"a": 1}})),
    ("tool-calls-object", chunk_of({"tool_calls": {"index": 0, "function": {"name": "f"}}})),
    ("tool-calls-strings", chunk_of({"tool_calls": ["x", 1, None]})),
    ("tool-call-index-string", chunk_of({"tool_calls": [{"index": "0", "function": {"arguments": "x"}}]})),
    ("tool-call-index-list", chunk_of({"tool_calls": [{"index": [0], "function": {"arguments": "x"}}]})),
    ("tool-call-function-list", chunk_of({"tool_calls": [{"index": 0, "function": ["f"]}]})),
    ("tool-call-arguments-number", chunk_of({"tool_calls": [{"index": 0, "function": {"arguments": 5,
                                                                                      "name": ["f"]}}]})),
    ("tool-call-id-list", chunk_of({"tool_calls": [{"index": 0, "id": ["x"], "type": 5}]})),
    ("function-call-string", chunk_of({"function_call": "f"})),
    ("function-call-arguments-list", chunk_of({"function_call": {"name": "f", "arguments": [1]}})),
    ("finish-number", chunk_of({}, 1)),
    ("finish-list", chunk_of({}, ["stop"])),
    ("finish-object", chunk_of({}, {"reason": "stop"})),
    ("finish-odd", chunk_of({}, "eos\u0000")),
    ("index-string", {**chunk_of({"content": "x"}), "choices": [{"index": "1", "delta": {"content": "x"}}]}),
    ("index-negative", {**chunk_of({"content": "x"}), "choices": [{"index": -1, "delta": {"content": "x"}}]}),
    ("index-huge", {**chunk_of({"content": "x"}), "choices": [{"index": HUGE, "delta": {"content": "x"}}]}),
    ("index-float", {**chunk_of({"content": "x"}), "choices": [{"index": 0.5, "delta": {"content": "x"}}]}),
    ("logprobs-string", {**chunk_of({"content": "x"}), "choices": [{"index": 0, "delta": {"content": "x"},
                                                                    "logprobs": "x"}]}),
    ("logprobs-content-object", {**chunk_of({"content": "x"}), "choices": [
        {"index": 0, "delta": {"content": "x"}, "logprobs": {"content": {"a": 1}}}]}),
    ("usage-list", {**USAGE_CHUNK, "usage": [1, 2]}),
    ("usage-string", {**USAGE_CHUNK, "usage": "7"}),
    ("usage-strings", {**USAGE_CHUNK, "usage": {"prompt_tokens": "5", "completion_tokens": "2"}}),
    ("usage-negative", {**USAGE_CHUNK, "usage": {"prompt_tokens": -5, "completion_tokens": -2}}),
    ("usage-huge", {**USAGE_CHUNK, "usage": {"prompt_tokens": HUGE, "completion_tokens": HUGE}}),
    ("usage-int64", {**USAGE_CHUNK, "usage": {"prompt_tokens": 2 ** 63 - 1, "completion_tokens": 2 ** 63 - 1}}),
    ("usage-large", {**USAGE_CHUNK, "usage": {"prompt_tokens": 2 ** 53, "completion_tokens": 10 ** 15}}),
    ("usage-float", {**USAGE_CHUNK, "usage": {"prompt_tokens": 5.5, "completion_tokens": 1e300}}),
    ("usage-details-odd", {**USAGE_CHUNK, "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                    "prompt_tokens_details": {"cached_tokens": 99},
                                                    "completion_tokens_details": "x"}}),
    ("usage-with-choices", {**chunk_of({"content": "x"}), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
    ("usage-null", {**chunk_of({"content": "x"}), "usage": None}),
    ("id-list", {**chunk_of({"content": "x"}), "id": ["x"], "model": {"m": 1}}),
    ("id-number", {**chunk_of({"content": "x"}), "id": 5, "model": 5, "created": "x"}),
    ("model-long", {**chunk_of({"content": "x"}), "model": "m" * 100000}),
    ("error-object", {"error": {"message": "boom", "type": "server_error"}}),
    ("error-string", {"error": "boom"}),
    ("error-number", {"error": 7}),
    ("error-list", {"error": ["boom"]}),
    ("error-falsy", {**chunk_of({"content": "x"}), "error": None}),
    ("object-error", {"object": "error", "message": "boom"}),
    ("list", [1, 2]),
    ("string", "x"),
    ("null", None),
    ("number", 3),
    ("empty-object", {}),
    ("nested", {"data": chunk_of({"content": "x"})}),
    ("many-choices", {**chunk_of(), "choices": [{"index": i, "delta": {"content": "x"}} for i in range(200)]}),
]

ODD_EVENTS: list[tuple[str, bytes]] = [
    ("invalid-json", b"data: {\"choices\": [}\n\n"),
    ("not-json", b"data: hello\n\n"),
    ("nan", b'data: {"choices": NaN}\n\n'),
    ("deep", b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n\n"),
    ("huge-int", b'data: {"choices": [], "usage": {"prompt_tokens": 1' + b"0" * 400 + b"}}\n\n"),
    ("bad-utf8", b'data: {"choices": [{"index": 0, "delta": {"content": "\xff\xfe"}}]}\n\n'),
    ("lone-surrogate", b'data: {"choices": [{"index": 0, "delta": {"content": "\\udc00"}}]}\n\n'),
    ("comment", b": keep-alive\n\n"),
    ("comment-empty", b":\n\n"),
    ("event-field", b"event: message\n" + sse(json.dumps(chunk_of({"content": "!"})).encode())),
    ("event-error-field", b"event: error\n" + sse(json.dumps(chunk_of({"content": "!"})).encode())),
    ("id-field", b"id: 7\n" + sse(json.dumps(chunk_of({"content": "!"})).encode())),
    ("retry-field", b"retry: 10\n" + sse(json.dumps(chunk_of({"content": "!"})).encode())),
    ("retry-alone", b"retry: 1000\n\n"),
    ("event-alone", b"event: ping\n\n"),
    ("id-alone", b"id: 3\n\n"),
    ("unknown-field", b"foo: bar\n\n"),
    ("field-no-colon", b"data\n\n"),
    ("data-empty", b"data:\n\n"),
    ("data-split-lines", b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "!"}}]}\n\n'),
    ("data-nospace", b"data:" + json.dumps(chunk_of({"content": "!"})).encode() + b"\n\n"),
    ("done-spaced", b"data:   [DONE]  \n\n"),
    ("done-lower", b"data: [done]\n\n"),
    ("done-json", b'data: "[DONE]"\n\n'),
    ("blank-lines", b"\n\n\n\n"),
    ("bom-mid", b"\xef\xbb\xbf" + sse(json.dumps(chunk_of({"content": "!"})).encode())),
    ("nul", b"data: \x00\n\n"),
    ("big-event", sse(json.dumps(chunk_of({"content": "y" * 65536})).encode())),
    ("big-comment", b": " + b"z" * 65536 + b"\n\n"),
]


def encode_events(chunks: list) -> list[bytes]:
    """Each chunk as a `data:` event (JSON), or as it is when already bytes."""
    return [payload if isinstance(payload, bytes) else sse(json.dumps(payload).encode()) for payload in chunks]


def stream_script(events: list[bytes], rng: random.Random, *, head: bytes = SSE_HEAD) -> Script:
    """The events after the head, with their line ends and packets chosen at random."""
    data = b"".join(events)
    eol = rng.random()
    if eol < 0.2:
        data = data.replace(b"\n", b"\r\n")
    elif eol < 0.3:
        data = data.replace(b"\n", b"\r")
    script: Script = [(head, 0.0)]
    if rng.random() < 0.5:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12)))) if len(data) > 1 \
            else []
        start = 0
        for cut in [*cuts, len(data)]:
            script.append((data[start:cut], rng.choice([0.0, 0.0, 0.001])))
            start = cut
    else:
        script.append((data, 0.0))
    return script


def stream_case(rng: random.Random) -> tuple[str, list[bytes]]:
    """A stream mutated from a valid one (text or a tool call): one to three of its events changed or added."""
    base = copy.deepcopy(rng.choice([STREAM_CHUNKS, STREAM_CHUNKS, TOOL_CHUNKS]))
    chunks: list = [*base, b"data: [DONE]\n\n"]
    names = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        position = rng.randrange(len(chunks) + 1)
        if kind < 0.3:
            name, odd = rng.choice(NAMED_CHUNKS)
            chunks.insert(position, copy.deepcopy(odd))
        elif kind < 0.5:
            name, odd = rng.choice(ODD_EVENTS)
            chunks.insert(position, odd)
        elif kind < 0.7:
            index = rng.randrange(len(base))
            name = f"mutated-{index}"
            chunks[index] = mutated(base[index], rng, rng.randint(1, 2)) if not isinstance(chunks[index], bytes) \
                else chunks[index]
        elif kind < 0.78:
            name = "no-done"
            chunks = [c for c in chunks if c != b"data: [DONE]\n\n"]
        elif kind < 0.84:
            name = "done-twice"
            chunks.append(b"data: [DONE]\n\n")
        elif kind < 0.9:
            name = "after-done"
            chunks.append(rng.choice([STREAM_CHUNKS[1], USAGE_CHUNK, b"data: nonsense\n\n"]))
        else:
            name = "usage-choices-null"
            chunks.insert(len(base) - 1, {**USAGE_CHUNK, "choices": None})
        names.append(name)
    events = encode_events(chunks)
    if rng.random() < 0.15:                 # the connection closes mid-event
        data = b"".join(events)
        cut = rng.randrange(1, len(data))
        events = [data[:cut]]
        names.append(f"cut-at-{cut}")
    return "+".join(names), events


def stream_heads(rng: random.Random) -> tuple[str, bytes, bool]:
    """An SSE response head, now and then an odd one: (name, head, whether it is a 4xx)."""
    roll = rng.random()
    if roll < 0.8:
        return "", SSE_HEAD, False
    name, status, headers = rng.choice([
        ("ct-json", 200, {"Content-Type": "application/json"}),
        ("ct-none", 200, {}),
        ("ct-plain", 200, {"Content-Type": "text/plain; charset=utf-16"}),
        ("gzip-claimed", 200, {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}),
        ("status-201", 201, {"Content-Type": "text/event-stream"}),
        ("status-203", 203, {"Content-Type": "text/event-stream"}),
        ("status-301", 301, {"Content-Type": "text/event-stream"}),
        ("status-500", 500, {"Content-Type": "text/event-stream"}),
        ("status-429", 429, {"Content-Type": "text/event-stream"}),
        ("status-400", 400, {"Content-Type": "text/event-stream"}),
    ])
    return name, http_head(status, headers), 400 <= status < 500


def random_ask(rng: random.Random, stream: bool | None = None) -> Ask:
    model = rng.choice(["raw", "raw-only", "raw-cached"])
    return Ask(model=model, stream=rng.random() < 0.5 if stream is None else stream,
               include_usage=rng.choice([None, True, False]), cacheable=model == "raw-cached")


def generated_cases(seed: int = SEED, count: int = CASES) -> list[tuple[str, Script, Ask, bool]]:
    """(name, script, what is asked, whether the model's status is a 4xx) for each case, the same every run."""
    rng = random.Random(seed)
    cases = []
    for number in range(count):
        roll = rng.random()
        if roll < 0.2:                      # a named wrong shape of a whole answer
            name, body = rng.choice(named_mutations())
            cases.append((f"{number}:answer:{name}", json_answer(body), random_ask(rng), False))
        elif roll < 0.35:                   # a whole answer with items replaced at random
            body = mutated(COMPLETION, rng, rng.randint(1, 3))
            cases.append((f"{number}:answer:random", json_answer(body), random_ask(rng), False))
        elif roll < 0.5:                    # broken below JSON
            name, script, four = rng.choice(TRANSPORT_CASES)
            cases.append((f"{number}:transport:{name}", script, random_ask(rng), four))
        else:                               # a stream, mutated
            name, events = stream_case(rng)
            head_name, head, four = stream_heads(rng)
            cases.append((f"{number}:stream:{name}{':' + head_name if head_name else ''}",
                          stream_script(events, rng, head=head), random_ask(rng, stream=rng.random() < 0.85), four))
    return cases


# the fuzzing ----------------------------------------------------------------------------------------------------

def test_fuzzed_upstream_answers(env, receiver):
    """Several hundred seeded odd answers, streamed and not: each gets a 200 or an OpenAI-shaped error, no trace,
    within the timeouts, a ledger line, and the gateway answers normally right after."""
    harness = env[0]
    started_s = time.monotonic()
    failures = []
    ledgered: dict[str, tuple[str, int]] = {}
    for number, (name, script, asked, four) in enumerate(generated_cases()):
        try:
            run_case(env, script, asked, upstream_4xx=four, name=name, ledgered=ledgered, then_normal=number % 4 == 0)
        except Exception as exc:            # noqa: BLE001 - every failure is listed, not only the first
            failures.append(f"{name}: {exc!r}"[:600] + f" | log: {env[2].take()}"[:400])
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} failed)"
    check_ledger(harness, ledgered)
    assert harness.flush_telemetry()
    assert receiver.wait_for(lambda: any(span.resource.get("service.name") == SERVICE for span in receiver.spans))
    assert not env[2].take()
    assert time.monotonic() - started_s < 80


@pytest.mark.parametrize("name,script,four", TRANSPORT_CASES, ids=[case[0] for case in TRANSPORT_CASES])
def test_transport_cases_each_way(env, name, script, four):
    """Every answer broken below JSON, asked streamed and not, with no fallback and with one."""
    ledgered: dict[str, tuple[str, int]] = {}
    for asked in (Ask(stream=False), Ask(stream=True, include_usage=True), Ask(model="raw", stream=False),
                  Ask(model="raw-cached", stream=True, cacheable=True)):
        run_case(env, script, asked, upstream_4xx=four, name=name, ledgered=ledgered, then_normal=asked.cacheable)
    check_ledger(env[0], ledgered)


def test_every_named_answer_shape(env):
    """Each named wrong shape of a whole answer, asked plainly and cacheable (then replayed as a stream)."""
    ledgered: dict[str, tuple[str, int]] = {}
    for name, body in named_mutations():
        for asked in (Ask(stream=False), Ask(model="raw-cached", stream=False, cacheable=True),
                      Ask(model="raw", stream=True, include_usage=True)):
            run_case(env, json_answer(body), asked, name=name, ledgered=ledgered, then_normal=asked.model == "raw")
    check_ledger(env[0], ledgered)


def test_every_odd_chunk_and_event_in_a_stream(env):
    """Each odd chunk and odd event, first in a valid stream and in its middle, with usage asked for and not,
    cacheable (then replayed as JSON) and not."""
    rng = random.Random(SEED)
    odd = [(name, sse(json.dumps(chunk).encode())) for name, chunk in NAMED_CHUNKS] + ODD_EVENTS
    plain = encode_events([*STREAM_CHUNKS, b"data: [DONE]\n\n"])
    ledgered: dict[str, tuple[str, int]] = {}
    for name, event in odd:
        for position, asked in ((0, Ask(include_usage=False)), (2, Ask(include_usage=True)),
                                (2, Ask(model="raw-cached", include_usage=True, cacheable=True)),
                                (4, Ask(model="raw", include_usage=None))):
            events = [*plain[:position], event, *plain[position:]]
            run_case(env, stream_script(events, rng), asked, name=f"{name}@{position}", ledgered=ledgered,
                     then_normal=asked.model == "raw")
    check_ledger(env[0], ledgered)


TRACEBACK = ('Traceback (most recent call last):\n  File "/srv/vllm/engine.py", line 12, in step\n    out = run()\n'
             'torch.OutOfMemoryError: CUDA out of memory')


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_model_servers_stack_trace_is_not_passed_on(env, stream):
    """A model server's error whose message is its stack trace reaches the client as the trace's last line, not
    the trace (its files and code)."""
    harness, raw, _ = env
    raw.script = json_answer({"error": {"message": TRACEBACK, "type": "server_error"}}, status=500)
    reply, _ = ask(harness, Ask(stream=stream), "trace-status")
    assert reply.status_code == 500 and b"Traceback" not in reply.content and b"engine.py" not in reply.content
    assert "torch.OutOfMemoryError: CUDA out of memory" in reply.json()["error"]["message"]
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:2], json.dumps({"error": TRACEBACK}).encode()), 0.0)]
    reply, _ = ask(harness, Ask(stream=True), "trace-stream")
    assert reply.status_code == 200 and b"Traceback" not in reply.content and b"engine.py" not in reply.content
    assert b"CUDA out of memory" in reply.content


# failures the fuzzing found, one by one -------------------------------------------------------------------------

@pytest.mark.parametrize("status", [201, 299])
def test_a_2xx_answer_reaches_the_client_as_a_200(env, status):
    """A model's answer with a 2xx status other than 200 is the client's 200, not that status."""
    harness, raw, _ = env
    raw.script = json_answer(COMPLETION, status=status)
    reply, _ = ask(harness, Ask(stream=False), f"status-{status}")
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "Hello there"


@pytest.mark.parametrize("status", [300, 301, 399])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_3xx_answer_is_a_broken_one(env, status, stream):
    """A model answering a 3xx (no redirect to follow) has failed: the fallback answers, or the client gets a 502,
    never the 3xx nor its body relayed as the answer."""
    harness, raw, _ = env
    content_type = "text/event-stream" if stream else "application/json"
    body = sse(*TEXT_EVENTS) if stream else VALID
    raw.script = body_answer(body, status=status, content_type=content_type)
    reply, _ = ask(harness, Ask(stream=stream), f"status-{status}-{stream}")
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_bad_response"
    reply, _ = ask(harness, Ask(model="raw", stream=stream), f"status-{status}-{stream}-fallback")
    assert reply.status_code == 200 and reply.headers["x-gateway-model"] == "medium"


def test_a_status_0_is_a_broken_answer(env):
    """A status line of 000 is a 502 to the client, not a status 0 it cannot read."""
    harness, raw, _ = env
    raw.script = [(b"HTTP/1.1 000 X\r\nContent-Length: 2\r\n\r\n{}", 0.0)]
    reply, _ = ask(harness, Ask(stream=False), "status-0")
    assert reply.status_code == 502 and reply.json()["error"]["code"] == "upstream_bad_response"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_usage_past_int64_is_not_believed(env, stream):
    """Token counts past what the ledger and OTLP can hold (a whole float like 1e19, a cached count of 2**70) are a
    malformed usage: the tokens are estimated and the request is recorded, where its recording used to fail."""
    harness, raw, errors = env
    usage = {"prompt_tokens": 1e19, "completion_tokens": 2, "total_tokens": 1e19}
    details = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 2.0 ** 70}}
    for number, reported in enumerate((usage, details)):
        if stream:
            raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:-1], json.dumps({**USAGE_CHUNK, "usage": reported}).encode(),
                                          b"[DONE]"), 0.0)]
        else:
            raw.script = json_answer({**COMPLETION, "usage": reported})
        request_id = f"usage-past-int64-{stream}-{number}"
        reply, _ = ask(harness, Ask(stream=stream, include_usage=True), request_id)
        assert reply.status_code == 200
        record = accounting.ledger_record(harness.ledger_path, request_id)
        assert record["input_tokens"] < 2 ** 32 and record["tokens_estimated"] is (number == 0)
    harness.call(asyncio.sleep(0))
    assert errors.take() == []


def test_a_cached_answer_whose_message_is_not_an_object_is_not_kept(env):
    """A plain answer whose choice's message is a list (finish `stop`) is served but not cached: replayed as a
    stream, it used to cut the stream with an internal error."""
    harness, raw, errors = env
    choice = COMPLETION["choices"][0]
    raw.script = json_answer({**COMPLETION, "choices": [{**choice, "message": [choice["message"]]}]})
    asked = Ask(model="raw-cached", stream=False, cacheable=True)
    first, _ = ask(harness, asked, "message-list-plain", "message as a list")
    assert first.status_code == 200 and first.headers["x-gateway-cache"] == "miss"
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS), 0.0)]
    again, _ = ask(harness, dataclasses.replace(asked, stream=True), "message-list-stream", "message as a list")
    assert again.status_code == 200 and again.content.endswith(b"data: [DONE]\n\n")
    assert again.headers["x-gateway-cache"] != "hit" and b"Hello" in again.content
    assert errors.take() == []


def test_a_stream_cut_before_its_last_blank_line_stays_well_formed(env):
    """A stream whose model closes right after its finish chunk, before that event's blank line, reaches the client
    as separate events: the finish chunk, then [DONE], not one event of both that no SDK can parse."""
    harness, raw, _ = env
    raw.script = [(SSE_HEAD + sse(*TEXT_EVENTS[:3]) + b"data: " + TEXT_EVENTS[3] + b"\n", 0.0)]
    reply, _ = ask(harness, Ask(), "cut-before-blank-line")
    assert reply.status_code == 200 and reply.content.endswith(b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
    assert [json.loads(data) for data in sse_events(reply.content)[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in harness.openai().chat.completions.create(
        model="raw-only", stream=True, messages=[{"role": "user", "content": "hi"}]) if c.choices)
    assert text == "Hello world"


# models that stall ----------------------------------------------------------------------------------------------

STALLS: list[tuple[str, Script]] = [
    ("before-the-head", [(b"", 3.0)]),
    ("mid-head", [(b"HTTP/1.1 200 X\r\nContent-Type: text/event", 0.0), (b"", 3.0)]),
    ("mid-body", [(http_head(200, {"Content-Type": "application/json"}, len(VALID)) + VALID[:30], 0.0),
                  (b"", 3.0)]),
    ("mid-stream", [(SSE_HEAD + sse(*TEXT_EVENTS[:2]), 0.0), (b"", 3.0)]),
    ("mid-event", [(SSE_HEAD + sse(*TEXT_EVENTS[:2]) + b"data: {\"choi", 0.0), (b"", 3.0)]),
    ("keep-alives-only", [(SSE_HEAD, 0.0)] + [(b": ping\n\n", 0.3)] * 8),
    ("trickled-event", [(SSE_HEAD + sse(*TEXT_EVENTS[:2]), 0.0)] + [(b"x", 0.3)] * 8),
]


@pytest.mark.parametrize("name,script", STALLS, ids=[stall[0] for stall in STALLS])
def test_a_stalled_model_is_given_up_at_its_first_byte_timeout(env, name, script):
    """A model that stalls anywhere (before its head, in it, mid-body, mid-stream, mid-event, sending only
    keep-alives or bytes that never end an event) is given up: a stream about first_byte_s after its last data
    event, a plain answer first_byte_s after its last byte (at most total_s)."""
    for asked in (Ask(stream=True), Ask(model="raw", stream=False)):
        started_s = time.monotonic()
        run_case(env, script, asked, name=name, then_normal=False)
        limit_s = 2 * FIRST_BYTE_S + 0.5 if asked.stream else TOTAL_S
        assert time.monotonic() - started_s < limit_s, name
    check_still_serves(*env[:2], name)
