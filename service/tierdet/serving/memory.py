"""What a gateway holds in memory at most, so that a pod can be sized instead
of OOM-killed.

Three things grow with load, each bounded by a setting:

- **request bodies**: HTTP holds at most ``TIERDET_MAX_CONCURRENCY`` images'
  worth of requests at once over all workers (a batch counts the images its
  size can hold, at most a worker's share: so a worker holds at most the larger
  of its share and ``TIERDET_BATCH_MAX_IMAGES``), each up to BODY_COPIES x
  ``TIERDET_MAX_IMAGE_BYTES`` (a JSON
  body is the image base64-encoded, 4/3 of it, kept by the framework; while it
  is parsed the text once more; then the image's bytes); gRPC as many calls,
  each holding up to ``TIERDET_STREAM_MAX_INFLIGHT`` frames (a stream) of
  GRPC_COPIES x the image's bytes (the message and its parsed field);
- **decoded images**: each worker holds at most ``image_slots`` at once, from
  decoding until the image is letterboxed into the model's input (and while
  an annotated image is drawn), each up to IMAGE_COPIES x 3 bytes x
  ``TIERDET_MAX_IMAGE_PIXELS`` (the decoder's output and its RGB copy or an
  EXIF rotation's; drawing an annotated image: the image, its annotated copy
  and the encoder's colour-order copy), and DECODE_OVERHEAD. What decoding
  takes depends on the format and depth (``decoding.peak_bytes``): images
  that would take more are refused from their header, before decoding;
- **shadow scoring** (``serving.shadow``, when sampling is on): one image
  decoded at a time outside the slots, of at most SHADOW_MAX_PIXELS (larger
  ones are not scored), and ``TIERDET_SHADOW_QUEUE`` queued images of at most
  SHADOW_MAX_BYTES each (larger ones are not sampled);
- the **interpreter** with its libraries, BASE_MB per worker (measured: an idle
  worker serving D0 is ~125 MB resident).

Multipart uploads larger than 1 MB are spooled to /tmp meanwhile (Starlette),
at most ``spool_bytes``.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tierdet.serving.settings import Settings

BODY_COPIES = 4
GRPC_COPIES = 2
IMAGE_COPIES = 3
# Beside an image's copies: its decoder's tables and row buffers, and the
# bands ``imaging.to_rgb`` converts at a time (``imaging.BAND_BYTES``).
DECODE_OVERHEAD = 8 * 1024 * 1024
BASE_MB = 200
MIB = 1024 * 1024
SHADOW_MAX_BYTES = 4 * MIB
SHADOW_MAX_PIXELS = 4_000_000


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on: its CPU quota where a cgroup sets one
    (a pod's CPU limit), else its affinity."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cgroup.read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def image_slots(settings: Settings, cores: int | None = None) -> int:
    """Decoded images one worker holds at once: the setting, or the worker's
    share of the cores (decoding more at once than cores gains nothing)."""
    if settings.image_slots:
        return settings.image_slots
    cores = usable_cores() if cores is None else cores
    return max(1, math.ceil(cores / settings.workers))


@dataclass(frozen=True)
class MemoryBound:
    bodies: int  # HTTP
    calls: int  # gRPC
    images: int
    base: int

    @property
    def total(self) -> int:
        return self.bodies + self.calls + self.images + self.base

    def describe(self) -> str:
        return (f"{self.total / MIB:.0f} MiB at most: HTTP bodies {self.bodies / MIB:.0f}, "
                f"gRPC messages {self.calls / MIB:.0f}, decoded images "
                f"{self.images / MIB:.0f}, interpreters {self.base / MIB:.0f}")


def image_bytes(max_pixels: int) -> int:
    """What one image slot holds at most: IMAGE_COPIES x 3 bytes x the pixel
    limit, and DECODE_OVERHEAD. ``decoding.peak_bytes`` is what decoding an image takes; an image
    whose decoding would take more (a deep or transparent image near the
    pixel limit, a progressive JPEG's coefficients) is refused before it is
    decoded, so this holds for every image the gateway accepts."""
    return IMAGE_COPIES * 3 * max_pixels + DECODE_OVERHEAD


def shadow_pixels(settings: Settings) -> int:
    """The largest image shadow scoring decodes."""
    return min(settings.max_image_pixels, SHADOW_MAX_PIXELS)


def shadow_bytes(settings: Settings) -> int:
    """What one worker's shadow scoring holds at most: its queue and one image."""
    if settings.shadow_sample <= 0:
        return 0
    return (settings.shadow_queue * min(settings.max_image_bytes, SHADOW_MAX_BYTES)
            + image_bytes(shadow_pixels(settings)))


def bound(settings: Settings, cores: int | None = None) -> MemoryBound:
    """The most every worker of a gateway with ``settings`` holds together."""
    image = image_bytes(settings.max_image_pixels)
    held = settings.workers * settings.worker_concurrency()
    # A batch counts at most a worker's whole share, yet holds batch_max_images.
    images_held = settings.workers * max(settings.worker_concurrency(),
                                         settings.batch_max_images)
    return MemoryBound(
        bodies=images_held * BODY_COPIES * settings.max_image_bytes,
        calls=held * settings.stream_max_inflight * GRPC_COPIES * settings.max_image_bytes,
        images=settings.workers * (image_slots(settings, cores) * image
                                   + shadow_bytes(settings)),
        base=settings.workers * BASE_MB * MIB)


def spool_bytes(settings: Settings) -> int:
    """The most multipart uploads take in /tmp at once."""
    return settings.max_concurrency * settings.max_image_bytes


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):  # another C library: it has its own policy
        return None


