"""A worker's image slots (see ``memory``), shared fairly between API keys,
each wait bounded by the request's budget.

- **a share per key**: where the gateway has more than one API key, one key
  holds at most KEY_SHARE of the slots (at least one), so the others are
  left to other keys' requests: a tenant sending the heaviest images from
  many connections cannot take every slot;
- **the next slot to the key holding fewest**: a freed slot goes to the
  waiting request whose key holds the fewest slots (the longest waiting among
  them), not to whoever asked first;
- **a wait bounded by the budget**: a request waits for a slot at most as long
  as its budget still leaves room for (``Router.slot_wait_ms``); when that
  passes it is refused ``overloaded`` (and one that has no room at all, at
  once), instead of being answered long after its caller gave up.

Without API keys every request is the same caller's: no share applies.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field

from tierdet.contract.errors import ApiError, ErrorCode

# The most of a worker's slots one key holds while the gateway has other keys.
KEY_SHARE = 0.5


@dataclass(eq=False)
class _Waiter:
    key: str | None
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class FairSlots:
    """``total`` slots; ``keys``: how many API keys the gateway has."""

    def __init__(self, total: int, keys: int) -> None:
        self.total = total
        self.free = total
        self.share = total if keys <= 1 else max(1, math.floor(total * KEY_SHARE))
        self.held: Counter[str | None] = Counter()
        self._waiting: list[_Waiter] = []

    async def acquire(self, key: str | None, wait_s: float | None = None) -> None:
        """Take a slot for ``key``, waiting at most ``wait_s`` (None: as long as it
        takes); ``overloaded`` when none could be had in time."""
        # A free slot with requests waiting means none of them may take it (their
        # keys hold their share): _grant hands a slot on the moment it frees.
        if self._may_take(key):
            self._take(key)
            return
        if wait_s is not None and wait_s <= 0:
            raise _overloaded()
        waiter = _Waiter(key)
        self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            self._give_up(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise _overloaded() from None
            raise

    def release(self, key: str | None) -> None:
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]
        self.free += 1
        self._grant()

    def _may_take(self, key: str | None) -> bool:
        return self.free > 0 and self.held[key] < self.share

    def _take(self, key: str | None) -> None:
        self.free -= 1
        self.held[key] += 1

    def _grant(self) -> None:
        """Free slots to the waiters whose keys hold the fewest (first come among them)."""
        while self.free > 0:
            eligible = [w for w in self._waiting if self.held[w.key] < self.share]
            if not eligible:
                return
            waiter = min(eligible, key=lambda w: self.held[w.key])  # min: the first of ties
            self._waiting.remove(waiter)
            self._take(waiter.key)
            waiter.granted.set_result(None)

    def _give_up(self, waiter: _Waiter) -> None:
        """A waiter that stops waiting: a slot granted meanwhile goes on to the next."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        elif waiter.granted.done():
            self.release(waiter.key)


def _overloaded() -> ApiError:
    return ApiError(ErrorCode.OVERLOADED, "every image slot is taken and none frees in time "
                    "for the request's budget", retry_after_s=1.0)
