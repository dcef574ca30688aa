"""What both v2 front ends (REST ``v2_http``, gRPC ``v2_grpc``) share: the models
a v2 client sees, their readiness and metadata, and running one inference
request's images through the use case (``Detector``), so a v2 call meets the
same keys, limits, routing, metrics and access log as ``/v1/detect``.

Models: ``auto`` (the default tier), one per tier by the tier's name, and every
served model by its own name (a pinned request). Every one is version ``1``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tierdet import __version__
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import DetectResult
from tierdet.frontends.v2_tensors import VERSION, Target
from tierdet.serving.usecase import Caller, Detector

AUTO = "auto"
SERVER_NAME = "tierdet"
# The protocol's extensions this server speaks (Triton's binary tensor data on REST).
EXTENSIONS = ("binary_tensor_data",)
ROUTED_PLATFORM = "tierdet-routed"  # a tier: the router picks the model per image
PINNED_PLATFORM = "tierdet-pinned"  # one model, always


def server_metadata() -> dict[str, object]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def target(detector: Detector, name: str, version: str | None = None) -> Target:
    """The model ``name`` names, or ``unknown_model``."""
    if version not in (None, "", VERSION):
        raise ApiError(ErrorCode.UNKNOWN_MODEL,
                       f"model {name!r} has no version {version!r}; its only version is "
                       f"{VERSION}")
    tiers = detector.router.tiers
    if name == AUTO:
        return Target(name, tier=tiers.default)
    if name in tiers.tiers:
        return Target(name, tier=name)
    if detector.catalog.serves(name):
        return Target(name, model=name, routed=False)
    raise ApiError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}; models: "
                   f"{', '.join(names(detector))}")


def names(detector: Detector) -> list[str]:
    """Every model a v2 client may name: ``auto``, the tiers, the served models."""
    return [AUTO, *detector.router.tiers.tiers, *sorted(detector.catalog.states)]


def platform(t: Target) -> str:
    return ROUTED_PLATFORM if t.routed else PINNED_PLATFORM


def model_ready(detector: Detector, t: Target) -> bool:
    """A pinned model: it is ready. A tier: one of its models is."""
    ready = set(detector.catalog.ready_models())
    if not detector.ready()[0]:
        return False
    if t.model is not None:
        return t.model in ready
    allowed = detector.router.tiers.tiers[t.tier or detector.router.tiers.default].models
    return bool(ready & set(allowed)) if allowed else bool(ready)


async def infer(detector: Detector, caller: Caller, images: Sequence[bytes | Pixels],
                options: DetectOptions) -> list[DetectResult]:
    """Every image through the use case, each routed on its own (a batch runs
    ``batch_concurrency`` at a time, like ``/v1/detect/batch``). A tensor is
    answered whole: the first failed image (in request order) fails the call."""
    detector.authorize(caller, options)
    if len(images) == 1:
        return [await detector.detect(caller, images[0], options)]
    slots = asyncio.Semaphore(detector.settings.batch_concurrency)

    async def one(index: int, image: bytes | Pixels) -> DetectResult:
        async with slots:  # each image's budget counts from when the gateway starts on it
            return await detector.detect(caller.restarted(index), image, options)

    answers = await asyncio.gather(*(one(i, img) for i, img in enumerate(images)),
                                   return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return [a for a in answers if isinstance(a, DetectResult)]
