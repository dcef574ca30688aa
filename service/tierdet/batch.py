"""Several images in one HTTP call: ``POST /v1/detect/batch``.

Each image is answered on its own: one that fails (corrupt, too large,
shed) is reported with its error code beside the others' detections, and
the call itself succeeds. Only what concerns the whole call (no images,
too many, a bad option, a body over the size bound) refuses it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierdet.detector import DetectionService, DetectResult
from tierdet.errors import ApiError, ErrorCode
from tierdet.schemas import DetectResponse, ErrorBody
from tierdet.validation import DetectOptions

log = logging.getLogger("tierdet.http")


class DetectBatchJsonRequest(DetectOptions):
    """JSON form of a batch: base64 images sharing one set of options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: list[str] = Field(..., description="Base64-encoded images (JPEG, PNG, WebP, ...).")

    def options(self) -> DetectOptions:
        return DetectOptions(**self.model_dump(exclude={"images"}))


class BatchItemOut(BaseModel):
    index: int = Field(..., description="Position of the image in the request.")
    filename: str | None = Field(None, description="The multipart file name, if any.")
    result: DetectResponse | None = Field(None, description="Set when the image succeeded.")
    error: ErrorBody | None = Field(None, description="Set when the image failed.")


class BatchResponse(BaseModel):
    results: list[BatchItemOut]
    succeeded: int
    failed: int


@dataclass(frozen=True)
class BatchImage:
    filename: str | None
    data: bytes
    error: ApiError | None = None  # refused while parsing (e.g. bad base64)


@dataclass(frozen=True)
class BatchOutcome:
    index: int
    filename: str | None
    result: DetectResult | None
    error: ApiError | None


BATCH_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["images"],
                "properties": {
                    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "model": {"type": "string"},
                    "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    "max_detections": {"type": "integer", "minimum": 1},
                    "tier": {"type": "string"},
                    "sla_ms": {"type": "number", "exclusiveMinimum": 0},
                }}},
            "application/json": {"schema": DetectBatchJsonRequest.model_json_schema()},
        },
    }
}


def body_limit(max_images: int, max_image_bytes: int) -> int:
    """Bytes a valid batch can take: base64 (4/3) of every image, plus framing."""
    return max_images * (max_image_bytes * 4 // 3 + 4096) + 64 * 1024


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                           f"the batch body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise ApiError(ErrorCode.EMPTY_IMAGE, "the batch has no images: send multipart "
                       "'images' files or a JSON 'images' list")
    if count > max_images:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"the batch has {count} images; at most {max_images} are accepted")


async def parse_batch_request(request: Request, max_images: int, max_image_bytes: int
                              ) -> tuple[list[BatchImage], DetectOptions]:
    """Images and shared options from multipart (``images`` files) or JSON.

    Raises ``ApiError`` for the whole call; pydantic's ``ValidationError``
    for a bad option (the caller maps it like /v1/detect does).
    """
    limit = body_limit(max_images, max_image_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading a byte
        raise ApiError(ErrorCode.IMAGE_TOO_LARGE, f"the batch body exceeds {limit} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)
    if ctype == "multipart/form-data":
        return await _parse_multipart(request, query, max_images)
    if ctype == "application/json":
        try:
            payload = json.loads(await _read_capped(request, limit))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise ApiError(ErrorCode.INVALID_JSON, "the JSON body must be an object")
        body = DetectBatchJsonRequest(**{**query, **payload})  # the body wins
        _check_count(len(body.images), max_images)
        return [_from_base64(text) for text in body.images], body.options()
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                   "with 'images' files, or application/json with a base64 'images' list")


async def _parse_multipart(request: Request, query: dict[str, str], max_images: int
                           ) -> tuple[list[BatchImage], DetectOptions]:
    try:
        # One file over the bound is enough to tell the client it sent too many.
        form = await request.form(max_files=max_images + 1)
    except StarletteHTTPException as exc:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"{exc.detail}; at most {max_images} images are accepted") from None
    uploads = form.getlist("images")
    if any(not isinstance(u, UploadFile) for u in uploads):
        raise ApiError(ErrorCode.EMPTY_IMAGE, "every 'images' field must be a file")
    _check_count(len(uploads), max_images)
    fields = {k: v for k, v in form.items() if k != "images" and isinstance(v, str)}
    options = DetectOptions(**{**query, **fields})
    images = [BatchImage(u.filename, await u.read()) for u in uploads
              if isinstance(u, UploadFile)]
    return images, options


def _from_base64(text: str) -> BatchImage:
    try:
        return BatchImage(None, base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return BatchImage(None, b"", ApiError(ErrorCode.INVALID_BASE64,
                                              "the image is not valid base64"))


async def run_batch(service: DetectionService, images: list[BatchImage], options: DetectOptions,
                    concurrency: int) -> list[BatchOutcome]:
    """Detect on every image, ``concurrency`` at a time, answers in request order."""
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int, image: BatchImage) -> BatchOutcome:
        if image.error is not None:
            return BatchOutcome(index, image.filename, None, image.error)
        async with slots:
            # The budget of each image counts from when the gateway starts on
            # it: images queued behind their siblings are not shed for waiting.
            try:
                result = await service.detect(image.data, options, protocol="http",
                                              received=time.perf_counter())
            except ApiError as exc:
                return BatchOutcome(index, image.filename, None, exc)
            except Exception:
                log.exception("unhandled error in a batch image")
                return BatchOutcome(index, image.filename, None,
                                    ApiError(ErrorCode.INTERNAL, "internal error"))
        return BatchOutcome(index, image.filename, result, None)

    return list(await asyncio.gather(*(one(i, img) for i, img in enumerate(images))))
