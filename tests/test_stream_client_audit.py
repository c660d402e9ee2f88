"""An application's view of streaming through the gateway with the openai SDK: what a chat UI that stops reading
once its answer is whole gets booked as.

The scripted model `raw` (first_byte_s 1, priced) is a RawUpstream behind route `raw-only`, which has no fallback.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.harness import ledgered_raw_model_gateway, reset_raw_model
from tests.support.raw_calls import ledger_record, settled
from tests.support.raw_upstream import SSE_HEAD, chunk, sse

USAGE = json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                    "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 2,
                                             "total_tokens": 10}}).encode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1,
                                    raw_keys="    price: {{input_per_mtok: 1, output_per_mtok: 2}}\n") as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


def wait_for_record(harness, request_id: str, within_s: float = 2.0) -> dict:
    deadline_s = time.monotonic() + within_s
    while True:
        try:
            return ledger_record(harness, request_id)
        except Exception:
            if time.monotonic() > deadline_s:
                raise
            time.sleep(0.05)


def test_a_client_that_stops_reading_once_every_choice_finished_is_booked_a_success(env):
    """The usual chat UI loop leaves its `with` block at the finish reason, before [DONE]: the gateway waits there
    for the usage chunk it asked the model for itself (the client did not ask for usage). The answer was whole,
    as the gateway itself judges one whose choices all finished, and the client got all it asked for: it is a
    success, at the model's tokens, not a 499 `client_disconnected` charged an estimate."""
    harness, raw = env
    raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Hello"), chunk(" world"),
                                  chunk(None, finish="stop")), 0.0),
                  (sse(USAGE, b"[DONE]"), 0.4)]          # a real model's usage chunk comes a moment later
    text = ""
    with harness.openai().chat.completions.create(
            model="raw-only", stream=True, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "leaves-at-finish"}) as stream:
        for part in stream:
            text += part.choices[0].delta.content or ""
            if part.choices[0].finish_reason:
                break
    assert text == "Hello world"
    settled(harness, "raw")
    record = wait_for_record(harness, "leaves-at-finish")
    assert (record["status"], record["outcome"]) == (200, "success"), record
