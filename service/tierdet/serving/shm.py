"""Input tensors to Triton through system shared memory, when Triton shares the host.

Over the wire, tritonclient copies each pixel tensor several times (into the
request message, the serialized protobuf, gRPC's buffers) and Triton copies it
back out: ~3 ms of gateway CPU for one 512 px image on this machine. Through
Triton's system shared-memory extension the gateway writes the tensor once into
a region Triton maps, and the request carries only the region's name.

Regions are created as concurrency needs them (one per in-flight call, none
shared), registered with Triton once, and reused. A Triton on another host or
in a container without the gateway's /dev/shm cannot open them: registration
fails and the pool turns itself off, so calls go over the wire as before.
A restarted Triton has forgotten every region: ``forget`` re-registers them
on next use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import tritonclient.utils.shared_memory as shm

log = logging.getLogger("tierdet.shm")
_MIB = 1 << 20

# (name, key, byte_size) -> registers the region with Triton; raises ``UnmappableError``
# when Triton cannot map it, anything else when Triton could not be asked.
Register = Callable[[str, str, int], Awaitable[None]]


class UnmappableError(Exception):
    """Triton answered, and cannot map the gateway's shared memory."""


@dataclass
class Region:
    name: str  # Triton's name for it
    key: str  # the /dev/shm key
    size: int
    handle: shm.SharedMemoryRegion
    registered: bool = False


class SharedMemoryPool:
    def __init__(self, register: Register, max_regions: int = 64) -> None:
        self._register = register
        self.max_regions = max_regions
        self.enabled = True
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._prefix = f"tierdet_{os.getpid()}_{secrets.token_hex(4)}"
        self._created = 0

    async def acquire(self, tensor: np.ndarray) -> Region | None:
        """A registered region holding ``tensor``, or None: send it over the wire.
        Raises what registering raised when Triton could not be asked."""
        if not self.enabled:
            return None
        region = self._take(tensor.nbytes)
        if region is None:
            return None
        if not region.registered:
            try:
                await self._register(region.name, region.key, region.size)
            except UnmappableError as exc:  # not on this host, or no shared /dev/shm
                log.warning("Triton cannot map this gateway's shared memory (%s): "
                            "tensors go over gRPC", exc)
                self.enabled = False
                self._destroy(region)
                return None
            except Exception:  # Triton unreachable now: the call fails either way
                self._free.append(region)
                raise
            region.registered = True
        shm.set_shared_memory_region(region.handle, [np.ascontiguousarray(tensor)])
        return region

    def release(self, region: Region) -> None:
        self._free.append(region)

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

    def _take(self, nbytes: int) -> Region | None:
        fitting = [r for r in self._free if r.size >= nbytes]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
            return region
        if len(self._all) >= self.max_regions:
            return None  # every region is in flight: this call goes over the wire
        size = -(-nbytes // _MIB) * _MIB
        name = f"{self._prefix}_{self._created}"
        self._created += 1
        try:
            handle = shm.create_shared_memory_region(name, "/" + name, size)
        except shm.SharedMemoryException as exc:  # /dev/shm full or absent
            log.warning("cannot create a shared-memory region (%s): tensors go over gRPC", exc)
            self.enabled = False
            return None
        region = Region(name, "/" + name, size, handle)
        self._all.append(region)
        return region

    def _destroy(self, region: Region) -> None:
        with contextlib.suppress(Exception):
            shm.destroy_shared_memory_region(region.handle)
        if region in self._all:
            self._all.remove(region)
