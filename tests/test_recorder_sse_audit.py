"""The ledger line and task cost of a finished request, SSE parsing edges, and reload restart notes."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal

import pytest

from gateway.context import Attempt, Decision, RequestContext, Usage
from gateway.policy.model import Ledger as LedgerSettings
from gateway.policy.model import Budget, Limits, Tenant
from gateway.recorder import Recorder, attempt_record, ledger_record
from gateway.runtime import restart_only_changes, wait_for_restart
from gateway.services import _plain, budgeted_tenants, policy_encodings
from gateway.sse import BOM, DONE, EventTooLong, encode_event, error_event, event_data, is_comment, iter_events
from tests.test_deploy import LARGE, POLICY, ROUTE, SMALL, request_context


def fallback_context() -> RequestContext:
    """A request whose small attempt timed out and whose large one answered."""
    ctx = request_context(decision=Decision(route=ROUTE, plan=(SMALL, LARGE), sla_met=False),
                          task_id="task-9", workflow="triage")
    failed = Attempt(model=SMALL, started_s=10.0, ended_s=10.25, status=504, error_type="timeout")
    answered = Attempt(model=LARGE, started_s=10.25, ended_s=11.0, status=200, cost_usd=Decimal("0.0031"),
                       usage=Usage(input_tokens=100, output_tokens=40, cached_input_tokens=60, reasoning_tokens=7))
    ctx.attempts.extend([failed, answered])
    ctx.fallback_state, ctx.fallback_reason = "fallback", "timeout"
    ctx.usage, ctx.cost_usd, ctx.cache_saved_usd = answered.usage, Decimal("0.0031"), Decimal("0.0002")
    ctx.cache_status, ctx.status, ctx.energy_j = "stored", 200, 3.5
    return ctx


# ---------------------------------------------------------------- the ledger line


def test_a_ledger_line_names_every_attempt_and_the_fallback_that_answered():
    """The ledger line keeps the tried models in order, the fallback state and reason, and the chosen route."""
    record = ledger_record(fallback_context())
    assert record["models_tried"] == ["small", "large"]
    assert (record["fallback"], record["fallback_reason"]) == ("fallback", "timeout")
    assert (record["route"], record["alias"], record["tenant"]) == ("chat-default", "auto", "acme")
    assert (record["task_id"], record["workflow"]) == ("task-9", "triage")
    assert record["sla_met"] is False
    assert record["budget_downgrade"] is False


def test_a_ledger_line_says_when_a_spent_budget_sent_the_request_to_the_cheapest_model():
    """A request `on_exhausted: downgrade` re-planned is marked, so the finance reader can tell why it got the
    cheapest model."""
    ctx = fallback_context()
    ctx.budget_downgrade = True
    assert ledger_record(ctx)["budget_downgrade"] is True


def test_a_ledger_line_carries_its_usage_cost_and_savings_as_plain_strings():
    """Tokens come from the request's usage, cost and savings as plain decimal strings, energy as measured."""
    record = ledger_record(fallback_context())
    assert (record["prompt_tokens"], record["input_tokens"], record["output_tokens"]) == (12, 100, 40)
    assert (record["cost_usd"], record["saved_usd"]) == ("0.0031", "0.0002")
    assert (record["cache"], record["status"], record["stream"], record["energy_j"]) == ("stored", 200, True, 3.5)
    assert record["tokens_estimated"] is False
    json.dumps(record)


def test_a_request_without_a_decision_has_no_sla_verdict_and_no_first_token():
    """A request refused before routing writes sla_met and ttft_s as null, not a guess."""
    record = ledger_record(request_context())
    assert record["sla_met"] is None and record["ttft_s"] is None
    assert record["models_tried"] == [] and record["attempts"] == []


def test_a_ledger_line_rounds_times_without_losing_microseconds():
    """ts is rounded to milliseconds and ttft_s to microseconds, a ttft of zero still written as 0."""
    ctx = request_context(started_unix_s=1700000000.123456)
    ctx.ttft_s = 0.0
    record = ledger_record(ctx)
    assert record["ts"] == 1700000000.123
    assert record["ttft_s"] == 0.0
    ctx.ttft_s = 0.1234567
    assert ledger_record(ctx)["ttft_s"] == 0.123457


