"""HTTP front end (FastAPI): /v1/detect (+ batch, rendered), /v1/models, health,
metrics, and the web page at /."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierdet import __version__, render, validation
from tierdet.batch import (
    BATCH_BODY_DOC,
    BatchItemOut,
    BatchOutcome,
    BatchResponse,
    parse_batch_request,
    run_batch,
)
from tierdet.detector import DetectionService, DetectResult
from tierdet.errors import ApiError, ErrorCode
from tierdet.limits import FrontendLimits
from tierdet.schemas import (
    DetectJsonRequest,
    DetectResponse,
    ErrorBody,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    TierOut,
)
from tierdet.validation import DetectOptions

log = logging.getLogger("tierdet.http")
WEB_DIR = Path(__file__).with_name("web")
# The page loads only its own script and style, and draws uploads from blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Query parameters of /v1/detect that are not detect options.
_NOT_OPTIONS = frozenset({"render"})

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 413, 415, 422, 502, 503, 504)}
_IMAGE_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
_DETECT_RESPONSES: dict[int | str, dict[str, object]] = {
    **_ERRORS,
    200: {"description": "Detections as JSON, or with `render=true` the annotated image.",
          "content": {"image/jpeg": _IMAGE_SCHEMA, "image/png": _IMAGE_SCHEMA}},
}
_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "model": {"type": "string"},
                    "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    "max_detections": {"type": "integer", "minimum": 1},
                    "tier": {"type": "string"},
                    "sla_ms": {"type": "number", "exclusiveMinimum": 0},
                }}},
            "application/json": {"schema": DetectJsonRequest.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def error_response(exc: ApiError) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)


def _invalid_option(exc: ValidationError | RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return ApiError(ErrorCode.INVALID_OPTION, f"{where}: {first.get('msg', 'invalid')}")


def _merged_options(query: dict[str, str], body: dict[str, object]) -> DetectOptions:
    """Options from the query string and the body; one given in both is refused
    rather than one silently winning."""
    twice = sorted(set(query) & set(body))
    if twice:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"{', '.join(twice)}: given both in the query string and in the body")
    return DetectOptions(**query, **body)


async def parse_detect_request(request: Request) -> tuple[bytes, DetectOptions]:
    """Image bytes and options from multipart, JSON or a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = {k: v for k, v in request.query_params.items() if k not in _NOT_OPTIONS}
    try:
        if ctype == "multipart/form-data":
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(ErrorCode.EMPTY_IMAGE, "multipart field 'image' (a file) is missing")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
            return await upload.read(), _merged_options(query, fields)
        if ctype == "application/json":
            try:
                payload = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise ApiError(ErrorCode.INVALID_JSON, "the JSON body must be an object")
            body = DetectJsonRequest(**payload)
            try:
                data = base64.b64decode(body.image, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(ErrorCode.INVALID_BASE64, "'image' is not valid base64") from None
            given = body.model_dump(exclude={"image"}, exclude_unset=True)
            return data, _merged_options(query, given)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await request.body(), DetectOptions(**query)
    except ValidationError as exc:
        raise _invalid_option(exc) from None
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                   "with an 'image' file, application/json with base64 'image', or image/*")


class BodyLimit:
    """Refuse oversized request bodies while they stream in.

    A declared Content-Length over the limit is answered 413 before a byte of
    the body is read; a body without one (chunked) is counted as it arrives
    and refused as soon as it passes the limit, so the gateway never holds
    more than the limit of any request in memory.
    """

    def __init__(self, app, limit_for) -> None:
        self.app = app
        self.limit_for = limit_for  # path -> max body bytes, or None for no limit

    async def __call__(self, scope, receive, send) -> None:
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                response = error_response(ApiError(ErrorCode.INVALID_OPTION,
                                                   "Content-Length is not a number"))
                await response(scope, receive, send)
                return
            if too_large:
                await _too_large(limit)(scope, receive, send)
                return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                               f"the request body passed the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    response = error_response(ApiError(ErrorCode.IMAGE_TOO_LARGE,
                                       f"the request body is over the limit of {limit} bytes"))
    response.headers["Connection"] = "close"  # the unread body must not be parsed as a request
    return response


def body_limits(max_image_bytes: int, batch_max_images: int):
    """Per-path body limits: one image (base64 in JSON is 4/3 larger) plus room
    for the form fields, times the batch size for the batch endpoint."""
    one = max_image_bytes * 4 // 3 + 64 * 1024
    limits = {"/v1/detect": one, "/v1/detect/batch": one * batch_max_images}

    def limit_for(path: str) -> int | None:
        return limits.get(path.rstrip("/"), 64 * 1024 if path.startswith("/v1/") else None)

    return limit_for


