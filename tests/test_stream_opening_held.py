"""A chat stream's opening chunks, which carry no output yet, held until the first that does: a model failing after
them is still replaced by the next, and a model that answers has them relayed first, once, in order.

Real servers open a chat stream at once with a chunk that says nothing: vLLM's and OpenAI's role-only delta
(OpenAI's with `refusal: null`), Azure's chunk with no choices and its `prompt_filter_results`. The scripted
model, `raw` (first_byte_s 1), is a RawUpstream; `medium` (a simulated backend) is its fallback on the `raw`
route, and `raw-only` has none.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from gateway.stages import relay
from tests.support.harness import ledgered_raw_model_gateway, reset_raw_model
from tests.support.raw_calls import ledger_record
from tests.support.raw_upstream import SSE_HEAD, sse

FRAME = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake"}
#: vLLM's first chunk: the role, and empty content
VLLM_ROLE = {**FRAME, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]}
#: OpenAI's first chunk: the role, empty content, no refusal, and (the gateway asks for usage) no usage yet
OPENAI_ROLE = {**FRAME, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                                     "logprobs": None, "finish_reason": None}], "usage": None}
#: Azure's first chunk: no choices, what its filter made of the prompt
AZURE_FILTER = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {
                    "hate": {"filtered": False, "severity": "safe"}}}]}
#: vLLM's first chunk when the client asks for `continuous_usage_stats`: its usage so far, no token generated
VLLM_ROLE_WITH_USAGE = {**VLLM_ROLE, "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}}
OPENINGS = {"vllm": [VLLM_ROLE], "openai": [OPENAI_ROLE], "azure": [AZURE_FILTER, VLLM_ROLE],
            "vllm-continuous-usage": [VLLM_ROLE_WITH_USAGE]}


def text(content: str) -> dict:
    """A chat chunk carrying `content`."""
    return {**FRAME, "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}]}


FINISH = {**FRAME, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
#: how long the scripted model thinks between its opening chunks and its first token
THINK_S = 0.5


#: a `tail` for the raw model's policy: the Responses API on `raw`, falling back to `medium`
RESPONSES_ROUTE = """  - name: raw-responses
    match: {{models: ["raw"], endpoints: [responses]}}
    candidates: [raw]
    fallback: [medium]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with ledgered_raw_model_gateway(tmp_path_factory.mktemp("ledger"), first_byte_s=1,
                                    tail=RESPONSES_ROUTE) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(env):
    reset_raw_model(*env)


def opening_then(openings: list[dict], *rest: tuple[bytes, float]) -> list[tuple[bytes, float]]:
    """A script: the response head and the opening chunks at once, then `rest`."""
    return [(SSE_HEAD + sse(*(json.dumps(chunk).encode() for chunk in openings)), 0.0), *rest]


def relayed(harness, model: str = "raw-only", **extra) -> tuple[dict, list[tuple[float, str]]]:
    """Stream a chat completion with the openai SDK: the response headers, and each data event's payload with
    when it reached the client (seconds from the request)."""
    started_s = time.monotonic()
    create = harness.openai().chat.completions.with_streaming_response.create
    with create(model=model, stream=True, messages=[{"role": "user", "content": "hi"}], **extra) as stream:
        events = [(time.monotonic() - started_s, line[len("data: "):]) for line in stream.iter_lines()
                  if line.startswith("data: ")]
        return dict(stream.headers), events


def payloads(events: list[tuple[float, str]]) -> list[dict | str]:
    """The events' chunks, parsed ([DONE] as it is)."""
    return [payload if payload == "[DONE]" else json.loads(payload) for _, payload in events]


# a model failing after its opening chunks is replaced --------------------------------------------------------

IN_BAND_ERROR = (sse(b'{"error": {"message": "the model is overloaded", "type": "server_error"}}'), 0.0)
FAILURES = {
    "in-band error": ([IN_BAND_ERROR], "bad_response"),
    "dropped connection": ([], "bad_response"),
    "silence past first_byte_s": ([(b": ping\n\n", 0.4), (sse(json.dumps(text("late")).encode()), 3.0)], "timeout"),
}


