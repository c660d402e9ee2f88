"""Accounting at its edges: tool schemas the cookbook's rule leaves out, cached and reasoning tokens in the
ledger, a disk that takes part of a line, and outcomes reported past the book's retention."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.context import Attempt
from gateway.errors import NotFound
from gateway.ledger import Ledger
from gateway.outcomes import OutcomeBook
from gateway.stages.account import gpu_seconds
from gateway.policy.model import GpuSource, Model
from gateway.policy.model import Ledger as LedgerConfig
from gateway.tokens import count_prompt_tokens, count_text_tokens
from tests.support import accounting
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, short_timeouts
from tests.support.raw_upstream import SSE_HEAD, RawUpstream, chunk, json_answer, sse

REPO_ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Where should the parcel go?"}]


# tokens: tool definitions ---------------------------------------------------------------------------

ADDRESS = {"type": "object", "required": ["street", "city"],
           "properties": {"street": {"type": "string", "description": "street name and house number"},
                          "city": {"type": "string", "description": "the city, in full"}}}


def function_tool(parameters: dict) -> dict:
    return {"type": "function", "function": {"name": "ship", "description": "Ship a parcel",
                                             "parameters": parameters}}


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_a_schemas_defs_count_the_tokens_of_their_json(encoding):
    """A tool whose parameters keep a nested model under `$defs` (as schemas made from Pydantic models do) counts
    the tokens of that JSON, which the model reads too."""
    defs = {"Address": ADDRESS}
    referring = {"type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}}, "required": ["to"]}
    without = count_prompt_tokens("chat", {"messages": MESSAGES, "tools": [function_tool(referring)]}, encoding)
    with_defs = count_prompt_tokens("chat", {"messages": MESSAGES,
                                             "tools": [function_tool({**referring, "$defs": defs})]}, encoding)
    assert with_defs - without == count_text_tokens(json.dumps({"$defs": defs}, separators=(",", ":")), encoding)


def test_a_custom_tool_counts_its_name_description_and_grammar():
    """A custom tool (`{"type": "custom", "custom": {...}}`) counts its name and description as a function does,
    and its `format` grammar as JSON, not as a nameless, empty function."""
    custom = {"name": "run_sql", "description": "Run one read-only SQL query against the finance warehouse",
              "format": {"type": "grammar", "syntax": "lark", "definition": "start: SELECT_STMT"}}
    as_function = {"type": "function", "function": {"name": custom["name"], "description": custom["description"]}}
    counted = count_prompt_tokens("chat", {"messages": MESSAGES, "tools": [{"type": "custom", "custom": custom}]},
                                  "o200k_base")
    function_counted = count_prompt_tokens("chat", {"messages": MESSAGES, "tools": [as_function]}, "o200k_base")
    grammar = json.dumps({"format": custom["format"]}, separators=(",", ":"))
    assert counted == function_counted + count_text_tokens(grammar, "o200k_base")



# GPU time: which attempts pay it, and for how many GPUs ---------------------------------------------------

TWO_GPUS = Model(name="g", endpoint="http://127.0.0.1:1/v1", upstream_model="g", max_concurrency=4,
                 gpu_hour_usd=Decimal("3.60"), gpus=GpuSource(source="nvml", ids=("0", "1")))


def test_an_attempt_pays_the_gpu_time_of_every_gpu_its_model_names():
    """An attempt of 2 s on a model spread over two GPUs at four calls at a time held 2 x 2 / 4 = 1 GPU-second."""
    assert gpu_seconds(Attempt(model=TWO_GPUS, started_s=10.0, ended_s=12.0, status=200)) == 1.0


@pytest.mark.parametrize("attempt", [
    Attempt(model=TWO_GPUS, started_s=10.0, ended_s=12.0, error_type="connect_error"),
    Attempt(model=TWO_GPUS, started_s=10.0, ended_s=12.0, error_type="queue_timeout", dispatched=False,
            queue_result="timeout"),
], ids=["connection-never-opened", "no-call-slot"])
def test_an_attempt_that_never_reached_the_model_server_pays_no_gpu_time(attempt):
    """An attempt whose connection never opened, or that waited 2 s for a call slot and got none, held no GPU."""
    assert gpu_seconds(attempt) is None


# the ledger: cached and reasoning tokens ---------------------------------------------------------------

#: USD per million tokens: input, cached input, output, audio input, audio output
PRICES = ("2.50", "1.25", "10.00", "40.00", "80.00")
USAGE = {"prompt_tokens": 1200, "completion_tokens": 400, "total_tokens": 1600,
         "prompt_tokens_details": {"cached_tokens": 1000}, "completion_tokens_details": {"reasoning_tokens": 300}}


@pytest.fixture(scope="module")
def priced(tmp_path_factory):
    """A gateway whose one model, a scripted server, has a cached-input price, and its ledger."""
    raw = RawUpstream().start()
    ledger = tmp_path_factory.mktemp("ledger") / "requests.jsonl"
    price = dict(zip(("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "audio_input_per_mtok",
                      "audio_output_per_mtok"), map(float, PRICES)))
    policy = models(model("o", endpoint=raw.url, upstream_model="fake", size_b=1, tier=1, price=price,
                          latency_prior=latency(5, 1), timeouts=short_timeouts())) + f"""
