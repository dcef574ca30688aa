"""HTTP bodies -> image bytes and ``DetectOptions``, and their OpenAPI description.

Options come from the query string and from the body (multipart fields or
JSON keys), by the names ``DetectOptions`` defines; an option given in both
is refused rather than one silently winning, on every endpoint. List options
are comma-separated in query and form fields and lists in JSON
(``tierdet.contract.wire``). Everything documented here is derived from
``DetectOptions``: adding an option there documents it here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierdet.contract import wire
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import LIST_OPTIONS, OPTION_NAMES, DetectOptions
from tierdet.frontends.errors import invalid_option


class DetectJsonRequest(DetectOptions):
    """JSON form of a detect request: the image travels base64-encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(..., description="Base64-encoded image bytes (JPEG, PNG, WebP, ...).")


class DetectBatchJsonRequest(DetectOptions):
    """JSON form of a batch: base64 images sharing one set of options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: list[str] = Field(..., description="Base64-encoded images (JPEG, PNG, WebP, ...).")


@dataclass(frozen=True)
class BatchImage:
    filename: str | None
    data: bytes
    error: ApiError | None = None  # refused while parsing (e.g. bad base64)


# -- options --------------------------------------------------------------------


def merged_options(query: Mapping[str, str], body: Mapping[str, Any]) -> DetectOptions:
    """Options from the query string (text) and the body (text fields or JSON values)."""
    twice = sorted(set(query) & set(body))
    if twice:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"{', '.join(twice)}: given both in the query string and in the body")
    try:
        return DetectOptions(**wire.options_from_fields(query), **body)
    except ValidationError as exc:
        raise invalid_option(exc) from None


def _form_fields(form: Any, files: str) -> dict[str, Any]:
    return wire.options_from_fields({k: v for k, v in form.items()
                                     if k != files and isinstance(v, str)})


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(ErrorCode.INVALID_JSON, "the body is not valid JSON") from None
    except RecursionError:  # the parser's own bound on nesting: a bad body, not a bug
        raise ApiError(ErrorCode.INVALID_JSON, "the JSON body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(ErrorCode.INVALID_JSON, "the JSON body must be an object")
    return payload


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# -- POST /v1/detect ----------------------------------------------------------------


async def parse_detect_request(request: Request, query: Mapping[str, str]
                               ) -> tuple[bytes, DetectOptions]:
    """Image bytes and options from multipart, JSON or a raw image body;
    ``query``: the query parameters that are options."""
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(ErrorCode.EMPTY_IMAGE, "multipart field 'image' (a file) is missing")
        return await upload.read(), merged_options(query, _form_fields(form, "image"))
    if ctype == "application/json":
        try:
            body = DetectJsonRequest(**_json_object(await request.body()))
        except ValidationError as exc:
            raise invalid_option(exc) from None
        given = body.model_dump(exclude={"image"}, exclude_unset=True)
        return _from_base64(body.image), merged_options(query, given)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await request.body(), merged_options(query, {})
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                   "with an 'image' file, application/json with base64 'image', or image/*")


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(ErrorCode.INVALID_BASE64, "'image' is not valid base64") from None


# -- POST /v1/detect/batch ----------------------------------------------------------


async def parse_batch_request(request: Request, max_images: int
                              ) -> tuple[list[BatchImage], DetectOptions]:
    """Images and shared options from multipart (``images`` files) or JSON. Raises
    ``ApiError`` for the whole call; a bad image is reported in its ``BatchImage``."""
    ctype = _content_type(request)
    query = dict(request.query_params)
    if ctype == "multipart/form-data":
        try:
            # One file over the bound is enough to tell the client it sent too many.
            form = await request.form(max_files=max_images + 1)
        except StarletteHTTPException as exc:
            raise ApiError(ErrorCode.INVALID_OPTION,
                           f"{exc.detail}; at most {max_images} images are accepted") from None
        uploads = form.getlist("images")
        files = [u for u in uploads if isinstance(u, UploadFile)]
        if len(files) != len(uploads):
            raise ApiError(ErrorCode.EMPTY_IMAGE, "every 'images' field must be a file")
        _check_count(len(files), max_images)
        options = merged_options(query, _form_fields(form, "images"))
        return [BatchImage(u.filename, await u.read()) for u in files], options
    if ctype == "application/json":
        try:
            body = DetectBatchJsonRequest(**_json_object(await request.body()))
        except ValidationError as exc:
            raise invalid_option(exc) from None
        _check_count(len(body.images), max_images)
        options = merged_options(query, body.model_dump(exclude={"images"}, exclude_unset=True))
        return [_batch_image(text) for text in body.images], options
    raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   f"content type {ctype or '(none)'} is not accepted: send multipart/form-data "
                   "with 'images' files, or application/json with a base64 'images' list")


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise ApiError(ErrorCode.EMPTY_IMAGE, "the batch has no images: send multipart "
                       "'images' files or a JSON 'images' list")
    if count > max_images:
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"the batch has {count} images; at most {max_images} are accepted")


def _batch_image(text: str) -> BatchImage:
    try:
        return BatchImage(None, _from_base64(text))
    except ApiError as exc:
        return BatchImage(None, b"", exc)


# -- OpenAPI ----------------------------------------------------------------------


def _text_schema(name: str) -> dict[str, Any]:
    """An option's schema as a text field (query or multipart). Its ``title`` and
    ``x-`` extensions stay: the web page builds its form from them."""
    prop = dict(DetectOptions.model_json_schema()["properties"][name])
    branches = [b for b in prop.pop("anyOf", [prop]) if b.get("type") != "null"]
    schema = {**prop, **branches[0]}
    schema.pop("default", None)
    if name in LIST_OPTIONS:
        return {"type": "string", "title": schema["title"],
                "description": schema["description"] + " (comma-separated)",
                **{k: v for k, v in schema.items() if k.startswith("x-")}}
    return schema


def query_parameters() -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": _text_schema(name)}
            for name in OPTION_NAMES]


def request_body_doc(files: str, json_model: type[DetectOptions]) -> dict[str, Any]:
    """``openapi_extra`` for an endpoint taking ``files`` in multipart, or JSON."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if files == "images":
        file_schema = {"type": "array", "items": file_schema}
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [files],
            "properties": {files: file_schema, **{n: _text_schema(n) for n in OPTION_NAMES}}}},
        "application/json": {"schema": json_model.model_json_schema()},
    }
    if files == "image":
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"parameters": query_parameters(),
            "requestBody": {"required": True, "content": content}}
