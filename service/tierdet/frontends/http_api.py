"""HTTP front end (FastAPI): /v1/detect (+ batch, rendered), /v1/models, health,
metrics, the web page at /, and the Open Inference Protocol under /v2 (``v2_http``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from tierdet import __version__
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.results import (
    AdminModels,
    BatchResult,
    DetectResult,
    ErrorReply,
    ModelsInfo,
)
from tierdet.frontends import v2_http
from tierdet.frontends.batch import run_batch
from tierdet.frontends.errors import error_body, http_response, invalid_option
from tierdet.frontends.hardening import BodyDeadline, SafeHeaders
from tierdet.frontends.http_requests import (
    DetectBatchJsonRequest,
    DetectJsonRequest,
    merged_options,
    parse_batch_request,
    parse_detect_request,
    request_body_doc,
)
from tierdet.frontends.middleware import BodyLimit, ConcurrencyLimit, DrainBody, RequestContext
from tierdet.serving import decoding, render
from tierdet.serving.security import AdminKey, bearer
from tierdet.serving.settings import Settings
from tierdet.serving.usecase import Caller, Detector

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
# Options that set a request's budget: in the query string, a refusal needs no body.
_BUDGET_FIELDS = frozenset({"sla_ms", "tier", "model"})

_ERROR_STATUSES = (400, 401, 403, 408, 413, 415, 422, 429, 502, 503, 504)
# The admin API's refusals and failures (tierdet.serving.changes).
_ADMIN_ERRORS: dict[int | str, dict[str, object]] = {
    s: {"model": ErrorReply} for s in (403, 409, 413, 422, 500, 502, 503)}
_ERRORS: dict[int | str, dict[str, object]] = {s: {"model": ErrorReply}
                                                for s in _ERROR_STATUSES}
_IMAGE_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
_DETECT_RESPONSES: dict[int | str, dict[str, object]] = {
    **_ERRORS,
    200: {"description": "Detections as JSON, or with `render=true` the annotated image.",
          "content": {"image/jpeg": _IMAGE_SCHEMA, "image/png": _IMAGE_SCHEMA}},
}


def request_units(settings: Settings) -> Callable[[Scope], int]:
    """What a request counts against the concurrency bound: one image, or for a
    batch the images its declared size can hold (all it may, when undeclared)."""
    per_image = settings.max_body_bytes(1)

    def units(scope: Scope) -> int:
        if not _takes_several(scope["path"]):
            return 1
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if not declared.isdigit():
            return settings.batch_max_images
        return max(1, min(settings.batch_max_images, -(-int(declared) // per_image)))

    return units


def _takes_several(path: str) -> bool:
    """A route whose body may hold a batch of images."""
    path = path.rstrip("/")
    return path == "/v1/detect/batch" or (path.startswith("/v2/") and path.endswith("/infer"))


def body_limits(settings: Settings):
    """Per-path body limits: one image for /v1/detect, a batch's worth for the
    batch endpoint and v2 inference, 64 KiB for any other /v1 or /v2 route."""
    limits = {"/v1/detect": settings.max_body_bytes()}
    several = settings.max_body_bytes(settings.batch_max_images)

    def limit_for(path: str) -> int | None:
        if _takes_several(path):
            return several
        api = path.startswith(("/v1/", "/v2/", "/admin/")) or path == "/v2"
        return limits.get(path.rstrip("/"), 64 * 1024 if api else None)

    return limit_for


def _rendered(data: bytes, result: DetectResult, settings: Settings,
              fmt: render.ImageFormat) -> bytes:
    """The request's image with its detections drawn. The detector does not hand
    back its decoded pixels, so decode again: the bytes already passed the limits."""
    image = decoding.decode_image(data, settings.max_image_bytes, settings.max_image_pixels)
    return render.encode(render.draw(image, result.detections), fmt)


# FastAPI >= 0.160 makes spans of its own once a tracer provider is set, beside the
# gateway's (serving.tracing), which are the same for HTTP and gRPC: one set only.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                   "operation_spans": False, "auto_configure": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters else {})


def create_app(detector: Detector) -> FastAPI:
    settings = detector.settings
    index_html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    app = FastAPI(
        title="tierdet", version=__version__,
        description="Object detection that answers within your latency budget.",
        # The interactive docs load their scripts from a CDN: off unless asked for.
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        **_NO_NATIVE_TELEMETRY,
    )
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    app.add_middleware(BodyLimit, limit_for=body_limits(settings))
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrency,
                       units_for=request_units(settings),
                       refused=lambda: detector.metrics.observe_failure(
                           "http", None, "none", "shed"))
    app.add_middleware(RequestContext, log=detector.access)  # ids on every answer
    app.add_middleware(DrainBody)  # every answer arrives, refusals too
    app.add_middleware(SafeHeaders)  # outermost: on every answer, errors included

    def _admit(request: Request) -> Caller:
        """API key check and rate limit, before any body is read."""
        return detector.admit(bearer(request.headers.get("authorization"),
                                     request.headers.get("x-api-key")), "http",
                              source=request.client.host if request.client else None)

    def _is_admin(request: Request) -> bool:
        return detector.admin.allows(request.headers.get(AdminKey.HEADER))

    def _admin_only(request: Request) -> None:
        """The admin API's one check: the admin credential (an API key never is)."""
        if not _is_admin(request):
            raise ApiError(ErrorCode.ADMIN_REQUIRED, "the admin API takes the admin "
                           f"credential ({AdminKey.HEADER}) only" if detector.admin.enabled
                           else "no admin credential is configured: no admin API")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return http_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return http_response(invalid_option(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_OPTION
        return JSONResponse(error_body(code, str(exc.detail), request.url.path),
                            status_code=exc.status_code)

    @app.post("/v1/detect", response_model=DetectResult, responses=_DETECT_RESPONSES,
              openapi_extra=request_body_doc("image", DetectJsonRequest),
              summary="Detect objects in one image")
    async def detect(
        request: Request,
        render_image: bool = Query(False, alias="render", description=(
            "Answer with the image, boxes drawn (JPEG, or PNG if Accept prefers it) "
            "instead of JSON.")),
    ) -> DetectResult | Response:
        caller = _admit(request)
        query = {k: v for k, v in request.query_params.items() if k not in _NOT_OPTIONS}
        if _BUDGET_FIELDS & query.keys():  # the budget is known: refuse before reading
            detector.refuse_early(caller, merged_options(query, {}))
        data, options = await parse_detect_request(request, query)
        result = await detector.detect(caller, data, options)
        if render_image:
            fmt = render.negotiate(request.headers.get("accept"))
            async with detector.image_slot(caller):  # the image is decoded again, in full
                body = await asyncio.to_thread(_rendered, data, result, settings, fmt)
            return Response(body, media_type=render.MEDIA_TYPES[fmt], headers={
                "Vary": "Accept", "X-Tierdet-Model": result.model,
                "X-Tierdet-Detections": str(len(result.detections)),
                "X-Tierdet-Total-Ms": f"{result.timing.total_ms:.1f}"})
        return result

    @app.post("/v1/detect/batch", response_model=BatchResult, responses=_ERRORS,
              openapi_extra=request_body_doc("images", DetectBatchJsonRequest),
              summary="Detect objects in several images",
              description="Every image is answered on its own: a failed image carries its "
                          f"error code and the others their detections. At most "
                          f"{settings.batch_max_images} images per call "
                          "(TIERDET_BATCH_MAX_IMAGES).")
    async def detect_batch(request: Request) -> BatchResult:
        caller = _admit(request)
        images, options = await parse_batch_request(request, settings.batch_max_images)
        return await run_batch(detector, caller, images, options, settings.batch_concurrency)

    @app.get("/v1/models", response_model=ModelsInfo, summary="Models, tiers, readiness")
    async def models(request: Request) -> ModelsInfo:
        _admit(request)
        return detector.models(admin=_is_admin(request))

    @app.get("/admin/models", response_model=AdminModels, responses=_ADMIN_ERRORS,
             summary="Admin: each model's state (serving, building, loading, draining, "
                     "retired, failed)")
    async def admin_models(request: Request) -> AdminModels:
        _admin_only(request)
        return AdminModels(detector.changes.models())

    @app.put("/admin/models/{name}", response_model=AdminModels, responses=_ADMIN_ERRORS,
             summary="Admin: add or replace the models of a card (YAML or JSON body)",
             description="Answers once they serve: built, loaded, measured, ranked. With "
                         "`canary`, the replacement of model `name` is staged: served as "
                         "`<name>.canary` on that share of its requests, then promoted or "
                         "rolled back by the rule (TIERDET_CANARY_*) or the admin.")
    async def admin_put(
        name: str, request: Request,
        canary: float | None = Query(None, gt=0.0, lt=1.0, description=(
            "Stage the replacement as a canary taking this share of the model's requests.")),
    ) -> AdminModels:
        _admin_only(request)
        body = await request.body()
        if canary is not None:
            return AdminModels(await detector.changes.put_canary(name, body, canary))
        return AdminModels(await detector.changes.put(name, body))

    @app.post("/admin/models/{name}/canary/{verdict}", response_model=AdminModels,
              responses=_ADMIN_ERRORS,
              summary="Admin: promote a model's running canary, or roll it back",
              description="Answers once it is carried out: promote replaces the model by the "
                          "canary's card; either way the canary drains and is unloaded.")
    async def admin_canary(name: str, verdict: Literal["promote", "rollback"],
                           request: Request) -> AdminModels:
        _admin_only(request)
        return AdminModels(await detector.changes.decide(name, verdict))

    @app.delete("/admin/models/{name}", response_model=AdminModels, responses=_ADMIN_ERRORS,
                summary="Admin: retire a card's models (or one model)",
                description="Answers once the requests routed to them finished and "
                            "Triton unloaded them.")
    async def admin_delete(name: str, request: Request) -> AdminModels:
        _admin_only(request)
        return AdminModels(await detector.changes.delete(name))

    @app.get("/healthz", summary="The gateway process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Triton is reachable and the models are ready",
             responses={503: _ERRORS[503]})
    async def readyz() -> JSONResponse:
        _, code, detail = detector.ready()  # the watcher's state: no call to Triton
        if code is not None:
            return http_response(ApiError(code, detail))
        return JSONResponse({"status": "ready", "models": detector.catalog.ready_models()})

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        # Triton's addresses only for the admin; others see a stable alias of each.
        alias = None if _is_admin(request) else detector.endpoint_alias_key
        return Response(detector.metrics.exposition(alias),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html, headers=PAGE_HEADERS)

    app.include_router(v2_http.create_router(detector))
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app