_TRIM = _malloc_trim()
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
# Allocator arenas a gateway process uses. glibc gives each thread that meets
# a locked arena a new one, up to 8 per core; the gateway's threads (gRPC's,
# the decoders' pool) each keep their own arena's freed pages, partly used,
# so the resident size at rest creeps up over hours of mixed images.
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap the allocator's arenas (at a process's start, before its threads
    allocate); False with another C library (it has its own policy)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def release_freed() -> None:
    """Hand the memory the C allocator keeps after frees back to the kernel.

    glibc keeps freed memory in the arena (one per thread) that allocated it
    and returns only what ends its heap; large gRPC messages are read in
    gRPC's threads, in many pieces. Three DetectStreams of 19 MiB frames left
    the gateway 1 GB resident after they ended, 180 MB once trimmed."""
    if _TRIM is not None:
        gc.collect()  # what cycles hold (a failed frame's traceback holds its frame)
        trim_allocator()


def trim_allocator() -> None:
    """Only the allocator's half of ``release_freed``: no garbage collection,
    which holds the GIL (~25 ms for an idle gateway's objects) and would delay
    a request that arrives meanwhile. ctypes lets go of the GIL for the trim."""
    if _TRIM is not None:
        _TRIM(0)


def release_freed_soon(again_after_s: float = 1.0) -> None:
    """``release_freed`` in a worker thread (it walks every arena: not on the
    event loop), from code that may not await (an ending async generator); and
    once more ``again_after_s`` later: gRPC drops an ended call's last message
    buffers in its own threads, after the stream's code has ended."""
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, release_freed)
    loop.call_later(again_after_s, loop.run_in_executor, None, release_freed)


class IdleTrim:
    """``trim_allocator`` once the gateway has had no detect request for
    ``after_s``, after it served some: what the last burst left in glibc's
    arenas (a tiled 12 MP image's buffers, freed in a thread pool's arena) goes
    back to the kernel while nothing needs it, so the resident size at rest is
    what the gateway holds, not the high-water mark of its busiest minute.
    Called from the event loop only."""

    def __init__(self, after_s: float = 1.0) -> None:
        self.after_s = after_s
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None
        self.trims = 0  # done so far

    def begin(self) -> None:
        self._busy += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def end(self) -> None:
        self._busy -= 1
        if self._busy == 0 and _TRIM is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.after_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None  # only fires while idle: ``begin`` cancels it
        loop.run_in_executor(None, self._trim)

    def _trim(self) -> None:
        trim_allocator()
        self.trims += 1
