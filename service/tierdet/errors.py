"""Errors a client can see: one stable code each, an HTTP status and a gRPC status.

Every failure path raises ``ApiError``; the HTTP and gRPC front ends render
it the same way, so a code means the same thing on both.
"""

from __future__ import annotations

from enum import Enum

import grpc


class ErrorCode(str, Enum):
    EMPTY_IMAGE = "empty_image"
    UNREADABLE_IMAGE = "unreadable_image"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    INVALID_JSON = "invalid_json"
    INVALID_BASE64 = "invalid_base64"
    INVALID_OPTION = "invalid_option"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_TIER = "unknown_tier"
    SLA_UNATTAINABLE = "sla_unattainable"
    MODEL_NOT_READY = "model_not_ready"
    TRITON_UNAVAILABLE = "triton_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INFERENCE_FAILED = "inference_failed"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal_error"


_STATUS: dict[ErrorCode, tuple[int, grpc.StatusCode]] = {
    ErrorCode.EMPTY_IMAGE: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.UNREADABLE_IMAGE: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.INVALID_JSON: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.INVALID_BASE64: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: (415, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.IMAGE_TOO_LARGE: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorCode.TOO_MANY_PIXELS: (413, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.INVALID_OPTION: (422, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.UNKNOWN_MODEL: (422, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.UNKNOWN_TIER: (422, grpc.StatusCode.INVALID_ARGUMENT),
    # Shed at admission: no model can answer within the budget right now.
    ErrorCode.SLA_UNATTAINABLE: (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorCode.MODEL_NOT_READY: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorCode.TRITON_UNAVAILABLE: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorCode.DEADLINE_EXCEEDED: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorCode.INFERENCE_FAILED: (502, grpc.StatusCode.INTERNAL),
    ErrorCode.NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorCode.UNAUTHENTICATED: (401, grpc.StatusCode.UNAUTHENTICATED),
    ErrorCode.FORBIDDEN: (403, grpc.StatusCode.PERMISSION_DENIED),
    ErrorCode.RATE_LIMITED: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorCode.INTERNAL: (500, grpc.StatusCode.INTERNAL),
}

# gRPC trailing-metadata key carrying the stable error code.
GRPC_CODE_KEY = "tierdet-error-code"


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return _STATUS[self.code][0]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return _STATUS[self.code][1]

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code.value, "message": self.message}}
