"""Budget periods and fresh ids, computed cheaply, still mean what they meant."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp.test_utils import make_mocked_request

from gateway.app import request_id
from gateway.tenancy.budgets import Periods
from gateway.tenancy.limits import new_ticket


def unix_s(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()


def test_periods_at_the_edges_of_a_day_and_a_month():
    """The last microsecond of 31 January is in January; its next instant starts 1 February."""
    last = Periods.at(unix_s(2025, 1, 31, 23, 59, 59) + 0.999999)
    first = Periods.at(unix_s(2025, 2, 1))
    assert (last.day, last.month) == ("2025-01-31", "2025-01")
    assert last.day_end_s == last.month_end_s == unix_s(2025, 2, 1)
    assert (first.day, first.month, first.day_end_s) == ("2025-02-01", "2025-02", unix_s(2025, 2, 2))
    assert first.month_end_s == unix_s(2025, 3, 1)


def test_periods_of_a_leap_day_and_a_year_end():
    """29 February 2024 ends on 1 March; 31 December ends the month on 1 January."""
    leap = Periods.at(unix_s(2024, 2, 29, 12))
    assert (leap.day, leap.day_end_s, leap.month_end_s) == ("2024-02-29", unix_s(2024, 3, 1), unix_s(2024, 3, 1))
    assert Periods.at(unix_s(2024, 12, 31, 8)).month_end_s == unix_s(2025, 1, 1)


def test_fresh_request_ids_and_tickets_are_unique_hex():
    """Generated request ids (32 hex digits) and admission tickets (16) do not repeat."""
    request = make_mocked_request("POST", "/v1/chat/completions")
    ids = {request_id(request) for _ in range(10_000)}
    tickets = {new_ticket() for _ in range(10_000)}
    assert len(ids) == len(tickets) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tickets)


def test_a_sane_caller_request_id_is_kept():
    """A caller's own x-request-id passes through unchanged."""
    request = make_mocked_request("POST", "/v1/chat/completions", headers={"x-request-id": "abc-123"})
    assert request_id(request) == "abc-123"
