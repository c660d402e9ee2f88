"""Background work: kept referenced, its failures logged, and drained at exit."""

from __future__ import annotations

import asyncio
import logging
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


async def test_work_cancelled_at_the_drain_deadline_is_not_logged_as_a_failure(caplog):
    """A task the drain cancels is said once, in the drain's WARNING, not again as a failed task or as an
    error in its done callback."""
    background = BackgroundTasks()
    background.spawn(asyncio.sleep(30), name="budget-charge")
    with caplog.at_level(logging.INFO):
        await background.drain(timeout_s=0.05)
        await asyncio.sleep(0.01)                   # any callback still due has run
    assert [record.levelname for record in caplog.records] == ["WARNING"], caplog.text


async def test_work_started_just_before_the_drain_deadline_is_not_given_a_whole_new_timeout():
    """Work spawned late in the drain gets only what is left of timeout_s, so the drain ends at its deadline
    rather than up to twice timeout_s after it began."""
    background = BackgroundTasks()

    async def then_hang() -> None:
        await asyncio.sleep(1.8)
        background.spawn(asyncio.sleep(30), name="late-flush")

    background.spawn(then_hang(), name="flush")
    started_s = time.monotonic()
    await background.drain(timeout_s=2.0)
    assert time.monotonic() - started_s < 3.2 and len(background) == 0     # 2 s, not 1.8 + 2 s


async def test_a_failed_background_task_is_logged_at_error_with_its_name(caplog):
    """Work off the response path that raises (a ledger write, a budget charge) is said at ERROR, named, with
    its traceback: never lost silently."""
    background = BackgroundTasks()

    async def fails() -> None:
        raise RuntimeError("disk full")

    with caplog.at_level(logging.INFO):
        background.spawn(fails(), name="ledger-write")
        await background.drain(timeout_s=5.0)
    [said] = caplog.records
    assert said.levelname == "ERROR" and said.exc_info and "ledger-write" in said.getMessage(), caplog.text


async def test_the_drain_warning_names_each_task_it_cancels(caplog):
    """The warning of a drain that runs out names the work it cancelled, so an SRE knows what was lost at exit."""
    background = BackgroundTasks()
    background.spawn(asyncio.sleep(30), name="cache-write")
    background.spawn(asyncio.sleep(30), name="budget-charge")
    with caplog.at_level(logging.WARNING):
        await background.drain(timeout_s=0.05)
    said = [record.getMessage() for record in caplog.records]
    assert said == ["2 background task(s) still running after 0.05 s, cancelled: budget-charge, cache-write"], said


async def test_work_a_cancelled_task_starts_as_it_ends_is_cancelled_too():
    """A task the drain cancels that starts more work as it ends (a release in its finally) leaves nothing
    running once the drain returns."""
    background = BackgroundTasks()

    async def charge_then_release() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            background.spawn(asyncio.sleep(30), name="release")

    background.spawn(charge_then_release(), name="charge")
    await background.drain(timeout_s=0.05)
    assert len(background) == 0
