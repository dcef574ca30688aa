"""ordered_map: in order, bounded, and it stops reading when the consumer stalls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tierdet.frontends.streaming import ordered_map


class Level:
    """Records the held count and its high-water mark."""

    def __init__(self) -> None:
        self.value = 0
        self.high = 0

    def inc(self, amount: float = 1) -> None:
        self.value += int(amount)
        self.high = max(self.high, self.value)

    def dec(self, amount: float = 1) -> None:
        self.value -= int(amount)


async def _source(n: int, read: list[int], fail_at: int | None = None) -> AsyncIterator[int]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("the stream broke")
        read.append(i)
        yield i


def test_results_come_in_source_order_whatever_finishes_first():
    async def work(i: int) -> int:
        await asyncio.sleep(0.002 * ((7 * i) % 5))  # later items often finish first
        return i * 10

    async def main() -> tuple[list[int], Level]:
        level = Level()
        out = [r async for r in ordered_map(_source(30, []), work, 4, level)]
        return out, level

    out, level = asyncio.run(main())
    assert out == [i * 10 for i in range(30)]
    assert level.high == 4 and level.value == 0


def test_a_stalled_consumer_stops_the_reading_at_the_bound():
    async def work(i: int) -> int:
        return i  # instant: only the consumer can hold things up

    async def main() -> None:
        read: list[int] = []
        level = Level()
        results = ordered_map(_source(100, read), work, 3, level)
        assert await anext(results) == 0
        await asyncio.sleep(0.05)  # the consumer is busy with result 0
        assert len(read) == 3 and level.value == 3 and level.high == 3
        assert await anext(results) == 1  # taking the next result frees one slot
        await asyncio.sleep(0.05)
        assert len(read) == 4 and level.high == 3
        rest = [r async for r in results]
        assert rest == list(range(2, 100)) and level.high == 3 and level.value == 0

    asyncio.run(main())


def test_a_broken_source_fails_after_the_results_before_it():
    async def work(i: int) -> int:
        return i

    async def main() -> list[int]:
        out: list[int] = []
        with pytest.raises(RuntimeError, match="broke"):
            async for r in ordered_map(_source(10, [], fail_at=5), work, 2):
                out.append(r)
        return out

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_closing_early_cancels_the_work_in_flight():
    cancelled: list[int] = []

    async def work(i: int) -> int:
        if i == 0:
            return 0
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def main() -> Level:
        level = Level()
        results = ordered_map(_source(10, []), work, 4, level)
        assert await anext(results) == 0
        await asyncio.sleep(0.01)
        await results.aclose()
        await asyncio.sleep(0.01)
        return level

    level = asyncio.run(asyncio.wait_for(main(), 10))
    assert sorted(cancelled) == [1, 2, 3] and level.value == 0


def test_the_bound_must_be_positive():
    async def main() -> None:
        async for _ in ordered_map(_source(1, []), asyncio.sleep, 0):
            pass

    with pytest.raises(ValueError):
        asyncio.run(main())
