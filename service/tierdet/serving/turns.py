"""Turns on a CPU device: one model's work at a time on each Triton endpoint.

Triton runs each model on its own instance, so on a CPU two models' executions
run at once on the same cores and each takes about twice as long: a big model's
request admitted on an idle device is slowed by every small one admitted after
it, and ends late although the router's queue said it would fit. With turns the
gateway sends an endpoint work of one model at a time: requests of the model
whose turn it is go straight on (and batch at Triton), requests of another model
wait in the gateway until that work has come back, then all the requests of the
model waiting first go together. The device then works the queue the router's
latency model predicts. A request of the current model that arrives while
another model waits queues behind it, so no model starves. A wait ends at the
request's deadline (``deadline_exceeded``, as at Triton).

Turns are per gateway: several gateways sharing one Triton each keep their own,
so their work may still overlap there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from tierdet.contract.errors import ApiError, ErrorCode


@dataclass
class _Device:
    model: str | None = None  # whose turn it is
    running: int = 0  # its requests sent and not yet back
    waiting: deque[tuple[str, asyncio.Future[None]]] = field(default_factory=deque)


class DeviceTurns:
    """``enabled`` False: every request goes straight on (a GPU, or turns off)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._devices: dict[str, _Device] = {}

    @asynccontextmanager
    async def turn(self, endpoint: str, model: str, timeout_s: float) -> AsyncIterator[float]:
        """Hold a turn for ``model`` on ``endpoint`` for the block; yields the
        seconds waited for it (to take from the call's own timeout)."""
        if not self.enabled:
            yield 0.0
            return
        device = self._devices.setdefault(endpoint, _Device())
        start = time.perf_counter()
        if device.running == 0 or (device.model == model and not device.waiting):
            device.model = model
            device.running += 1
        else:
            await self._wait(device, model, timeout_s)
        try:
            yield time.perf_counter() - start
        finally:
            self._release(device)

    async def _wait(self, device: _Device, model: str, timeout_s: float) -> None:
        entry = (model, asyncio.get_running_loop().create_future())
        device.waiting.append(entry)
        try:
            await asyncio.wait_for(entry[1], max(0.001, timeout_s))
        except BaseException as exc:
            if entry[1].done() and not entry[1].cancelled():
                self._release(device)  # the turn came just as the wait ended
            elif entry in device.waiting:
                device.waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise ApiError(ErrorCode.DEADLINE_EXCEEDED,
                               f"{model}: the deadline passed waiting for the device") from None
            raise

    def _release(self, device: _Device) -> None:
        device.running -= 1
        if device.running > 0:
            return
        while device.waiting and device.waiting[0][1].done():
            device.waiting.popleft()  # gave up waiting
        if not device.waiting:
            device.model = None
            return
        device.model = device.waiting[0][0]
        keep: deque[tuple[str, asyncio.Future[None]]] = deque()
        for model, future in device.waiting:
            if model == device.model and not future.done():
                future.set_result(None)
                device.running += 1
            elif not future.done():
                keep.append((model, future))
        device.waiting = keep

    def waiting(self, endpoint: str) -> int:
        """Requests waiting for their turn on ``endpoint``."""
        device = self._devices.get(endpoint)
        return len(device.waiting) if device else 0