routes:
  - name: r
    match: {{{{models: ["o"]}}}}
    candidates: [o]
ledger: {{{{path: "{ledger}"}}}}
"""
    harness = Harness(policy, sims={}).start()
    harness.ledger_path = ledger
    try:
        yield harness, raw
    finally:
        harness.stop()
        raw.stop()


def cost_from_attempt(attempt: dict) -> Decimal:
    """An attempt's cost worked out again from its ledger line and PRICES, as a finance report would."""
    input_price, cached_price, output_price, audio_in_price, audio_out_price = map(Decimal, PRICES)
    cached, audio_in, audio_out = (attempt[f] for f in ("cached_input_tokens", "audio_input_tokens",
                                                         "audio_output_tokens"))
    return ((attempt["input_tokens"] - cached - audio_in) * input_price + cached * cached_price
            + audio_in * audio_in_price + (attempt["output_tokens"] - audio_out) * output_price
            + audio_out * audio_out_price) / accounting.MILLION


def test_audio_tokens_are_priced_at_the_audio_prices_and_kept_in_the_ledger(priced):
    """An answer with audio in and out (gpt-4o-audio reports them among the prompt's and completion's tokens) pays
    the model's audio prices for them, many times the text ones, and its ledger line keeps them, so its cost can
    be worked out again; a cached hit on it would report the same usage."""
    harness, raw = priced
    usage = {"prompt_tokens": 1200, "completion_tokens": 500, "total_tokens": 1700,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 800},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 450}}
    raw.script = json_answer({"id": "c", "object": "chat.completion", "created": 1, "model": "fake",
                              "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                  "role": "assistant", "content": None,
                                  "audio": {"id": "audio_1", "data": "AAAA", "expires_at": 2_000_000_000,
                                            "transcript": "Depot 4"}}}],
                              "usage": usage})
    answer = harness.openai().chat.completions.with_raw_response.create(
        model="o", messages=MESSAGES, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    answer.parse()
    (attempt,) = accounting.ledger_record(harness.ledger_path, answer.headers["x-request-id"])["attempts"]
    assert (attempt["audio_input_tokens"], attempt["audio_output_tokens"]) == (800, 450)
    # (400 x 2.50 + 800 x 40 + 50 x 10 + 450 x 80) / 1e6
    assert Decimal(attempt["cost_usd"]) == cost_from_attempt(attempt) == Decimal("0.0695")


@pytest.mark.parametrize("stream", [False, True])
def test_the_ledger_keeps_cached_and_reasoning_tokens_so_its_cost_can_be_worked_out_again(priced, stream):
    """An attempt's ledger line carries the cached input and reasoning tokens the upstream reported, and its
    cost is exactly what those tokens cost under the policy's cached and uncached prices."""
    harness, raw = priced
    if stream:
        usage_chunk = json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                                  "choices": [], "usage": USAGE}).encode()
        raw.script = [(SSE_HEAD + sse(chunk("", role=True), chunk("Depot 4"), chunk(None, finish="stop"),
                                      usage_chunk, b"[DONE]"), 0.0)]
    else:
        raw.script = json_answer({"id": "c", "object": "chat.completion", "created": 1, "model": "fake",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "Depot 4"}}],
                                  "usage": USAGE})
    answer = harness.openai().chat.completions.with_raw_response.create(model="o", messages=MESSAGES,
                                                                        stream=stream)
    list(answer.parse()) if stream else answer.parse()
    record = accounting.ledger_record(harness.ledger_path, answer.headers["x-request-id"])
    (attempt,) = record["attempts"]
    assert (attempt["cached_input_tokens"], attempt["reasoning_tokens"]) == (1000, 300)
    assert Decimal(record["cost_usd"]) == Decimal(attempt["cost_usd"]) == cost_from_attempt(attempt) \
        == Decimal("0.00575")


