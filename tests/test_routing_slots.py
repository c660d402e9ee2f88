"""Call slots: at most max_concurrency calls a model, the rest wait by tenant priority, then first come."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ModelBusy
from gateway.policy.model import Model
from gateway.routing.slots import Slots


def limits(**max_concurrency: int) -> dict[str, Model]:
    """Models by name with these max_concurrency, as a policy gives them to `Slots.configure`."""
    return {name: Model(name, "http://127.0.0.1:1/v1", name, max_concurrency=limit)
            for name, limit in max_concurrency.items()}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def wait_in_line(slots: Slots, served: list[str], name: str, priority: int) -> None:
    """Take a slot of model m (one slot) at `priority`, waiting up to 5 s; then add `name` to `served`."""
    await slots.take("m", 1, priority, 5.0)
    served.append(name)


async def test_slots_are_taken_at_once_up_to_the_limit():
    slots = Slots()
    assert [await slots.take("m", 2, 1, 1.0) for _ in range(2)] == [0.0, 0.0]
    assert slots.busy("m") == 2 and slots.waiting("m") == 0


async def test_waiters_are_served_highest_priority_first_then_first_come():
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    served: list[str] = []
    tasks = []
    for name, priority in (("batch-1", 0), ("normal-1", 1), ("urgent", 9), ("normal-2", 1), ("batch-2", 0)):
        tasks.append(asyncio.create_task(wait_in_line(slots, served, name, priority)))
        await settle()
    assert slots.waiting("m") == 5
    for _ in range(5):
        slots.give_back("m")
        await settle()
    await asyncio.gather(*tasks)
    assert served == ["urgent", "normal-1", "normal-2", "batch-1", "batch-2"]
    assert slots.busy("m") == 1 and slots.waiting("m") == 0


async def test_a_newcomer_does_not_jump_a_line_while_slots_are_all_taken():
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    waiter = asyncio.create_task(slots.take("m", 1, 1, 5.0))
    await settle()
    slots.give_back("m")                     # the slot goes to the waiter, not to whoever asks next
    late = asyncio.create_task(slots.take("m", 1, 1, 0.05))
    assert await waiter > 0
    with pytest.raises(ModelBusy):
        await late


async def test_a_waiter_past_its_deadline_gets_model_busy_and_leaves_the_line():
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    with pytest.raises(ModelBusy, match=r"model 'm' is busy: no call slot within 50 ms \(1 calls in flight"):
        await slots.take("m", 1, 1, 0.05)
    assert slots.waiting("m") == 0
    slots.give_back("m")
    assert slots.busy("m") == 0
    assert await slots.take("m", 1, 1, 0.05) == 0.0


async def test_a_waiter_keeps_its_place_until_its_deadline_in_seconds():
    """timeout_s is in seconds: a waiter with 5 s to wait still gets the slot handed back 0.1 s later, and is told
    it waited that long."""
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    waiter = asyncio.create_task(slots.take("m", 1, 1, 5.0))
    await asyncio.sleep(0.1)
    slots.give_back("m")
    assert await waiter >= 0.09
    assert slots.busy("m") == 1


async def one_held_two_waiting() -> tuple[Slots, asyncio.Task, asyncio.Task]:
    """Model m's one slot held; in line, a priority 5 waiter, then a priority 1 one."""
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    first = asyncio.create_task(slots.take("m", 1, 5, 5.0))
    await settle()
    second = asyncio.create_task(slots.take("m", 1, 1, 5.0))
    await settle()
    return slots, first, second


async def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_is_served():
    slots, first, second = await one_held_two_waiting()
    first.cancel()                           # the client left
    await settle()
    assert slots.waiting("m") == 1
    slots.give_back("m")
    await second
    assert first.cancelled() and slots.busy("m") == 1


