"""Outcomes: cost per successful task, success and escalation rates.

Clients group the calls of one piece of work with `x-gateway-task-id` (and a
`x-gateway-workflow` name), then report how it went on `POST /v1/outcomes`.
Cost per successful task = the cost of every reported task of a group
(failures included: they were paid for too) / the number that succeeded.
State is bounded: entries older than `ttl_s`, or past `max_entries`, are forgotten.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from gateway.cost import plain_usd
from gateway.errors import ClientError, GatewayError, NotFound

OUTCOMES = ("success", "failure", "escalated")


class AlreadyReported(ClientError):
    status = 409
    code = "outcome_already_reported"


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


@dataclass
class GroupStats:
    tasks: int = 0
    success: int = 0
    failure: int = 0
    escalated: int = 0
    cost_usd: Decimal = Decimal(0)
    value_usd: Decimal = Decimal(0)

    def add(self, task: Task) -> None:
        self.tasks += 1
        setattr(self, task.outcome, getattr(self, task.outcome) + 1)
        self.cost_usd += task.cost_usd
        self.value_usd += task.value_usd or 0

    def as_dict(self) -> dict:
        per_success = self.cost_usd / self.success if self.success else None
        return {"tasks": self.tasks, "success": self.success, "failure": self.failure,
                "escalated": self.escalated, "cost_usd": plain_usd(self.cost_usd),
                "cost_per_successful_task_usd": plain_usd(per_success) if per_success is not None else None,
                "success_rate": self.success / self.tasks if self.tasks else None,
                "escalation_rate": self.escalated / self.tasks if self.tasks else None,
                "value_usd": plain_usd(self.value_usd)}


#: a request without a task id, until an outcome is reported for it: (route, tenant, workflow, cost_usd,
#: requests, seen_s). Immutable values only, so the garbage collector stops tracking the tuple: a book
#: of 100k requests adds nothing to full collections, where 100k Task objects would stall the loop.
RequestCost = tuple[str, str, str, Decimal, int, float]


@dataclass
class OutcomeBook:
    """Tasks and requests awaiting (or holding) a reported outcome, bounded in memory."""

    ttl_s: float = 24 * 3600
    max_entries: int = 100_000
    clock: Callable[[], float] = time.time
    tasks: OrderedDict[str, Task | RequestCost] = field(default_factory=OrderedDict)
    request_tasks: OrderedDict[str, str] = field(default_factory=OrderedDict)     # request id -> "t:" key

    def track(self, *, request_id: str, task_id: str | None, route: str, tenant: str,
              workflow: str | None, cost_usd: Decimal) -> None:
        """Add one finished request's cost to its task (a request without a task is its own)."""
        now_s = self.clock()
        if not task_id:
            key = f"r:{request_id}"
            seen = self.tasks.get(key)       # a client may reuse its x-request-id
            if seen is not None:
                seen = self._task(key)
                seen.cost_usd += cost_usd
                seen.requests += 1
                seen.seen_s = now_s
            else:
                self.tasks[key] = (route, tenant, workflow or "-", cost_usd, 1, now_s)
        else:
            key = f"t:{task_id}"
            task = self.tasks.get(key)
            if task is None:
                task = self.tasks[key] = Task(route=route, tenant=tenant, workflow=workflow or "-")
            task.cost_usd += cost_usd
            task.requests += 1
            task.seen_s = now_s
            self.request_tasks[request_id] = key
        self.tasks.move_to_end(key)
        self._trim()

    def _task(self, key: str) -> Task:
        """The entry under `key` as a Task, made one from a request's compact record if need be."""
        entry = self.tasks[key]
        if isinstance(entry, Task):
            return entry
        route, tenant, workflow, cost_usd, requests, seen_s = entry
        task = self.tasks[key] = Task(route=route, tenant=tenant, workflow=workflow, cost_usd=cost_usd,
                                      requests=requests, seen_s=seen_s)
        return task

    def report(self, payload: object, *, tenant: str | None = None) -> Task:
        """Record an outcome from a `POST /v1/outcomes` body (only for the caller's own tasks)."""
        if not isinstance(payload, dict):
            raise ClientError("the body must be a JSON object")
        outcome = payload.get("outcome")
        if outcome not in OUTCOMES:
            raise ClientError(f"'outcome' must be one of {', '.join(OUTCOMES)}", param="outcome")
        key = self._key(payload)
        task = self._task(key) if key in self.tasks else None
        if task is None or tenant is not None and task.tenant != tenant:
            raise NotFound("no task or request with that id is known (unknown, or older than the retention)",
                           code="unknown_id")
        if task.outcome is not None:
            raise AlreadyReported(f"an outcome was already reported for this task: {task.outcome}")
        value_usd = _value_usd(payload.get("value_usd"))      # a bad value leaves the task unreported
        task.outcome = outcome
        task.value_usd = value_usd
        return task

    def _key(self, payload: dict) -> str:
        task_id, request_id = payload.get("task_id"), payload.get("request_id")
        if isinstance(task_id, str) and task_id:
            return f"t:{task_id}"
        if isinstance(request_id, str) and request_id:
            return self.request_tasks.get(request_id, f"r:{request_id}")
        raise ClientError("give 'task_id' or 'request_id' (a non-empty string)", param="task_id")

    def stats(self) -> dict:
        """Reported tasks grouped by route, tenant and workflow."""
        groups: dict[str, dict[str, GroupStats]] = {"route": {}, "tenant": {}, "workflow": {}}
        for task in self.tasks.values():
            if not isinstance(task, Task) or task.outcome is None:
                continue
            for dimension, name in (("route", task.route), ("tenant", task.tenant), ("workflow", task.workflow)):
                groups[dimension].setdefault(name, GroupStats()).add(task)
        return {dimension: {name: s.as_dict() for name, s in sorted(by.items())}
                for dimension, by in groups.items()}

    def _trim(self) -> None:
        cutoff_s = self.clock() - self.ttl_s
        while self.tasks:
            key, task = next(iter(self.tasks.items()))
            seen_s = task.seen_s if isinstance(task, Task) else task[-1]
            if len(self.tasks) <= self.max_entries and seen_s >= cutoff_s:
                break
            del self.tasks[key]
        while len(self.request_tasks) > self.max_entries * 4:
            self.request_tasks.popitem(last=False)


def _value_usd(value: object) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ClientError("'value_usd' must be a non-negative number", param="value_usd")
    return Decimal(repr(value))


__all__ = ["OutcomeBook", "AlreadyReported", "GatewayError"]