# the ledger: a disk that takes part of a line ---------------------------------------------------------

#: a process whose file size limit lets the disk take only part of one ledger line, then lifts it
PART_OF_A_LINE = """
import resource, signal, sys, time
from gateway.ledger import Ledger
from gateway.policy.model import Ledger as LedgerConfig
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit is cut short, not fatal
path = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
ledger = Ledger(LedgerConfig(path=path, max_bytes=1 << 20, backups=2))
def written(lines):
    ledger.write({"seq": lines - 1, "pad": "x" * 40})
    deadline = time.monotonic() + 5
    while ledger.write_errors + sum(1 for _ in open(path, "rb")) < lines and time.monotonic() < deadline:
        time.sleep(0.01)
written(1)
resource.setrlimit(resource.RLIMIT_FSIZE, (len(open(path, "rb").read()) + 30, hard))
written(2)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
ledger.write({"seq": 2, "pad": ""})
ledger.close()
print(ledger.write_errors)
"""


def test_a_line_the_disk_took_only_part_of_is_cut_back_off_the_file(tmp_path):
    """When the disk takes only part of a line (a file size limit, a nearly full disk), that line is counted lost
    and its fragment is removed, so every line of the ledger stays JSON that `gateway replay` can read."""
    path = tmp_path / "requests.jsonl"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PART_OF_A_LINE), str(path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 2]


# outcomes: the in-process book's retention -----------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


async def test_a_task_past_the_retention_is_unknown_even_with_no_request_since():
    """A task whose last request is older than ttl_s can no longer be reported, and a reported one leaves the
    stats, even when no request has come since to make the book forget it."""
    clock = Clock()
    book = OutcomeBook(ttl_s=3600, clock=clock)
    for request_id, task_id in (("req-1", "task-1"), ("req-2", "task-2"), ("req-3", None)):
        book.track(request_id=request_id, task_id=task_id, route="chat", tenant="acme", workflow="triage",
                   cost_usd=Decimal("0.25"))
    await book.report({"task_id": "task-2", "outcome": "success"}, tenant="acme")
    assert (await book.stats())["tenant"]["acme"]["tasks"] == 1
    clock.now_s += 3601
    for payload in ({"task_id": "task-1", "outcome": "success"}, {"request_id": "req-1", "outcome": "failure"},
                    {"request_id": "req-3", "outcome": "success"}):
        with pytest.raises(NotFound):
            await book.report(payload, tenant="acme")
    assert await book.stats() == {"route": {}, "tenant": {}, "workflow": {}}


def test_lines_written_just_after_the_ledger_is_deleted_land_in_the_new_file(tmp_path):
    """Lines written right after an operator deletes the ledger file are written to the file made again at the
    path, not lost into the deleted one without being counted."""
    path = tmp_path / "requests.jsonl"
    book = Ledger(LedgerConfig(path=str(path), max_bytes=1 << 20, backups=2))
    book.write({"seq": 0})
    deadline = time.monotonic() + 5
    while not path.read_bytes().endswith(b"\n") and time.monotonic() < deadline:
        time.sleep(0.01)
    path.unlink()
    for seq in (1, 2, 3):
        book.write({"seq": seq})
    book.close()
    assert book.write_errors == 0
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_stream_that_reports_usage_in_every_chunk_is_charged_its_last_count(priced):
    """A server that sends its running usage with every chunk (vLLM's continuous usage stats) is charged the last,
    whole count, not the first chunk's."""
    harness, raw = priced

    def with_usage(payload: bytes, usage: dict) -> bytes:
        return json.dumps({**json.loads(payload), "usage": usage}).encode()

    early = {"prompt_tokens": 1200, "completion_tokens": 1, "total_tokens": 1201}
    raw.script = [(SSE_HEAD + sse(with_usage(chunk("", role=True), early), with_usage(chunk("Depot 4"), early),
                                  with_usage(chunk(None, finish="stop"), USAGE), b"[DONE]"), 0.0)]
    answer = harness.openai().chat.completions.with_raw_response.create(model="o", messages=MESSAGES, stream=True)
    list(answer.parse())
    record = accounting.ledger_record(harness.ledger_path, answer.headers["x-request-id"])
    assert (record["input_tokens"], record["output_tokens"]) == (1200, 400)
    # (200 x 2.50 + 1000 cached x 1.25 + 400 x 10.00) / 1e6
    assert Decimal(record["cost_usd"]) == Decimal("0.00575")
