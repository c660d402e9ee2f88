"""Fuzzing what a model server sends for the Responses API: a seeded stream of odd answers and event streams from a
scripted server (events dropped, repeated, reordered, cut, of odd types and values, failures at any point, odd
usage), each asked streamed and not; whatever comes back, the client gets a 200 (a JSON object, or an SSE stream
of JSON events, ending in an in-band error when it failed) or an OpenAI-shaped error, never a stack trace nor an
internal error, the gateway logs no error, writes the request's ledger line, and serves the next request."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import time
import uuid

import pytest
import requests

from tests.support import accounting
from tests.support.harness import DEFAULT_SIMS, Harness, raw_model_policy
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, json_answer
from tests.test_e2e_upstream_fuzz import TOTAL_S, ErrorLog, mutated, sse_events

SEED = int(os.environ.get("FUZZ_SEED", "20261129"))
CASES = int(os.environ.get("FUZZ_CASES", "160"))

RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "fake",
            "error": None, "incomplete_details": None,
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]}],
            "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}}


def events() -> list[dict]:
    """A whole, valid Responses API stream: its opening events, two text deltas, its closing events."""
    opening = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    place = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    return [{"type": "response.created", "response": opening},
            {"type": "response.in_progress", "response": opening},
            {"type": "response.output_item.added", "output_index": 0,
             "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}},
            {"type": "response.content_part.added", **place, "part": {"type": "output_text", "text": ""}},
            {"type": "response.output_text.delta", **place, "delta": "Hello"},
            {"type": "response.output_text.delta", **place, "delta": " there"},
            {"type": "response.output_text.done", **place, "text": "Hello there"},
            {"type": "response.content_part.done", **place, "part": RESPONSE["output"][0]["content"][0]},
            {"type": "response.output_item.done", "output_index": 0, "item": RESPONSE["output"][0]},
            {"type": "response.completed", "response": RESPONSE}]


def encode(event: object) -> bytes:
    """One SSE event: its `event:` line (when it has a string type) and its data."""
    kind = event.get("type") if isinstance(event, dict) else None
    head = f"event: {kind}\n".encode() if isinstance(kind, str) and "\n" not in kind else b""
    return head + b"data: " + json.dumps(event).encode() + b"\n\n"


EXTRA_EVENTS = [
    {"type": "error", "code": "server_error", "message": "the model overloaded", "param": None},
    {"type": "response.failed", "response": {**RESPONSE, "status": "failed",
                                             "error": {"code": "server_error", "message": "it broke"}}},
    {"type": "response.incomplete", "response": {**RESPONSE, "status": "incomplete",
                                                 "incomplete_details": {"reason": "max_output_tokens"}}},
    {"type": "response.reasoning_summary_text.delta", "output_index": 0, "delta": "thinking"},
    {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{\"a\":"},
    {"type": "response.something_new", "value": 1}, {"type": ["response.output_text.delta"], "delta": "x"},
    {"delta": "no type"}, {"type": None}, ["not", "an", "object"], "a string", 7,
]


def stream_case(rng: random.Random) -> tuple[str, bytes]:
    """A mutated stream: (what was done to it, its bytes after the head)."""
    stream: list = events()
    done = []
    for _ in range(rng.randint(1, 3)):
        move = rng.choice(("drop", "repeat", "swap", "extra", "mutate", "cut", "raw"))
        if move == "drop" and stream:
            stream.pop(rng.randrange(len(stream)))
        elif move == "repeat" and stream:
            stream.insert(rng.randrange(len(stream)), copy.deepcopy(rng.choice(stream)))
        elif move == "swap" and len(stream) > 1:
            i, j = rng.sample(range(len(stream)), 2)
            stream[i], stream[j] = stream[j], stream[i]
        elif move == "extra":
            stream.insert(rng.randrange(len(stream) + 1), copy.deepcopy(rng.choice(EXTRA_EVENTS)))
        elif move == "mutate" and (shaped := [i for i, event in enumerate(stream) if isinstance(event, dict)]):
            index = rng.choice(shaped)
            stream[index] = mutated(stream[index], rng)
        elif move == "cut":
            stream = stream[:rng.randrange(len(stream) + 1)]
        done.append(move)
    body = b"".join(encode(event) for event in stream)
    if "raw" in done:               # bytes that are not JSON, or an event without data
        body += rng.choice([b"data: {not json\n\n", b"event: response.output_text.delta\n\n", b": ping\n\n",
                            b"data: [DONE]\n\n", b"data: \n\n"])
    return "+".join(done), body


def whole_case(rng: random.Random) -> tuple[str, dict]:
    """A mutated whole answer."""
    return "whole", mutated(copy.deepcopy(RESPONSE), rng, times=rng.randint(1, 3))


def check(reply: requests.Response, what: str) -> None:
    body = reply.content
    assert b"Traceback" not in body, what
    if reply.status_code == 200:
        if reply.headers.get("Content-Type", "").startswith("text/event-stream"):
            data = sse_events(body)
            assert data and b"[DONE]" not in data, (what, body[-300:])
            for payload in data[:-1]:
                event = json.loads(payload)
                assert isinstance(event, dict) and not event.get("error"), (what, payload)
            last = json.loads(data[-1])
            if isinstance(last, dict) and last.get("error"):
                assert last["error"]["code"] != "internal_error", (what, last)
        else:
            assert isinstance(json.loads(body), dict), what
        return
    error = json.loads(body)["error"]
    assert reply.status_code >= 500 or 400 <= reply.status_code < 500, (what, reply.status_code)
    assert isinstance(error["message"], str) and error["code"] != "internal_error", (what, body)
    assert reply.status_code != 500, (what, body)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ledger = tmp_path_factory.mktemp("ledger") / "requests.jsonl"
    raw = RawUpstream().start()
    tail = ('  - name: raw-responses\n    match: {{models: ["raw-responses"], endpoints: [responses]}}\n'
            '    candidates: [raw]\n    fallback: [medium]\n' + f'ledger: {{{{path: "{ledger}"}}}}\n')
    errors = ErrorLog()
    harness = Harness(raw_model_policy(raw.url, first_byte_s=1.0, tail=tail, total_s=TOTAL_S),
                      sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS}).start()
    harness.ledger_path = ledger
    logging.getLogger().addHandler(errors)
    try:
        yield harness, raw, errors
    finally:
        logging.getLogger().removeHandler(errors)
        harness.stop()
        raw.stop()


def test_fuzzed_responses_answers(env):
    harness, raw, errors = env
    rng = random.Random(SEED)
    asked: dict[str, tuple[str, int]] = {}
    for number in range(CASES):
        stream = number % 2 == 0
        if stream:
            what, body = stream_case(rng)
            raw.script = [(SSE_HEAD + body, 0.0)]
        else:
            what, answer = whole_case(rng)
            raw.script = json_answer(answer)
        harness.services.fleet.breakers._circuits.clear()
        request_id = f"rfuzz-{uuid.uuid4().hex[:12]}"
        reply = requests.post(f"{harness.base_url}/v1/responses", timeout=TOTAL_S + 5,
                              headers={"x-request-id": request_id},
                              json={"model": "raw-responses", "input": "hi", "stream": stream})
        what = f"case {number} ({'stream' if stream else 'whole'}: {what})"
        check(reply, what)
        asked[request_id] = (what, reply.status_code)
    assert not errors.take()
    deadline_s = time.monotonic() + 10
    while True:
        lines = {line.get("request_id"): line for line in accounting.ledger_lines(harness.ledger_path)}
        if set(asked) <= set(lines) or time.monotonic() > deadline_s:
            break
        time.sleep(0.02)
    for request_id, (what, status) in asked.items():
        line = lines[request_id]
        assert line["status"] == status and line["endpoint"] == "responses", (what, line)
        assert type(line["output_tokens"]) is int and line["output_tokens"] >= 0, (what, line)
    raw.script = json_answer(RESPONSE)
    harness.services.fleet.breakers._circuits.clear()
    reply = requests.post(f"{harness.base_url}/v1/responses", json={"model": "raw-responses", "input": "hi"},
                          timeout=10)
    assert reply.status_code == 200 and reply.json()["output"][0]["content"][0]["text"] == "Hello there"


def test_the_seed_stream_and_answer_are_served_whole(env):
    """The unmutated stream and answer are relayed as they came: the fuzz starts from what works."""
    harness, raw, _ = env
    raw.script = [(SSE_HEAD + b"".join(encode(event) for event in events()), 0.0)]
    reply = requests.post(f"{harness.base_url}/v1/responses", json={"model": "raw-responses", "input": "hi",
                                                                    "stream": True}, timeout=10)
    kinds = [json.loads(data)["type"] for data in sse_events(reply.content)]
    assert reply.status_code == 200 and kinds == [event["type"] for event in events()]
    raw.script = json_answer(RESPONSE)
    assert requests.post(f"{harness.base_url}/v1/responses", json={"model": "raw-responses", "input": "hi"},
                         timeout=10).json()["usage"]["total_tokens"] == 7
