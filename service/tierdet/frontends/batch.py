"""Several images in one HTTP call: ``POST /v1/detect/batch``.

Each image is answered on its own: one that fails (corrupt, too large,
shed) is reported with its error code beside the others' detections, and
the call itself succeeds. Only what concerns the whole call (no images,
too many, a bad option, a key not allowed the tier, a body over the size
bound) refuses it.
"""

from __future__ import annotations

import asyncio
import logging

from tierdet.contract import wire
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import BatchItem, BatchResult
from tierdet.frontends.http_requests import BatchImage
from tierdet.serving.usecase import Caller, Detector

log = logging.getLogger("tierdet.http")


async def run_batch(detector: Detector, caller: Caller, images: list[BatchImage],
                    options: DetectOptions, concurrency: int) -> BatchResult:
    """Detect on every image, ``concurrency`` at a time, answers in request order."""
    detector.authorize(caller, options)
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int, image: BatchImage) -> BatchItem:
        if image.error is not None:
            detector.log_refused(caller.restarted(index), options, image.error)
            return BatchItem(index, image.filename, None, wire.error_info(image.error))
        async with slots:
            # The budget of each image counts from when the gateway starts on
            # it: images queued behind their siblings are not shed for waiting.
            try:
                result = await detector.detect(caller.restarted(index), image.data, options)
            except ApiError as exc:
                return BatchItem(index, image.filename, None, wire.error_info(exc))
            except Exception:
                log.exception("unhandled error in a batch image")
                return BatchItem(index, image.filename, None, wire.error_info(
                    ApiError(ErrorCode.INTERNAL, "internal error")))
        return BatchItem(index, image.filename, result, None)

    items = await asyncio.gather(*(one(i, img) for i, img in enumerate(images)))
    failed = sum(1 for item in items if item.error is not None)
    return BatchResult(tuple(items), len(items) - failed, failed)