async def test_a_slot_granted_to_a_waiter_that_left_at_that_moment_is_handed_on():
    slots, first, second = await one_held_two_waiting()
    slots.give_back("m")                     # granted to `first`, which is cancelled before it runs again
    first.cancel()
    await settle()
    await second
    assert first.cancelled()
    assert slots.busy("m") == 1 and slots.waiting("m") == 0


async def test_a_models_max_concurrency_from_the_policy_caps_its_slots_from_the_start():
    """A model `configure` names with max_concurrency 1 takes one call at once and makes the next wait, whatever
    limit a call asks with."""
    slots = Slots()
    slots.configure(limits(m=1))
    assert await slots.take("m", 64, 1, 1.0) == 0.0
    with pytest.raises(ModelBusy):
        await slots.take("m", 64, 1, 0.01)


async def test_a_raised_limit_lets_waiters_in_at_once():
    slots = Slots()
    slots.configure(limits(m=1))
    await slots.take("m", 1, 1, 1.0)
    waiter = asyncio.create_task(slots.take("m", 1, 1, 5.0))
    await settle()
    slots.configure(limits(m=3))                # a reload raised max_concurrency to 3
    await waiter
    assert await slots.take("m", 1, 1, 1.0) == 0.0     # a call still on the old policy version asks with 1
    assert slots.busy("m") == 3


async def test_a_cut_limit_takes_effect_as_calls_end():
    slots = Slots()
    slots.configure(limits(m=2))
    await slots.take("m", 2, 1, 1.0)
    await slots.take("m", 2, 1, 1.0)
    slots.configure(limits(m=1))
    waiter = asyncio.create_task(slots.take("m", 1, 1, 5.0))
    slots.give_back("m")                     # 1 held, the new limit: the waiter still waits
    await settle()
    assert not waiter.done() and slots.busy("m") == 1
    slots.give_back("m")
    await waiter
    assert slots.busy("m") == 1


async def test_giving_back_more_than_was_taken_never_goes_below_zero():
    slots = Slots()
    slots.give_back("unknown")
    await slots.take("m", 1, 1, 1.0)
    slots.give_back("m")
    slots.give_back("m")
    assert slots.busy("m") == 0


async def test_a_settled_waiter_left_in_line_is_passed_over_not_granted_twice():
    """Were a waiter's future settled while it is still in line (say cancelled from outside), the slot goes to
    the next live waiter; it is never counted for the settled one, nor set twice."""
    slots, first, second = await one_held_two_waiting()
    slots._models["m"].line[0].granted.cancel()          # the priority 5 waiter's future, settled in place
    slots.give_back("m")
    await second
    assert slots.busy("m") == 1 and slots.waiting("m") == 0
    first.cancel()
    await settle()


async def test_a_cancelled_waiter_leaves_the_rest_of_the_line_in_order():
    """Taking a waiter out of the middle of the line keeps first come first served among those left."""
    slots = Slots()
    await slots.take("m", 1, 1, 1.0)
    served: list[str] = []
    tasks = {}
    for name, priority in (("first", 0), ("second", 0), ("urgent", 1)):
        tasks[name] = asyncio.create_task(wait_in_line(slots, served, name, priority))
        await settle()
    tasks["urgent"].cancel()                 # the client left
    await settle()
    for _ in range(2):
        slots.give_back("m")
        await settle()
    await asyncio.gather(tasks["first"], tasks["second"])
    assert served == ["first", "second"]


async def test_waiting_by_model_counts_the_calls_in_line_not_those_holding_slots():
    """The metrics read the line's length per model: held slots are not waiting calls."""
    slots = Slots()
    slots.configure(limits(m=2, idle=1))
    await slots.take("m", 2, 1, 1.0)
    await slots.take("m", 2, 1, 1.0)
    waiter = asyncio.create_task(slots.take("m", 2, 1, 5.0))
    await settle()
    assert slots.waiting_by_model() == {"m": 1, "idle": 0}
    waiter.cancel()
    await settle()
    assert slots.waiting_by_model() == {"m": 0, "idle": 0}
