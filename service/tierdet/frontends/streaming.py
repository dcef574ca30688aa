"""Bounded, ordered concurrency for streams of work (gRPC DetectStream).

``ordered_map`` reads items from a source, works on several at once, and
yields results in source order. It holds at most ``limit`` items: read
from the source and not yet taken by the consumer. At the bound it stops
reading, so a slow consumer stalls the source (for gRPC: the request
stream, and through HTTP/2 flow control the sender) instead of buffering
without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Level(Protocol):
    """Where the count of held items is reported (a Prometheus gauge fits)."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class _NoLevel:
    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass


async def ordered_map(source: AsyncIterator[T], work: Callable[[T], Awaitable[R]], limit: int,
                      held: Level | None = None) -> AsyncIterator[R]:
    """``work(item)`` for every item, ``limit`` at a time, results in order.

    An item counts as held from the moment a slot is taken to read it until
    the consumer asks for the result after it, i.e. until the consumer has
    finished with its result (for gRPC: written it to the stream).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    level = held or _NoLevel()
    slots = asyncio.Semaphore(limit)
    # Never more than ``limit`` tasks plus the end marker: the slots bound it.
    tasks: asyncio.Queue[asyncio.Task[R] | None] = asyncio.Queue()
    taken = 0  # slots held by this call, for the gauge and for clean-up

    async def read() -> None:
        nonlocal taken
        try:
            while True:
                await slots.acquire()
                taken += 1
                level.inc()
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    slots.release()
                    taken -= 1
                    level.dec()
                    return
                tasks.put_nowait(asyncio.ensure_future(work(item)))
        finally:
            tasks.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await tasks.get()) is not None:
            result = await task
            yield result
            slots.release()  # the consumer is done with the result: free its slot
            taken -= 1
            level.dec()
        await reader  # re-raise a failure of the source
    finally:
        reader.cancel()
        while not tasks.empty():
            pending = tasks.get_nowait()
            if pending is not None:
                pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        level.dec(taken)
