"""Image slots shared between API keys, waits bounded by the budget (issue 27)."""

from __future__ import annotations

import asyncio

import pytest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.slots import FairSlots


def run(coro):
    return asyncio.run(coro)


async def _pending(slots: FairSlots, key: str) -> asyncio.Task[None]:
    """A request for a slot that waits (asserted: it is queued, not granted)."""
    task = asyncio.ensure_future(slots.acquire(key))
    await asyncio.sleep(0)  # one turn of the loop: it reaches its wait
    assert not task.done()
    return task


def test_one_key_holds_at_most_its_share_and_the_rest_stay_for_others():
    async def main() -> None:
        slots = FairSlots(4, keys=3)
        for _ in range(2):
            await slots.acquire("heavy")
        waiting = await _pending(slots, "heavy")  # a third: beyond its share
        await slots.acquire("light", wait_s=0)  # taken at once: no wait at all
        await slots.acquire("light", wait_s=0)
        assert slots.held == {"heavy": 2, "light": 2} and slots.free == 0
        slots.release("light")
        await asyncio.sleep(0)
        assert not waiting.done() and slots.free == 1  # still beyond heavy's share
        waiting.cancel()
    run(main())


def test_a_freed_slot_goes_to_the_waiting_key_that_holds_fewest():
    async def main() -> None:
        slots = FairSlots(4, keys=3)
        for key in ("a", "a", "b", "b"):
            await slots.acquire(key)
        first = await _pending(slots, "a")  # asked first...
        second = await _pending(slots, "c")  # ...but c holds nothing
        slots.release("b")
        await second
        assert not first.done()
        assert slots.held == {"a": 2, "b": 1, "c": 1}
        slots.release("a")
        await first
        assert slots.held == {"a": 2, "b": 1, "c": 1}
    run(main())


def test_without_other_keys_a_key_may_use_every_slot():
    async def main() -> None:
        slots = FairSlots(3, keys=1)
        for _ in range(3):
            await slots.acquire("only", wait_s=0)
        assert slots.free == 0
    run(main())


def test_a_wait_past_the_budget_is_refused_overloaded_and_leaves_nothing_behind():
    async def main() -> None:
        slots = FairSlots(1, keys=2)
        await slots.acquire("heavy")
        with pytest.raises(ApiError) as now:
            await slots.acquire("light", wait_s=0)  # no room in its budget: at once
        with pytest.raises(ApiError) as later:
            await slots.acquire("light", wait_s=0.01)  # none freed within it
        assert now.value.code is later.value.code is ErrorCode.OVERLOADED
        slots.release("heavy")
        assert slots.free == 1 and not slots.held  # no slot went to a gone waiter
        await slots.acquire("light", wait_s=0)
    run(main())


def test_a_cancelled_waiter_loses_no_slot():
    async def main() -> None:
        slots = FairSlots(1, keys=3)
        await slots.acquire("a")
        gone = await _pending(slots, "b")
        granted = await _pending(slots, "c")
        later = await _pending(slots, "d")
        gone.cancel()  # before any slot frees
        await asyncio.gather(gone, return_exceptions=True)
        slots.release("a")  # to c, the next; c is cancelled as the grant lands
        granted.cancel()
        outcome = (await asyncio.gather(granted, return_exceptions=True))[0]
        if outcome is None:  # it had its slot already (asyncio.wait_for keeps it)
            slots.release("c")
        await later
        assert slots.held == {"d": 1} and slots.free == 0
    run(main())
