"""Call slots per model: at most `max_concurrency` calls of this process on a model, the rest wait by priority.

Used when `routing.queue_timeout_ms` is set. A call takes a slot at once
while the model has fewer than `max_concurrency` calls in flight and nobody
is waiting; otherwise it waits, highest tenant priority first and first come
first within a priority, until a call ends and hands its slot on, or until
its deadline (then `ModelBusy`, and the request moves to the next model of
its plan). A waiter that leaves (deadline, client gone) is taken out of the
line at once; a slot granted to one that left as it was granted is handed
on. The slots are this process's own: N gateway processes may have up to
N × max_concurrency calls on a model.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import ModelBusy
from gateway.policy.model import Model


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]                   # (-priority, arrival): the smallest is served first
    granted: asyncio.Future = field(compare=False)


class _ModelSlots:
    __slots__ = ("limit", "busy", "line")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self.line: list[_Waiter] = []       # a heap


class Slots:
    """Every model's call slots in this process."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelSlots] = {}
        #: the slots of servers a reload moved a model from while calls still held or waited for them, by (name,
        #: server): a reload that moves the model back finds its calls there
        self._parked: dict[tuple, _ModelSlots] = {}
        self._arrivals = itertools.count()

    def configure(self, models: Mapping[str, Model], moved: Mapping[str, tuple[tuple, tuple]] | None = None) -> None:
        """Each model's slots from the current policy's max_concurrency (at start and on each reload): a raise
        lets waiters in now; a cut takes effect as calls end. Calls still on an older policy version do not
        change them. A model `moved` (name: (old server, new server)) gets the new server's slots: the calls to
        its old server (and those waiting for them) end on the old ones, and do not hold the new server's; a model
        moved back to a server its calls still hold takes those slots again."""
        moved = moved or {}
        self._parked = {key: slots for key, slots in self._parked.items() if slots.busy or slots.line}
        for name, model in models.items():
            limit = max(1, model.max_concurrency)
            if name in moved:
                left, now = moved[name]
                slots = self._models.pop(name, None)
                if slots is not None and (slots.busy or slots.line):
                    self._parked[(name, left)] = slots
                if (back := self._parked.pop((name, now), None)) is not None:
                    self._models[name] = back
            slots = self._models.get(name)
            if slots is None:
                self._models[name] = _ModelSlots(limit)
            elif slots.limit != limit:
                slots.limit = limit
                self._grant(slots)

    def _slots(self, name: str, limit: int) -> _ModelSlots:
        slots = self._models.get(name)
        if slots is None:                   # a model the last configure did not name
            slots = self._models[name] = _ModelSlots(max(1, limit))
        return slots

    def pool(self, name: str, limit: int) -> _ModelSlots:
        """Model `name`'s slots now: pass them to `take` and `give_back`, so a call ends on the slots it took
        whatever a reload did meanwhile."""
        return self._slots(name, limit)

    async def take(self, name: str, limit: int, priority: int, timeout_s: float,
                   pool: _ModelSlots | None = None) -> float:
        """Take a call slot on model `name` (at most `limit` in flight), waiting up to `timeout_s`; returns the
        seconds waited. ModelBusy when none came in time; cancellation leaves the line. `limit` applies only to
        a model `configure` has not named; `pool`: the slots to take from (`pool`), else the model's now."""
        slots = pool if pool is not None else self._slots(name, limit)
        if slots.busy < slots.limit and not slots.line:
            slots.busy += 1
            return 0.0
        loop = asyncio.get_running_loop()
        waiter = _Waiter((-priority, next(self._arrivals)), loop.create_future())
        heapq.heappush(slots.line, waiter)
        started_s = loop.time()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(waiter.granted)
        except BaseException as exc:
            self._leave(slots, waiter)
            if isinstance(exc, TimeoutError):
                raise ModelBusy(f"model '{name}' is busy: no call slot within {timeout_s * 1000:g} ms "
                                f"({slots.busy} calls in flight, {len(slots.line)} waiting)") from None
            raise
        return loop.time() - started_s

    def give_back(self, name: str, pool: _ModelSlots | None = None) -> None:
        """A call that held a slot on model `name` (of `pool`, when given) ended: the first waiter in line gets
        it."""
        slots = pool if pool is not None else self._models.get(name)
        if slots is None or slots.busy <= 0:
            return
        slots.busy -= 1
        self._grant(slots)

    def waiting(self, name: str) -> int:
        """Calls waiting for a slot on model `name`."""
        slots = self._models.get(name)
        return len(slots.line) if slots is not None else 0

    def waiting_by_model(self) -> dict[str, int]:
        """Calls waiting for a slot, per model known here (read from the metrics thread: one atomic copy)."""
        return {name: len(slots.line) for name, slots in list(self._models.items())}

    def busy(self, name: str) -> int:
        """Slots of model `name` held now."""
        slots = self._models.get(name)
        return slots.busy if slots is not None else 0

    def _leave(self, slots: _ModelSlots, waiter: _Waiter) -> None:
        """A waiter gave up: out of the line, or, if the slot was granted meanwhile, the slot handed on."""
        granted = waiter.granted
        if granted.done() and not granted.cancelled():
            if slots.busy > 0:
                slots.busy -= 1
                self._grant(slots)
            return
        granted.cancel()
        try:
            slots.line.remove(waiter)
        except ValueError:
            return
        heapq.heapify(slots.line)

    @staticmethod
    def _grant(slots: _ModelSlots) -> None:
        while slots.line and slots.busy < slots.limit:
            waiter = heapq.heappop(slots.line)
            if waiter.granted.done():       # already settled: a slot is granted once, and only to a live waiter
                continue
            slots.busy += 1
            waiter.granted.set_result(None)