def test_an_attempt_record_keeps_each_kind_of_token_and_its_cost():
    """An attempt's line has its duration, error, each token kind the price tells apart and its own cost."""
    failed, answered = ledger_record(fallback_context())["attempts"]
    assert (failed["model"], failed["status"], failed["error"], failed["duration_s"]) == ("small", 504, "timeout", 0.25)
    assert (failed["input_tokens"], failed["output_tokens"], failed["cost_usd"]) == (0, 0, "0")
    assert answered["duration_s"] == 0.75
    assert (answered["input_tokens"], answered["cached_input_tokens"]) == (100, 60)
    assert (answered["output_tokens"], answered["reasoning_tokens"]) == (40, 7)
    assert answered["cost_usd"] == "0.0031" and answered["error"] is None


def test_an_attempt_that_never_ended_has_no_duration():
    """An attempt still without an end time writes duration_s as null rather than a negative or zero time."""
    assert attempt_record(Attempt(model=SMALL, started_s=5.0))["duration_s"] is None


# ---------------------------------------------------------------- the cost booked to the task


def test_recording_books_the_cost_to_its_task_once_per_request():
    """Each recorded request adds its cost to its task once: two requests of one task count two and sum."""
    recorder = Recorder(POLICY)
    first = fallback_context()
    second = fallback_context()
    second.request_id, second.cost_usd = "req-2", Decimal("0.0009")
    recorder.record(first)
    recorder.record(second)
    task = recorder.outcomes.tasks["t", "acme", "task-9"]
    assert (task.requests, task.cost_usd) == (2, Decimal("0.0040"))
    assert (task.route, task.tenant, task.workflow) == ("chat-default", "acme", "triage")


def test_a_request_refused_before_routing_is_booked_to_no_task():
    """A request without a routing decision is not tracked in the outcome book."""
    recorder = Recorder(POLICY)
    recorder.record(request_context(task_id="task-9"))
    assert not recorder.outcomes.tasks


def test_the_ledger_gets_a_request_line_and_an_outcome_line(tmp_path):
    """With a ledger path set, a request and an outcome each write one line, the outcome marked as such."""
    path = tmp_path / "ledger.jsonl"
    recorder = Recorder(dataclasses.replace(POLICY, ledger=LedgerSettings(path=str(path))))
    recorder.record(fallback_context())
    recorder.outcome({"task_id": "task-9", "outcome": "success"})
    recorder.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("type") for line in lines] == [None, "outcome"]
    assert lines[0]["request_id"] == "req-1"
    assert lines[1] == {"type": "outcome", "task_id": "task-9", "outcome": "success"}


def test_without_a_ledger_path_the_recorder_writes_nothing():
    """A policy without ledger.path builds no ledger, and recording and outcomes still work."""
    recorder = Recorder(POLICY)
    assert recorder.ledger is None
    recorder.outcome({"task_id": "x"})
    recorder.close()


# ---------------------------------------------------------------- SSE


async def events(*pieces: bytes, max_event_bytes: int = 1 << 20) -> list[bytes]:
    async def source():
        for piece in pieces:
            yield piece
    return [event async for event in iter_events(source(), max_event_bytes)]


def test_an_event_is_one_data_line_and_a_blank_line():
    """encode_event writes `data: <json>` and a blank line, and DONE is the OpenAI terminator."""
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"


def test_an_in_band_error_has_openais_four_fields():
    """error_event carries message, type, code and a null param, with upstream_error as the default type."""
    payload = json.loads(event_data(error_event("boom")))
    assert payload == {"error": {"message": "boom", "type": "upstream_error", "code": None, "param": None}}
    coded = json.loads(event_data(error_event("slow", error_type="timeout", code="504")))
    assert coded["error"]["type"] == "timeout" and coded["error"]["code"] == "504"


def test_event_data_of_one_line_strips_only_the_space_after_the_colon():
    """A single data line's payload keeps its inner text, without the field name, leading space or line end."""
    assert event_data(b"data: [DONE]\n\n") == b"[DONE]"
    assert event_data(b"data:x y\n\n") == b"x y"
    assert event_data(b"id: 3\n\n") is None


def test_only_an_event_of_comments_is_a_comment():
    """Comment lines make a keep-alive; an event with a field that is not data is not a comment."""
    assert is_comment(b": ping\n\n")
    assert is_comment(b": a\n: b\n\n")
    assert not is_comment(b"retry: 1000\n\n")
    assert not is_comment(b": a\nid: 1\n\n")


async def test_a_crlf_split_across_pieces_is_one_line_end():
    """A CR ending one piece and the LF opening the next end one line, not two, so no extra event appears."""
    got = await events(b"data: a\r", b"\ndata: b\r\n\r", b"\ndata: c\n\n")
    assert got == [b"data: a\ndata: b\n\n", b"data: c\n\n"]


