"""Background work kept referenced and awaited on shutdown, never a stray task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

log = logging.getLogger("gateway")


class BackgroundTasks:
    """Runs work off the response path (cache writes, ledger, accounting) and drains it at exit."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine, *, name: str | None = None) -> asyncio.Task:
        """Start `coro` in the background; its failure is logged, never lost."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed: %r", task.get_name(), exc, exc_info=exc)   # where, too

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float) -> None:
        """Wait for running work, and the work it starts meanwhile (a flush, say), up to `timeout_s` in all; then
        cancel what is left, said at WARNING by name."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        while self._tasks and (left_s := deadline_s - loop.time()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left_s)
        while self._tasks:
            pending = set(self._tasks)
            log.warning("%d background task(s) still running after %g s, cancelled: %s", len(pending), timeout_s,
                        ", ".join(sorted(task.get_name() for task in pending)))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
