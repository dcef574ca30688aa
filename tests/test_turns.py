"""Turns on a CPU device: one model's work at a time on each endpoint."""

from __future__ import annotations

import asyncio

import pytest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.turns import DeviceTurns


class Device:
    """Records what runs at once; each call runs until the test lets it finish."""

    def __init__(self, turns: DeviceTurns) -> None:
        self.turns = turns
        self.running: list[str] = []
        self.seen_together: list[set[str]] = []
        self.done: dict[str, asyncio.Event] = {}

    async def call(self, name: str, model: str, timeout_s: float = 60.0,
                   endpoint: str = "a") -> str:
        self.done[name] = asyncio.Event()
        async with self.turns.turn(endpoint, model, timeout_s):
            self.running.append(name)
            self.seen_together.append({n.split("-")[0] for n in self.running})
            await self.done[name].wait()
            self.running.remove(name)
        return name

    async def started(self, *names: str) -> None:
        while not all(n in self.running for n in names):
            await asyncio.sleep(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_requests_of_one_model_go_on_together():
    async def scenario():
        device = Device(DeviceTurns(enabled=True))
        calls = [asyncio.create_task(device.call(f"big-{i}", "big")) for i in range(3)]
        await device.started("big-0", "big-1", "big-2")
        for i in range(3):
            device.done[f"big-{i}"].set()
        await asyncio.gather(*calls)

    run(scenario())


def test_another_model_waits_for_the_work_on_the_device_then_all_its_requests_go():
    async def scenario():
        device = Device(DeviceTurns(enabled=True))
        big = asyncio.create_task(device.call("big-0", "big"))
        await device.started("big-0")
        small = [asyncio.create_task(device.call(f"small-{i}", "small")) for i in range(2)]
        await asyncio.sleep(0)
        assert device.running == ["big-0"] and device.turns.waiting("a") == 2
        device.done["big-0"].set()
        await device.started("small-0", "small-1")  # both at once: they batch
        for i in range(2):
            device.done[f"small-{i}"].set()
        await asyncio.gather(big, *small)
        assert all(len(models) == 1 for models in device.seen_together)

    run(scenario())


def test_the_current_model_queues_behind_a_waiting_one_so_none_starves():
    async def scenario():
        device = Device(DeviceTurns(enabled=True))
        first = asyncio.create_task(device.call("big-0", "big"))
        await device.started("big-0")
        small = asyncio.create_task(device.call("small-0", "small"))
        await asyncio.sleep(0)
        later = asyncio.create_task(device.call("big-1", "big"))
        await asyncio.sleep(0)
        assert device.running == ["big-0"] and device.turns.waiting("a") == 2
        device.done["big-0"].set()
        await device.started("small-0")
        assert "big-1" not in device.running
        device.done["small-0"].set()
        await device.started("big-1")
        device.done["big-1"].set()
        await asyncio.gather(first, small, later)

    run(scenario())


def test_a_wait_ends_at_the_deadline_and_leaves_no_trace():
    async def scenario():
        device = Device(DeviceTurns(enabled=True))
        big = asyncio.create_task(device.call("big-0", "big"))
        await device.started("big-0")
        with pytest.raises(ApiError) as info:
            await device.call("small-0", "small", timeout_s=0.01)
        assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert info.value.message.startswith("small:")
        assert device.turns.waiting("a") == 0
        device.done["big-0"].set()
        await big
        task = asyncio.create_task(device.call("small-1", "small"))
        await device.started("small-1")  # the device is free again
        device.done["small-1"].set()
        await task

    run(scenario())


def test_endpoints_take_turns_on_their_own_and_off_means_straight_on():
    async def scenario(enabled: bool, endpoint: str) -> list[set[str]]:
        device = Device(DeviceTurns(enabled=enabled))
        calls = [asyncio.create_task(device.call("big-0", "big")),
                 asyncio.create_task(device.call("small-0", "small", endpoint=endpoint))]
        await device.started("big-0", "small-0")
        device.done["big-0"].set()
        device.done["small-0"].set()
        await asyncio.gather(*calls)
        return device.seen_together

    assert {"big", "small"} in run(scenario(enabled=True, endpoint="b"))
    assert {"big", "small"} in run(scenario(enabled=False, endpoint="a"))
