"""The Open Inference Protocol (KServe v2) over REST, beside /v1 on the HTTP port.

Routes: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]`` (metadata), ``.../ready`` and
``POST .../infer``. Tensors may travel as JSON or with Triton's binary
tensor data extension: the JSON header's length in
``Inference-Header-Content-Length``, the inputs' bytes after it (each input's
``binary_data_size``), and the same for outputs asked for as binary (an
output's ``binary_data``, or the request's ``binary_data_output``).
In JSON, each BYTES ``IMAGE`` element is the image base64-encoded (an encoded
image is not UTF-8 text); UINT8 pixels are numbers. Errors:
``{"error": "<code>: <message>"}`` with the code's status (``frontends.errors``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierdet.contract.errors import ApiError, ErrorCode, first_problem
from tierdet.contract.images import Pixels
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import DetectResult
from tierdet.frontends import v2_models, v2_tensors
from tierdet.frontends.v2_tensors import INPUT, OUTPUTS, PARAMETERS, V2Output
from tierdet.serving.security import bearer
from tierdet.serving.usecase import Caller, Detector

PROTOCOL = "v2-http"  # the metrics, access log and trace label
HEADER_LENGTH = "inference-header-content-length"
_ERROR_STATUSES = (400, 401, 403, 413, 415, 422, 429, 502, 503, 504)


class V2Error(BaseModel):
    error: str = Field(..., description="`<tierdet error code>: <message>`.")


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        None, description="JSON form: the images base64-encoded. Absent when the input's "
                          "`binary_data_size` says its bytes follow the JSON header.")


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


def _parameters_schema() -> dict[str, Any]:
    """The request parameters, documented from ``DetectOptions`` itself."""
    options = DetectOptions.model_json_schema()["properties"]
    return {"type": "object", "additionalProperties": True,
            "properties": {name: options[name] for name in PARAMETERS}}


class InferRequestBody(BaseModel):
    """A v2 inference request: one ``IMAGE`` input of N encoded images."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    # The kserve SDK repeats the path's model in the body; the path decides.
    model_name: str | None = None
    model_version: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="The detect options (`tier` and `model` are the model's name); "
        "a list option as a list or comma-separated text. Protocol parameters such as "
        "`binary_data_output` are accepted too.",
        json_schema_extra=_parameters_schema())
    inputs: list[TensorSpec] = Field(..., min_length=1, max_length=1)
    outputs: list[OutputSpec] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(..., description="Routing facts: model, tier, "
                                       "budget_ms, predicted_ms, actual_ms, degraded, tiles "
                                       "(a batch: each comma-separated, in image order).")
    outputs: list[OutputTensor]


_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": V2Error} for s in _ERROR_STATUSES}
def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place: in an OpenAPI document a
    ``#/$defs/...`` reference would resolve against the document, not the schema."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_INFER_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined(InferRequestBody.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "The binary tensor data extension: the "
                                 "JSON request, then the tensors' bytes."}}}}