@pytest.mark.parametrize("opening", sorted(OPENINGS))
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_model_failing_after_its_opening_chunks_is_replaced_by_the_next(env, opening, failure):
    """A model that sends its opening chunks, then fails before any output (an in-band error, a dropped
    connection, silence past first_byte_s), is replaced: the client gets the fallback's whole answer,
    and none of the failed model's chunks, where it used to get an in-band error; the ledger has both attempts."""
    harness, raw = env
    rest, reason = FAILURES[failure]
    raw.script = opening_then(OPENINGS[opening], *rest)
    headers, events = relayed(harness, model="raw")
    assert headers["x-gateway-model"] == "medium" and headers["x-gateway-fallback"] == "fallback"
    assert headers["x-gateway-fallback-reason"] == reason
    chunks = payloads(events)
    assert chunks[-1] == "[DONE]" and all(chunk["model"] == "sim-medium" for chunk in chunks[:-1])
    assert not any("error" in chunk for chunk in chunks[:-1])
    choices = [choice for chunk in chunks[:-1] for choice in chunk["choices"]]
    assert [choice["delta"].get("role") for choice in choices if choice["delta"].get("role")] == ["assistant"]
    assert "".join(choice["delta"].get("content") or "" for choice in choices)
    assert choices[-1]["finish_reason"] in ("stop", "length")
    record = ledger_record(harness, headers["x-request-id"])
    assert record["status"] == 200 and record["models_tried"] == ["raw", "medium"]
    assert record["fallback"] == "fallback" and record["fallback_reason"] == reason
    assert [attempt["error"] for attempt in record["attempts"]] == [reason, None]


def test_a_model_with_no_fallback_failing_after_its_opening_chunks_is_an_error_status(env):
    """With no model left to try, a model that failed after its opening chunks is the client's error status (502),
    as one failing before any chunk is, not a 200 stream ending with an in-band error."""
    harness, raw = env
    raw.script = opening_then([VLLM_ROLE], IN_BAND_ERROR)
    with pytest.raises(openai.APIStatusError) as raised:
        relayed(harness, model="raw-only")
    assert raised.value.status_code == 502
    assert "overloaded" in str(raised.value)


def test_opening_chunks_then_done_are_relayed_as_an_empty_stream_is(env):
    """A model that ends with [DONE] after its opening chunks, saying nothing more, is relayed as it came (the
    opening chunks, then [DONE], a 200), as a stream of [DONE] alone is: its held chunks are not lost."""
    harness, raw = env
    raw.script = opening_then(OPENINGS["azure"], (sse(b"[DONE]"), THINK_S))
    headers, events = relayed(harness, model="raw")
    assert headers["x-gateway-model"] == "raw" and headers["x-gateway-fallback"] == "none"
    assert payloads(events) == [*OPENINGS["azure"], "[DONE]"]
    assert events[0][0] >= THINK_S * 0.9
    assert ledger_record(harness, headers["x-request-id"])["status"] == 200


# a model that answers has its opening chunks relayed first, once ---------------------------------------------

@pytest.mark.parametrize("opening", sorted(OPENINGS))
def test_the_opening_chunks_are_relayed_first_once_with_the_first_token(env, opening):
    """The opening chunks reach the client first, each once, in order and as the model sent them (without the
    `usage: null` the client did not ask for), together with the first token rather than before it; TTFT in the
    ledger still runs to that first token."""
    harness, raw = env
    answer = [text("Hello"), text(" world"), FINISH]
    raw.script = opening_then(OPENINGS[opening], (sse(*(json.dumps(chunk).encode() for chunk in answer),
                                                      b"[DONE]"), THINK_S))
    headers, events = relayed(harness)
    sent = [{key: value for key, value in chunk.items() if key != "usage"} for chunk in OPENINGS[opening] + answer]
    assert payloads(events) == [*sent, "[DONE]"]
    assert events[0][0] >= THINK_S * 0.9             # held until the first token came
    record = ledger_record(harness, headers["x-request-id"])
    assert record["status"] == 200 and record["models_tried"] == ["raw"]
    assert THINK_S * 0.9 <= record["ttft_s"] < THINK_S + 1.0


