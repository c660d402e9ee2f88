"""Outcomes: cost per successful task, success and escalation rates.

Clients group the calls of one piece of work with `x-gateway-task-id` (and a
`x-gateway-workflow` name), then report how it went on `POST /v1/outcomes`.
Cost per successful task = the cost of every reported task of a group
(failures included: they were paid for too) / the number that succeeded.
Task and request ids are the client's own, so each tenant has its ids to
itself: another tenant using the same id books and reports its own task.

Two books keep them, with one interface (`Book`): `OutcomeBook` here, in this
process only, when no Redis is configured; `RedisOutcomeBook`
(gateway/outcomes_redis.py) in Redis, where every replica and worker books and
reports the same tasks. This module also holds what both share: the report's
validation, its errors, and the grouping of stats.
State is bounded: entries older than `ttl_s`, or (in process) past `max_entries`, are forgotten.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Protocol

from gateway.cost import plain_usd
from gateway.errors import ClientError, GatewayError, NotFound

OUTCOMES = ("success", "failure", "escalated")
#: the tenant of a caller of an open gateway (no tenants), as `RequestContext.tenant_name` names it
ANONYMOUS = "anonymous"
#: how long a task is remembered after its last request, by default
TTL_S = 24 * 3600
#: the largest `value_usd` a report may give (the shared book sums values as 64-bit integers)
MAX_VALUE_USD = Decimal(10) ** 12

#: where a task lives in the book: ("t", tenant, task id), or ("r", tenant, request id) for a request
#: without a task id; the tenant in the key keeps one tenant's ids apart from another's
Key = tuple[str, str, str]


class AlreadyReported(ClientError):
    status = 409
    code = "outcome_already_reported"


def unknown_id() -> NotFound:
    return NotFound("no task or request with that id is known (unknown, or older than the retention)",
                    code="unknown_id")


def already_reported(outcome: str) -> AlreadyReported:
    return AlreadyReported(f"an outcome was already reported for this task: {outcome}")


@dataclass(frozen=True)
class Report:
    """A valid `POST /v1/outcomes` body: the outcome, the task or request it judges, the value it produced."""

    outcome: str
    task_id: str | None
    request_id: str | None
    value_usd: Decimal | None


def parse_report(payload: object) -> Report:
    """The report in a `POST /v1/outcomes` body; a ClientError (400) naming the first thing wrong."""
    if not isinstance(payload, dict):
        raise ClientError("the body must be a JSON object")
    outcome = payload.get("outcome")
    if outcome not in OUTCOMES:
        raise ClientError(f"'outcome' must be one of {', '.join(OUTCOMES)}", param="outcome")
    task_id, request_id = (value if isinstance(value, str) and value else None
                           for value in (payload.get("task_id"), payload.get("request_id")))
    if task_id is None and request_id is None:
        raise ClientError("give 'task_id' or 'request_id' (a non-empty string)", param="task_id")
    return Report(outcome, task_id, request_id, _value_usd(payload.get("value_usd")))


def _value_usd(value: object) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_VALUE_USD:
        raise ClientError(f"'value_usd' must be a non-negative number, at most {MAX_VALUE_USD:f}",
                          param="value_usd")
    return Decimal(repr(value))


@dataclass
class Task:
    """The calls of one task (or one request without a task id), and their total cost."""

    route: str
    tenant: str
    workflow: str
    cost_usd: Decimal = Decimal(0)
    requests: int = 0
    outcome: str | None = None
    value_usd: Decimal | None = None
    seen_s: float = 0.0
    counted_usd: Decimal | None = None      # the cost the stats count: the task's when reported (a call that ends
                                            # later adds to the task, not to the stats, in either book)


@dataclass
class GroupStats:
    tasks: int = 0
    success: int = 0
    failure: int = 0
    escalated: int = 0
    cost_usd: Decimal = Decimal(0)
    value_usd: Decimal = Decimal(0)

    @classmethod
    def of(cls, task: Task) -> GroupStats:
        """The stats of one reported task."""
        cost_usd = task.counted_usd if task.counted_usd is not None else task.cost_usd
        stats = cls(tasks=1, cost_usd=cost_usd, value_usd=task.value_usd or Decimal(0))
        setattr(stats, task.outcome, 1)
        return stats

    def add(self, other: GroupStats) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        per_success = self.cost_usd / self.success if self.success else None
        return {"tasks": self.tasks, "success": self.success, "failure": self.failure,
                "escalated": self.escalated, "cost_usd": plain_usd(self.cost_usd),
                "cost_per_successful_task_usd": plain_usd(per_success) if per_success is not None else None,
                "success_rate": self.success / self.tasks if self.tasks else None,
                "escalation_rate": self.escalated / self.tasks if self.tasks else None,
                "value_usd": plain_usd(self.value_usd)}


#: a group of reported tasks: (route, tenant, workflow)
Group = tuple[str, str, str]


def summary(groups: Iterable[tuple[Group, GroupStats]]) -> dict:
    """The `/admin/stats` body: stats by route, by tenant and by workflow, from stats by (route, tenant, workflow)."""
    by: dict[str, dict[str, GroupStats]] = {"route": {}, "tenant": {}, "workflow": {}}
    for (route, tenant, workflow), stats in groups:
        for dimension, name in (("route", route), ("tenant", tenant), ("workflow", workflow)):
            by[dimension].setdefault(name, GroupStats()).add(stats)
    return {dimension: {name: s.as_dict() for name, s in sorted(named.items())}
            for dimension, named in by.items()}


class Book(Protocol):
    """What the gateway asks of an outcome book, in process or shared."""

    store_failures: int

    def track(self, *, request_id: str, task_id: str | None, route: str, tenant: str,
              workflow: str | None, cost_usd: Decimal, priced_late: bool = False) -> None:
        """Book one finished request's cost to its task; never raises, never waits. `priced_late`: `pricing`
        was told of it."""

    def pricing(self, *, request_id: str, task_id: str | None, tenant: str, for_s: float) -> None:
        """A finished request whose cost is still being priced, to be booked by `track` within `for_s`; never
        raises, never waits."""

    async def report(self, payload: object, *, tenant: str | None = None, pricing_s: float = 0.0) -> Task:
        """Set the outcome of one of the caller's tasks, once; the task as reported. `pricing_s`: the longest it
        waits for calls of that task still being priced."""

    async def stats(self) -> dict:
        """Reported tasks grouped by route, tenant and workflow."""

    async def close(self) -> None:
        """Finish the bookings under way."""


#: a request without a task id, until an outcome is reported for it: (route, tenant, workflow, cost_usd,
#: requests, seen_s). Immutable values only, so the garbage collector stops tracking the tuple: a book
#: of 100k requests adds nothing to full collections, where 100k Task objects would stall the loop.
RequestCost = tuple[str, str, str, Decimal, int, float]


@dataclass
class OutcomeBook:
    """Tasks and requests awaiting (or holding) a reported outcome, in this process, bounded in memory."""

    ttl_s: float = TTL_S
    max_entries: int = 100_000
    clock: Callable[[], float] = time.time
    tasks: OrderedDict[Key, Task | RequestCost] = field(default_factory=OrderedDict)
    #: (tenant, request id) -> (its task, when the request was booked), oldest booking first: a pointer is kept
    #: ttl_s after its request, as the shared book's expires
    request_tasks: OrderedDict[tuple[str, str], tuple[Key, float]] = field(default_factory=OrderedDict)
    store_failures: int = 0             # it has no store to fail

    def track(self, *, request_id: str, task_id: str | None, route: str, tenant: str,
              workflow: str | None, cost_usd: Decimal, priced_late: bool = False) -> None:
        """Add one finished request's cost to its task (a request without a task is its own)."""
        now_s = self.clock()
        if not task_id:
            key = ("r", tenant, request_id)
            seen = self.tasks.get(key)       # a client may reuse its x-request-id
            if seen is not None:
                seen = self._task(key)
                seen.cost_usd += cost_usd
                seen.requests += 1
                seen.seen_s = now_s
            else:
                self.tasks[key] = (route, tenant, workflow or "-", cost_usd, 1, now_s)
        else:
            key = ("t", tenant, task_id)
            task = self.tasks.get(key)
            if task is None:
                task = self.tasks[key] = Task(route=route, tenant=tenant, workflow=workflow or "-")
            task.cost_usd += cost_usd
            task.requests += 1
            task.seen_s = now_s
            self.request_tasks[tenant, request_id] = (key, now_s)
            self.request_tasks.move_to_end((tenant, request_id))
        self.tasks.move_to_end(key)
        self._trim()

    def _task(self, key: Key) -> Task:
        """The entry under `key` as a Task, made one from a request's compact record if need be."""
        entry = self.tasks[key]
        if isinstance(entry, Task):
            return entry
        route, tenant, workflow, cost_usd, requests, seen_s = entry
        task = self.tasks[key] = Task(route=route, tenant=tenant, workflow=workflow, cost_usd=cost_usd,
                                      requests=requests, seen_s=seen_s)
        return task

    def pricing(self, *, request_id: str, task_id: str | None, tenant: str, for_s: float) -> None:
        """Nothing to do: this process's reports wait for its own requests being priced (`app._priced`)."""

    async def report(self, payload: object, *, tenant: str | None = None, pricing_s: float = 0.0) -> Task:
        """Record an outcome from a `POST /v1/outcomes` body for one of the caller's own tasks.

        `tenant`: the caller, None for an anonymous one; only its own ids are looked up. `pricing_s`: unused (the
        requests this process is pricing are waited for before, by `app._priced`).
        """
        report = parse_report(payload)
        self._trim()                    # an entry past ttl_s is unknown, even when no request came since
        key = self._key(report, tenant or ANONYMOUS)
        if key not in self.tasks:
            raise unknown_id()
        task = self._task(key)
        if task.outcome is not None:
            raise already_reported(task.outcome)
        task.outcome = report.outcome
        task.value_usd = report.value_usd
        task.counted_usd = task.cost_usd
        return task

    def _key(self, report: Report, tenant: str) -> Key:
        if report.task_id is not None:
            return ("t", tenant, report.task_id)
        pointer = self.request_tasks.get((tenant, report.request_id))
        return pointer[0] if pointer is not None else ("r", tenant, report.request_id)

    async def stats(self) -> dict:
        """Reported tasks grouped by route, tenant and workflow (those booked in the last ttl_s)."""
        self._trim()
        return summary(((task.route, task.tenant, task.workflow), GroupStats.of(task))
                       for task in self.tasks.values() if isinstance(task, Task) and task.outcome is not None)

    async def close(self) -> None:
        return None

    def _trim(self) -> None:
        cutoff_s = self.clock() - self.ttl_s
        while self.tasks:
            key, task = next(iter(self.tasks.items()))
            seen_s = task.seen_s if isinstance(task, Task) else task[-1]
            if len(self.tasks) <= self.max_entries and seen_s >= cutoff_s:
                break
            del self.tasks[key]
        while self.request_tasks:
            _, booked_s = next(iter(self.request_tasks.values()))
            if len(self.request_tasks) <= self.max_entries * 4 and booked_s >= cutoff_s:
                break
            self.request_tasks.popitem(last=False)


__all__ = ["OutcomeBook", "AlreadyReported", "Book", "GatewayError"]