def _split(raw: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part after it."""
    if declared is None:
        return raw, b""
    if not declared.isdigit() or int(declared) > len(raw):
        raise ApiError(ErrorCode.INVALID_OPTION, f"Inference-Header-Content-Length "
                       f"{declared!r} is not a length within the body ({len(raw)} bytes)")
    return raw[:int(declared)], raw[int(declared):]


def parse_infer(raw: bytes, declared: str | None) -> tuple[InferRequestBody, bytes]:
    head, binary = _split(raw, declared)
    try:
        payload = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (arrays nested too deep)
        raise ApiError(ErrorCode.INVALID_JSON, "the inference request is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(ErrorCode.INVALID_JSON, "the inference request must be a JSON object")
    try:
        return InferRequestBody.model_validate(payload), binary
    except ValidationError as exc:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       first_problem(exc.errors(), "request")) from None


def _flat(data: list[Any]) -> list[Any]:
    """A nested JSON tensor's values, row-major (without recursion: the nesting
    is the client's to choose)."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], stack)  # the stack itself marks an exhausted level
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def images_of(body: InferRequestBody, binary: bytes, max_images: int
              ) -> list[bytes | Pixels]:
    (tensor,) = body.inputs
    spec = v2_tensors.check_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise ApiError(ErrorCode.INVALID_OPTION, f"{INPUT}: binary_data_size {size!r} "
                           f"does not match the {len(binary)} bytes after the JSON header")
        return spec.images(binary)
    if binary:
        raise ApiError(ErrorCode.INVALID_OPTION, f"{INPUT}: bytes follow the JSON header "
                       "but the input has no binary_data_size")
    if tensor.data is None:
        raise ApiError(ErrorCode.EMPTY_IMAGE, f"{INPUT}: no data and no binary_data_size")
    values = _flat(tensor.data)
    if spec.pixels is not None:  # JSON numbers, row-major
        return spec.images(spec.from_values(values))
    return v2_tensors.check_images([_from_base64(v) for v in values], spec.count)


def _from_base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(ErrorCode.INVALID_BASE64, f"{INPUT}: JSON elements must be "
                       "base64 text (or send the tensor as binary data)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(ErrorCode.INVALID_BASE64, f"{INPUT}: an element is not valid "
                       "base64") from None


def _binary_wanted(body: InferRequestBody) -> dict[str, bool]:
    default = bool((body.parameters or {}).get("binary_data_output", False))
    asked = {o.name: bool((o.parameters or {}).get("binary_data", default))
             for o in body.outputs or ()}
    return {name: asked.get(name, default) for name in OUTPUTS}


def infer_response(body: InferRequestBody, model_name: str, results: list[DetectResult]
                   ) -> Response:
    names = v2_tensors.requested_outputs([o.name for o in body.outputs or ()])
    binary = _binary_wanted(body)
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in v2_tensors.outputs(results, names):
        tensors.append(_tensor_json(out, binary[out.name], blobs))
    head = {"model_name": model_name, "model_version": v2_tensors.VERSION,
            "parameters": v2_tensors.routing_parameters(results), "outputs": tensors}
    if body.id is not None:
        head["id"] = body.id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})


def _tensor_json(out: V2Output, binary: bool, blobs: list[bytes]) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                              "shape": list(out.shape)}
    if binary:
        raw = out.raw()
        blobs.append(raw)
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = out.json_data()
    return tensor


def create_router(detector: Detector) -> APIRouter:
    """The v2 routes, for ``http_api.create_app`` to include."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"],
                       responses=_ERRORS)
    max_images = detector.settings.batch_max_images

    def _admit(request: Request, received: float | None = None) -> Caller:
        return detector.admit(bearer(request.headers.get("authorization"),
                                     request.headers.get("x-api-key")), PROTOCOL, received)

    @router.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, object]:
        return v2_models.server_metadata()

    @router.get("/health/live", summary="The gateway process is alive")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="The gateway can serve (503 while it cannot)")
    async def ready() -> JSONResponse:
        ok, _, detail = detector.ready()
        return JSONResponse({"ready": ok} if ok else {"ready": False, "error": detail},
                            status_code=200 if ok else 503)

    async def metadata(request: Request, name: str, version: str | None = None
                       ) -> dict[str, Any]:
        _admit(request)
        target = v2_models.target(detector, name, version)
        return v2_tensors.model_metadata(target, v2_models.platform(target))

    async def model_ready(request: Request, name: str, version: str | None = None
                          ) -> JSONResponse:
        _admit(request)
        ok = v2_models.model_ready(detector, v2_models.target(detector, name, version))
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        caller = _admit(request, time.perf_counter())
        target = v2_models.target(detector, name, version)
        body, binary = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
        images = images_of(body, binary, max_images)
        options = v2_tensors.options_from_parameters(body.parameters or {}, target)
        v2_tensors.requested_outputs([o.name for o in body.outputs or ()])  # before the work
        results = await v2_models.infer(detector, caller, images, options)
        return infer_response(body, name, results)

    # Each route twice, with a version in the path and without (a function of
    # ``name`` alone, so the document shows no ``version`` query parameter).
    for versioned, unversioned, suffix, method, doc in (
            (metadata, _latest(metadata), "", "GET", {"summary": "Model metadata"}),
            (model_ready, _latest(model_ready), "/ready", "GET",
             {"summary": "The model can answer (503 while it cannot)"}),
            (infer, _latest(infer), "/infer", "POST",
             {"summary": "Detect objects in N encoded images",
              "response_model": InferResponseBody, "openapi_extra": _INFER_DOC})):
        router.add_api_route(f"/models/{{name}}{suffix}", unversioned, methods=[method], **doc)
        router.add_api_route(f"/models/{{name}}/versions/{{version}}{suffix}", versioned,
                             methods=[method], **doc)
    return router


def _latest(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def unversioned(request: Request, name: str) -> Any:
        return await route(request, name)

    return unversioned
