"""The one mapping of an ``ApiError`` to each transport.

HTTP: the JSON body ``{"error": {"code", "message"}}`` with the code's status
and ``Retry-After`` when transient; under ``/v2/`` (the Open Inference
Protocol) the protocol's own body, ``{"error": "<code>: <message>"}``.
gRPC: the code's status, the stable code in the trailing metadata
(``tierdet-error-code``) and ``retry-after`` likewise.
The statuses themselves are the contract's (``tierdet.contract.errors``).
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tierdet.contract.errors import GRPC_CODE_KEY, ApiError, ErrorCode, first_problem
from tierdet.serving import access

V2_PREFIX = "/v2"


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: ErrorCode, message: str, path: str = "") -> dict[str, Any]:
    """The error body a client of ``path`` expects (v2: the protocol's, the stable
    code leading its message, as the gRPC status message has it)."""
    if is_v2(path):
        return {"error": f"{code.value}: {message}"}
    return {"error": {"code": code.value, "message": message}}


def http_response(exc: ApiError, path: str = "") -> JSONResponse:
    access.note_refusal(exc.code)
    retry_after = exc.retry_after_header()
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return JSONResponse(error_body(exc.code, exc.message, path), status_code=exc.http_status,
                        headers=headers)


def invalid_option(exc: ValidationError | RequestValidationError) -> ApiError:
    """A pydantic refusal of the options as ``invalid_option``, naming the field."""
    return ApiError(ErrorCode.INVALID_OPTION, first_problem(exc.errors(), "request"))


def grpc_status(exc: ApiError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code.kind.grpc_status]


async def grpc_abort(context: grpc.aio.ServicerContext, exc: ApiError) -> NoReturn:
    access.note_refusal(exc.code)
    trailing = [(GRPC_CODE_KEY, exc.code.value)]
    if (call := access.current()) is not None:  # abort replaces what was set before
        trailing += call.ids()
    retry_after = exc.retry_after_header()
    if retry_after is not None:
        trailing.append(("retry-after", retry_after))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(grpc_status(exc), f"{exc.code.value}: {exc.message}")
    raise AssertionError("unreachable: abort raises")