def test_a_client_asking_for_usage_gets_the_opening_chunk_as_sent(env):
    """A client that asked for usage gets OpenAI's opening chunk as it came, `usage: null` included, then the
    model's usage chunk."""
    harness, raw = env
    usage = {**FRAME, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}
    raw.script = opening_then([OPENAI_ROLE], (sse(*(json.dumps(chunk).encode() for chunk in
                                                    ({**text("Hi"), "usage": None}, {**FINISH, "usage": None},
                                                     usage)), b"[DONE]"), THINK_S))
    headers, events = relayed(harness, stream_options={"include_usage": True})
    chunks = payloads(events)
    assert chunks[0] == OPENAI_ROLE and chunks[-2] == usage and chunks[-1] == "[DONE]"
    assert events[0][0] >= THINK_S * 0.9
    assert ledger_record(harness, headers["x-request-id"])["output_tokens"] == 1


def test_an_empty_answer_is_relayed_with_its_opening_chunk(env):
    """An empty answer (the role chunk, then a finish with no content) opens the stream at its finish and is
    relayed whole: both chunks, in order, and [DONE]; a 200 with no output."""
    harness, raw = env
    raw.script = opening_then([VLLM_ROLE], (sse(json.dumps(FINISH).encode(), b"[DONE]"), THINK_S))
    headers, events = relayed(harness)
    assert payloads(events) == [VLLM_ROLE, FINISH, "[DONE]"]
    assert events[0][0] >= THINK_S * 0.9
    record = ledger_record(harness, headers["x-request-id"])
    assert record["status"] == 200 and record["ttft_s"] is None
    chunks = list(harness.openai().chat.completions.create(model="raw-only", stream=True,
                                                            messages=[{"role": "user", "content": "hi"}]))
    assert [(chunk.choices[0].delta.content, chunk.choices[0].finish_reason) for chunk in chunks] == \
        [("", None), (None, "stop")]


def test_keepalives_while_the_opening_chunks_are_held_are_dropped_and_do_not_hold_off_the_deadline(env):
    """While the opening chunks are held, the model's `: ping` comments are dropped, as before any data, and do not
    hold off first_byte_s (1 s): a model that only sends them is replaced in about that time."""
    harness, raw = env
    raw.script = opening_then([VLLM_ROLE], *[(b": ping\n\n", 0.3) for _ in range(20)])
    started_s = time.monotonic()
    headers, events = relayed(harness, model="raw")
    assert time.monotonic() - started_s < 3.0
    assert headers["x-gateway-model"] == "medium" and headers["x-gateway-fallback-reason"] == "timeout"
    assert payloads(events)[-1] == "[DONE]" and payloads(events)[0]["model"] == "sim-medium"


def test_opening_chunks_past_what_may_be_held_open_the_stream(env, monkeypatch):
    """A model that sends no end of opening chunks has its stream opened with them once they pass MAX_HELD_BYTES
    (held memory is bounded): a failure after that is the in-band error it was before."""
    monkeypatch.setattr(relay, "MAX_HELD_BYTES", 64 * 1024)
    harness, raw = env
    filters = [{**AZURE_FILTER, "prompt_filter_results": [{"prompt_index": 0, "note": f"{n}" * 10_000}]}
               for n in range(10)]
    raw.script = opening_then(filters, IN_BAND_ERROR)
    headers, events = relayed(harness, model="raw")
    assert headers["x-gateway-model"] == "raw" and headers["x-gateway-fallback"] == "none"
    chunks = payloads(events)
    assert chunks[:-1] == filters and "overloaded" in chunks[-1]["error"]["message"]


def test_a_responses_stream_of_its_preamble_then_done_still_falls_back(env):
    """A Responses API stream that sends its preamble, then a [DONE] the API does not have, has not answered:
    the next model does (a chat stream's [DONE] after its opening chunks is relayed; this one's is no end)."""
    harness, raw = env
    opening = {"id": "resp_broken", "object": "response", "status": "in_progress", "model": "fake", "output": []}
    raw.script = [(SSE_HEAD, 0.0)] + [
        (f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': n, 'response': opening})}\n\n"
         .encode(), 0.0) for n, kind in enumerate(("response.created", "response.in_progress"))] + \
        [(sse(b"[DONE]"), 0.0)]
    with harness.openai().responses.with_streaming_response.create(model="raw", input="hi", stream=True) as stream:
        assert stream.headers["x-gateway-model"] == "medium" and stream.headers["x-gateway-fallback"] == "fallback"
        lines = list(stream.iter_lines())
    assert "resp_broken" not in "".join(lines) and any(line == "event: response.completed" for line in lines)
