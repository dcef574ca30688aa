"""HTTP front end (FastAPI): /v1/detect, /v1/models, health, metrics."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierdet import __version__
from tierdet.detector import DetectionService
from tierdet.errors import ApiError, ErrorCode
from tierdet.schemas import (
    DetectJsonRequest,
    DetectResponse,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    TierOut,
)
from tierdet.validation import DetectOptions

log = logging.getLogger("tierdet.http")

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 413, 415, 422, 502, 503, 504)}
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


async def parse_detect_request(request: Request) -> tuple[bytes, DetectOptions]:
    """Image bytes and options from multipart, JSON or a raw image body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = {k: v for k, v in request.query_params.items()}
    try:
        if ctype == "multipart/form-data":
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise ApiError(ErrorCode.EMPTY_IMAGE, "multipart field 'image' (a file) is missing")
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
            return await upload.read(), DetectOptions(**query, **fields)
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
            return data, body.options()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await request.body(), DetectOptions(**query)
    except ValidationError as exc:
        raise _invalid_option(exc) from None
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                   "with an 'image' file, application/json with base64 'image', or image/*")


def create_app(service: DetectionService) -> FastAPI:
    app = FastAPI(
        title="tierdet", version=__version__,
        description="Object detection that answers within your latency budget.",
    )

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

    @app.post("/v1/detect", response_model=DetectResponse, responses=_ERRORS,
              openapi_extra=_DETECT_BODY, summary="Detect objects in one image")
    async def detect(request: Request) -> DetectResponse:
        received = time.perf_counter()
        data, options = await parse_detect_request(request)
        result = await service.detect(data, options, protocol="http", received=received)
        return DetectResponse(
            model=result.model, width=result.width, height=result.height,
            detections=[asdict(d) for d in result.detections], timing=asdict(result.timing),
            routing=asdict(result.routing))

    @app.get("/v1/models", response_model=ModelsResponse, summary="Models, tiers, readiness")
    async def models() -> ModelsResponse:
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

    return app