def detect_response(result: DetectResult) -> DetectResponse:
    return DetectResponse(
        model=result.model, width=result.width, height=result.height,
        detections=[asdict(d) for d in result.detections], timing=asdict(result.timing),
        routing=asdict(result.routing))


def _batch_item(outcome: BatchOutcome) -> BatchItemOut:
    if outcome.result is not None:
        return BatchItemOut(index=outcome.index, filename=outcome.filename,
                            result=detect_response(outcome.result))
    error = outcome.error or ApiError(ErrorCode.INTERNAL, "no result")  # never both None
    return BatchItemOut(index=outcome.index, filename=outcome.filename,
                        error=ErrorBody(code=error.code.value, message=error.message))


def _rendered(data: bytes, result: DetectResult, service: DetectionService,
              fmt: render.ImageFormat) -> bytes:
    """The request's image with its detections drawn. The detector does not hand
    back its decoded pixels, so decode again: the bytes already passed the limits."""
    settings = service.settings
    image = validation.decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
    return render.encode(render.draw(image, result.detections), fmt)


def create_app(service: DetectionService, limits: FrontendLimits | None = None) -> FastAPI:
    limits = limits or FrontendLimits.from_env()
    index_html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    app = FastAPI(
        title="tierdet", version=__version__,
        description="Object detection that answers within your latency budget.",
    )
    app.add_middleware(BodyLimit, limit_for=body_limits(service.settings.max_image_bytes,
                                                        limits.batch_max_images))

    def _admit(request: Request):
        """API key check and rate limit, before any body is read."""
        return service.admit_key(request.headers.get("authorization"),
                                 request.headers.get("x-api-key"), "http")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_invalid_option(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_OPTION
        body = {"error": {"code": code.value, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")  # the trace goes to the log, never the client
        return error_response(ApiError(ErrorCode.INTERNAL, "internal error"))

    @app.post("/v1/detect", response_model=DetectResponse, responses=_DETECT_RESPONSES,
              openapi_extra=_DETECT_BODY, summary="Detect objects in one image")
    async def detect(
        request: Request,
        render_image: bool = Query(False, alias="render", description=(
            "Answer with the image, boxes drawn (JPEG, or PNG if Accept prefers it) "
            "instead of JSON.")),
    ) -> DetectResponse | Response:
        received = time.perf_counter()
        key = _admit(request)
        data, options = await parse_detect_request(request)
        service.authorize(key, options, "http")
        result = await service.detect(data, options, protocol="http", received=received)
        if render_image:
            fmt = render.negotiate(request.headers.get("accept"))
            body = await asyncio.to_thread(_rendered, data, result, service, fmt)
            return Response(body, media_type=render.MEDIA_TYPES[fmt], headers={
                "Vary": "Accept", "X-Tierdet-Model": result.model,
                "X-Tierdet-Detections": str(len(result.detections)),
                "X-Tierdet-Total-Ms": f"{result.timing.total_ms:.1f}"})
        return detect_response(result)

    @app.post("/v1/detect/batch", response_model=BatchResponse, responses=_ERRORS,
              openapi_extra=BATCH_BODY_DOC, summary="Detect objects in several images",
              description="Every image is answered on its own: a failed image carries its "
                          f"error code and the others their detections. At most "
                          f"{limits.batch_max_images} images per call "
                          "(TIERDET_BATCH_MAX_IMAGES).")
    async def detect_batch(request: Request) -> BatchResponse:
        key = _admit(request)
        try:
            images, options = await parse_batch_request(
                request, limits.batch_max_images, service.settings.max_image_bytes)
        except ValidationError as exc:
            raise _invalid_option(exc) from None
        service.authorize(key, options, "http")
        outcomes = await run_batch(service, images, options, limits.batch_concurrency)
        items = [_batch_item(o) for o in outcomes]
        failed = sum(1 for item in items if item.error is not None)
        return BatchResponse(results=items, succeeded=len(items) - failed, failed=failed)

    @app.get("/v1/models", response_model=ModelsResponse, summary="Models, tiers, readiness")
    async def models(request: Request) -> ModelsResponse:
        _admit(request)
        tiers = service.router.tiers
        return ModelsResponse(
            default_tier=tiers.default,
            tiers=[TierOut(name=t.name, budget_ms=t.budget_ms, models=list(t.models),
                           degrade=t.degrade) for t in tiers.tiers.values()],
            models=[ModelInfo(**info) for info in service.model_infos()])

    @app.get("/healthz", summary="The gateway process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Triton is reachable and the models are ready",
             responses={503: {"model": ErrorResponse}})
    async def readyz() -> JSONResponse:
        ready, detail = await service.readiness()
        if not ready:
            return error_response(ApiError(ErrorCode.TRITON_UNAVAILABLE
                                           if "triton" in detail else ErrorCode.MODEL_NOT_READY,
                                           detail))
        return JSONResponse({"status": "ready", "models": service.ready_models()})

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app
