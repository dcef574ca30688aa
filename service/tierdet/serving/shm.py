"""Input tensors to Triton through system shared memory, when Triton shares the host.

Over the wire, tritonclient copies each pixel tensor several times (into the
request message, the serialized protobuf, gRPC's buffers) and Triton copies it
back out: ~3 ms of gateway CPU for one 512 px image on this machine. Through
Triton's system shared-memory extension the request carries only a region's
name, and the gateway letterboxes the image straight into the region: no
copy at all.

Regions are created as concurrency needs them (one per in-flight call, none
shared), registered with Triton on first use, and reused. A Triton on another
host or in a container without the gateway's /dev/shm cannot open them:
registration fails and the pool turns itself off, so calls go over the wire
as before. A restarted Triton has forgotten every region: ``forget`` makes
the next use register it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger("tierdet.shm")
_MIB = 1 << 20

# (name, key, byte_size) -> registers the region with Triton; raises
# ``UnmappableError`` when Triton cannot map it, anything else when Triton
# could not be asked.
Register = Callable[[str, str, int], Awaitable[None]]


class UnmappableError(Exception):
    """Triton answered, and cannot map the gateway's shared memory."""


@dataclass(eq=False)
class Region:
    name: str  # Triton's name for it, and its /dev/shm key without the slash
    memory: shared_memory.SharedMemory
    registered: bool = False

    @property
    def key(self) -> str:
        return "/" + self.name

    @property
    def size(self) -> int:
        return self.memory.size

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The region's first bytes as a uint8 array of ``shape``."""
        return np.ndarray(shape, np.uint8, buffer=self.memory.buf)

    @property
    def address(self) -> int:
        return self.view((1,)).__array_interface__["data"][0]


class SharedMemoryPool:
    def __init__(self, register: Register, max_regions: int = 64) -> None:
        self._register = register
        self.max_regions = max_regions
        self.enabled = True
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._prefix = f"tierdet_{os.getpid()}_{secrets.token_hex(4)}"
        self._created = 0

    def take(self, nbytes: int) -> Region | None:
        """A region of at least ``nbytes`` for one call, or None: use the wire."""
        if not self.enabled:
            return None
        fitting = [r for r in self._free if r.size >= nbytes]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
            return region
        if len(self._all) >= self.max_regions:
            return None  # every region is in flight: this call goes over the wire
        name = f"{self._prefix}_{self._created}"
        self._created += 1
        try:
            memory = shared_memory.SharedMemory(name, create=True,
                                                size=-(-nbytes // _MIB) * _MIB)
        except OSError as exc:  # /dev/shm full or absent
            log.warning("cannot create a shared-memory region (%s): tensors go over gRPC", exc)
            self.enabled = False
            return None
        region = Region(name, memory)
        self._all.append(region)
        return region

    async def ready(self, region: Region) -> bool:
        """Register ``region`` with Triton if it is not yet; False if Triton cannot
        map it (the pool is off from then on). Raises what registering raised
        when Triton could not be asked."""
        if region.registered:
            return True
        try:
            await self._register(region.name, region.key, region.size)
        except UnmappableError as exc:  # not on this host, or no shared /dev/shm
            log.warning("Triton cannot map this gateway's shared memory (%s): "
                        "tensors go over gRPC", exc)
            self.enabled = False
            return False
        region.registered = True
        return True

    def release(self, region: Region) -> None:
        if self.enabled:
            self._free.append(region)
        else:
            self._destroy(region)

    def forget(self) -> None:
        """Triton lost its registrations (a restart): register again on next use."""
        for region in self._all:
            region.registered = False

    def registered(self) -> list[str]:
        return [r.name for r in self._all if r.registered]

    def close(self) -> None:
        for region in list(self._all):
            self._destroy(region)
        self._free.clear()

    def _destroy(self, region: Region) -> None:
        with contextlib.suppress(BufferError):  # a view still held: freed with it
            region.memory.close()
        with contextlib.suppress(FileNotFoundError):
            region.memory.unlink()
        if region in self._all:
            self._all.remove(region)