async def test_a_bom_split_across_pieces_is_dropped_and_a_false_start_given_back():
    """A BOM coming a byte at a time is dropped; bytes that looked like its start but were not are kept."""
    assert await events(BOM[:1], BOM[1:2], BOM[2:] + b"data: x\n\n") == [b"data: x\n\n"]
    assert await events(BOM[:2], b"Zdata: y\n\n") == [BOM[:2] + b"Zdata: y\n\n"]
    assert await events(b"data: z\n\n", BOM + b"data: w\n\n") == [b"data: z\n\n", BOM + b"data: w\n\n"]


async def test_a_cut_stream_yields_its_last_event_with_a_line_end():
    """A stream ending without its blank line yields its tail, ended with one LF so callers can parse it."""
    assert await events(b"data: a\n\ndata: b") == [b"data: a\n\n", b"data: b\n"]
    assert await events(b"data: a\n\n", b"\n\n") == [b"data: a\n\n"]


async def test_an_event_of_exactly_the_limit_passes_and_one_byte_more_fails():
    """max_event_bytes is inclusive, whether the event comes whole or in pieces."""
    line = b"data: " + b"x" * 10
    assert await events(line + b"\n\n", max_event_bytes=len(line)) == [line + b"\n\n"]
    assert await events(line[:8], line[8:], b"\n\n", max_event_bytes=len(line)) == [line + b"\n\n"]
    with pytest.raises(EventTooLong):
        await events(line + b"x\n\n", max_event_bytes=len(line))
    with pytest.raises(EventTooLong):
        await events(line[:8], line[8:] + b"x", max_event_bytes=len(line))


async def test_the_line_end_of_a_full_event_held_in_pieces_is_not_counted_against_the_limit():
    """An event of exactly the limit whose line end and blank line come in later pieces still passes."""
    line = b"data: " + b"x" * 10
    assert await events(line[:8], line[8:] + b"\n", b"\n", max_event_bytes=len(line)) == [line + b"\n\n"]
    assert await events(line + b"\n", b"\n", max_event_bytes=len(line)) == [line + b"\n\n"]
    after = await events(b"data: a\n\n" + line + b"\n", b"\n", max_event_bytes=len(line))
    assert after == [b"data: a\n\n", line + b"\n\n"]


# ---------------------------------------------------------------- what a reload cannot apply


def test_a_reload_names_the_restart_only_settings_it_changed():
    """Only RESTART_ONLY settings that differ (not equal ones reloaded anew) are named; singular/plural read right."""
    moved = dataclasses.replace(POLICY, ledger=LedgerSettings(path="/tmp/elsewhere.jsonl"))
    assert restart_only_changes(POLICY, POLICY) == ()
    assert restart_only_changes(POLICY, dataclasses.replace(POLICY, ledger=LedgerSettings())) == ()
    assert restart_only_changes(POLICY, moved) == ("ledger",)
    assert wait_for_restart(("ledger",)) == "ledger takes effect on restart"
    assert wait_for_restart(("ledger", "store")) == "ledger, store take effect on restart"


# ---------------------------------------------------------------- shared services


def test_only_tenants_with_a_budget_get_their_own_spend_label():
    """budgeted_tenants names a tenant with a day or month limit and leaves out one without."""
    policy = dataclasses.replace(POLICY, tenants={
        "acme": Tenant(name="acme", budget=Budget(usd_per_month=Decimal("10"))),
        "free": Tenant(name="free")})
    assert budgeted_tenants(policy) == ["acme"]


def test_the_default_encoding_is_loaded_even_when_no_model_uses_it():
    """policy_encodings always includes the prompt-counting default besides the models' own encodings."""
    policy = dataclasses.replace(POLICY, models={"small": dataclasses.replace(SMALL, encoding="cl100k_base")})
    assert policy_encodings(policy) == {"o200k_base", "cl100k_base"}


def test_tenant_settings_show_money_in_plain_notation():
    """_plain writes Decimal amounts without an exponent and leaves numbers, text and None as they are."""
    assert _plain(Budget(usd_per_day=Decimal("1E-7"))) == {
        "usd_per_day": "0.0000001", "usd_per_month": None, "on_exhausted": "reject"}
    assert _plain(Limits(requests_per_minute=60)) == {
        "requests_per_minute": 60, "tokens_per_minute": None, "concurrent": None}
