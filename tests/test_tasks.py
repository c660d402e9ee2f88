"""Background work: kept referenced, its failures logged, and drained at exit."""

from __future__ import annotations

import asyncio
import time

from gateway.tasks import BackgroundTasks


async def test_drain_waits_for_work_spawned_while_it_drains():
    """A task started by a task being drained (a flush that books more) is waited for too."""
    background = BackgroundTasks()
    finished: list[str] = []

    async def then(name: str, next_name: str | None = None) -> None:
        await asyncio.sleep(0.02)
        if next_name:
            background.spawn(then(next_name), name=next_name)
        finished.append(name)

    background.spawn(then("first", "second"), name="first")
    await background.drain(timeout_s=5.0)
    assert finished == ["first", "second"] and len(background) == 0


async def test_drain_keeps_one_deadline_for_work_that_keeps_coming():
    """Work that spawns more forever is cancelled when the one deadline passes, not waited for round after round."""
    background = BackgroundTasks()

    async def forever() -> None:
        await asyncio.sleep(0.01)
        background.spawn(forever(), name="forever")

    background.spawn(forever(), name="forever")
    started_s = time.monotonic()
    await background.drain(timeout_s=0.2)
    assert time.monotonic() - started_s < 0.5 and len(background) == 0
