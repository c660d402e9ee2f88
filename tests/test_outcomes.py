"""The outcome book: requests and tasks tracked compactly, reported, grouped and forgotten on time."""

from __future__ import annotations

import gc
from decimal import Decimal

import pytest

from gateway.errors import NotFound
from gateway.outcomes import AlreadyReported, OutcomeBook


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def track(book: OutcomeBook, request_id: str, cost: str, task_id: str | None = None, tenant: str = "acme") -> None:
    book.track(request_id=request_id, task_id=task_id, route="chat", tenant=tenant, workflow=None,
               cost_usd=Decimal(cost))


def test_a_request_without_a_task_is_reported_by_its_id():
    """A request is its own task: reporting its request id books its cost under the outcome."""
    book = OutcomeBook()
    track(book, "r1", "0.25")
    track(book, "r2", "0.50")
    book.report({"request_id": "r1", "outcome": "success"})
    book.report({"request_id": "r2", "outcome": "failure"})
    route = book.stats()["route"]["chat"]
    assert (route["tasks"], route["success"], route["cost_usd"]) == (2, 1, "0.75")
    assert route["cost_per_successful_task_usd"] == "0.75"
    with pytest.raises(AlreadyReported):
        book.report({"request_id": "r1", "outcome": "success"})


def test_a_reused_request_id_adds_up_and_tasks_group_their_requests():
    """Two requests under one x-request-id add up; a task id groups requests, found by any of their ids."""
    book = OutcomeBook()
    track(book, "same", "0.10")
    track(book, "same", "0.20")
    track(book, "a", "1", task_id="job")
    track(book, "b", "2", task_id="job")
    book.report({"request_id": "same", "outcome": "success"})
    book.report({"request_id": "b", "outcome": "escalated"})
    assert book.stats()["tenant"]["acme"]["cost_usd"] == "3.3"
    assert book.stats()["tenant"]["acme"]["escalated"] == 1


def test_unreported_requests_are_not_followed_by_the_garbage_collector():
    """An unreported request's record holds only immutable values, so full collections skip it."""
    book = OutcomeBook()
    for index in range(1000):
        track(book, f"r{index}", "0.001")
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in book.tasks.values())


def test_entries_are_forgotten_by_age_and_count_and_only_the_tenant_may_report():
    """Past ttl_s or max_entries the oldest go; another tenant cannot report a task it does not own."""
    clock = Clock()
    book = OutcomeBook(ttl_s=60, max_entries=3, clock=clock)
    for index in range(5):
        track(book, f"r{index}", "0.01")
    assert list(book.tasks) == ["r:r2", "r:r3", "r:r4"]
    clock.now_s += 61
    track(book, "late", "0.01", task_id="job")
    assert list(book.tasks) == ["t:job"]
    with pytest.raises(NotFound):
        book.report({"request_id": "r4", "outcome": "success"})
    with pytest.raises(NotFound):
        book.report({"task_id": "job", "outcome": "success"}, tenant="globex")
    assert book.report({"task_id": "job", "outcome": "success"}, tenant="acme").outcome == "success"
