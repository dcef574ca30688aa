"""Errors a client can see: one stable code each, with its HTTP and gRPC status.

Every refusal anywhere in the service is an ``ApiError``. The table below is
the one source of the statuses, of the metrics outcome label and of the
README's error table (``tierdet generate`` writes it). The gRPC status is
named here, not imported: the front ends own the transports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

# gRPC trailing-metadata key carrying the stable error code.
GRPC_CODE_KEY = "tierdet-error-code"


class ErrorCode(str, Enum):
    EMPTY_IMAGE = "empty_image"
    UNREADABLE_IMAGE = "unreadable_image"
    INVALID_JSON = "invalid_json"
    INVALID_BASE64 = "invalid_base64"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_OPTION = "invalid_option"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_TIER = "unknown_tier"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    SLA_UNATTAINABLE = "sla_unattainable"
    OVERLOADED = "overloaded"
    MODEL_NOT_READY = "model_not_ready"
    TRITON_UNAVAILABLE = "triton_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL = "internal_error"
    CANCELLED = "cancelled"
    REQUEST_TIMEOUT = "request_timeout"
    ADMIN_REQUIRED = "admin_required"
    CHANGES_DISABLED = "changes_disabled"
    INVALID_CARD = "invalid_card"
    CARD_PATH_REFUSED = "card_path_refused"
    GRAPH_NOT_FOUND = "graph_not_found"
    DIGEST_MISMATCH = "digest_mismatch"
    CHANGE_IN_PROGRESS = "change_in_progress"
    MODEL_CONFLICT = "model_conflict"
    NO_CANARY = "no_canary"
    BUILD_FAILED = "build_failed"
    LOAD_FAILED = "load_failed"

    @property
    def kind(self) -> ErrorKind:
        return KINDS[self]


@dataclass(frozen=True)
class ErrorKind:
    http_status: int
    grpc_status: str  # a grpc.StatusCode name
    outcome: str  # the label of tierdet_requests_total{outcome=...}
    when: str  # for the README's table


KINDS: dict[ErrorCode, ErrorKind] = {
    ErrorCode.EMPTY_IMAGE: ErrorKind(400, "INVALID_ARGUMENT", "bad_input",
                                     "no image bytes, or no `image` field"),
    ErrorCode.UNREADABLE_IMAGE: ErrorKind(400, "INVALID_ARGUMENT", "bad_input",
                                          "a corrupt or truncated image"),
    ErrorCode.INVALID_JSON: ErrorKind(400, "INVALID_ARGUMENT", "bad_input",
                                      "a JSON body that does not parse, or is not an object"),
    ErrorCode.INVALID_BASE64: ErrorKind(400, "INVALID_ARGUMENT", "bad_input",
                                        "a JSON `image` that is not base64"),
    ErrorCode.IMAGE_TOO_LARGE: ErrorKind(
        413, "RESOURCE_EXHAUSTED", "bad_input",
        "more bytes than `TIERDET_MAX_IMAGE_BYTES` (a body over the limit is refused "
        "before it is read)"),
    ErrorCode.TOO_MANY_PIXELS: ErrorKind(
        413, "INVALID_ARGUMENT", "bad_input",
        "the header declares more than `TIERDET_MAX_IMAGE_PIXELS` (refused before decoding)"),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: ErrorKind(
        415, "INVALID_ARGUMENT", "bad_input",
        "not JPEG/PNG/WebP/BMP/TIFF (GIF is refused: OpenCV's wheels have no GIF decoder), "
        "or a body type the endpoint does not take"),
    ErrorCode.INVALID_OPTION: ErrorKind(
        422, "INVALID_ARGUMENT", "bad_input",
        "a bad option value, an unknown option or class, or an option given twice "
        "(query and body)"),
    ErrorCode.UNKNOWN_MODEL: ErrorKind(422, "INVALID_ARGUMENT", "bad_input",
                                       "`model` names no model this gateway serves"),
    ErrorCode.UNKNOWN_TIER: ErrorKind(422, "INVALID_ARGUMENT", "bad_input",
                                      "`tier` names no configured tier"),
    ErrorCode.NOT_FOUND: ErrorKind(404, "NOT_FOUND", "bad_input", "no such route"),
    ErrorCode.UNAUTHENTICATED: ErrorKind(401, "UNAUTHENTICATED", "unauthorized",
                                         "no API key, or an unknown one (keys configured)"),
    ErrorCode.FORBIDDEN: ErrorKind(403, "PERMISSION_DENIED", "unauthorized",
                                   "the key may not use that tier or model"),
    ErrorCode.RATE_LIMITED: ErrorKind(429, "RESOURCE_EXHAUSTED", "rate_limited",
                                      "the key is over its rate (with `Retry-After`)"),
    ErrorCode.SLA_UNATTAINABLE: ErrorKind(
        503, "RESOURCE_EXHAUSTED", "shed",
        "no model can answer within the budget now: shed at once (with `Retry-After`)"),
    ErrorCode.OVERLOADED: ErrorKind(
        503, "RESOURCE_EXHAUSTED", "shed",
        "more requests at once than `TIERDET_MAX_CONCURRENCY`: refused before the body is "
        "read (with `Retry-After`)"),
    ErrorCode.MODEL_NOT_READY: ErrorKind(503, "UNAVAILABLE", "error",
                                         "the model (or every model) is not ready "
                                         "(with `Retry-After`)"),
    ErrorCode.TRITON_UNAVAILABLE: ErrorKind(503, "UNAVAILABLE", "error",
                                            "Triton is unreachable (with `Retry-After`)"),
    ErrorCode.DEADLINE_EXCEEDED: ErrorKind(504, "DEADLINE_EXCEEDED", "timeout",
                                           "the answer could not arrive within the budget"),
    ErrorCode.INFERENCE_FAILED: ErrorKind(502, "INTERNAL", "error",
                                          "Triton answered the inference with an error"),
    ErrorCode.INTERNAL: ErrorKind(500, "INTERNAL", "error",
                                  "a bug: the trace goes to the log, never to the client"),
    ErrorCode.CANCELLED: ErrorKind(
        499, "CANCELLED", "timeout",
        "the caller went away (or its gRPC deadline passed) before the answer: nothing is "
        "sent, the access log and metrics say so"),
    ErrorCode.REQUEST_TIMEOUT: ErrorKind(
        408, "DEADLINE_EXCEEDED", "bad_input",
        "the caller sent too slowly: a body not in full within `TIERDET_BODY_TIMEOUT_S`, "
        "or no stream frame for `TIERDET_STREAM_IDLE_S`"),
    # The admin API (/admin/models): models that change while serving.
    ErrorCode.ADMIN_REQUIRED: ErrorKind(
        403, "PERMISSION_DENIED", "unauthorized",
        "an admin route without the admin credential (`X-Admin-Key`; an API key never is "
        "one), or on a gateway with none configured (`TIERDET_ADMIN_KEY_SHA256`)"),
    ErrorCode.CHANGES_DISABLED: ErrorKind(
        409, "FAILED_PRECONDITION", "bad_input",
        "a model change on a gateway without a cards folder (`TIERDET_CARDS_DIR`) or "
        "model home (`TIERDET_HOME`)"),
    ErrorCode.INVALID_CARD: ErrorKind(
        422, "INVALID_ARGUMENT", "bad_input",
        "a model card that is not YAML or JSON, fails validation, names another model than "
        "its URL, states no sha256, or does not fit its graph (found by the build)"),
    ErrorCode.CARD_PATH_REFUSED: ErrorKind(
        422, "INVALID_ARGUMENT", "bad_input",
        "a card's graph path that is absolute, has `..`, or leads out of the cards folder"),
    ErrorCode.GRAPH_NOT_FOUND: ErrorKind(422, "INVALID_ARGUMENT", "bad_input",
                                         "a card's graph is not a file in the cards folder"),
    ErrorCode.DIGEST_MISMATCH: ErrorKind(
        422, "INVALID_ARGUMENT", "bad_input",
        "a card's graph does not have the sha256 the card states"),
    ErrorCode.CHANGE_IN_PROGRESS: ErrorKind(
        409, "ABORTED", "bad_input", "another change of the same model is under way"),
    ErrorCode.MODEL_CONFLICT: ErrorKind(
        409, "FAILED_PRECONDITION", "bad_input",
        "a replacement that changes what the gateway prepares (input size, resize, classes, "
        "detections), or a card that takes a shipped model's name: add it under a new name"),
    ErrorCode.NO_CANARY: ErrorKind(
        409, "FAILED_PRECONDITION", "bad_input",
        "a canary promoted or rolled back where none is running for that model"),
    ErrorCode.BUILD_FAILED: ErrorKind(500, "INTERNAL", "error",
                                      "the build of a card failed (the admin sees why)"),
    ErrorCode.LOAD_FAILED: ErrorKind(502, "INTERNAL", "error",
                                     "Triton did not load a built model (the admin sees why)"),
}


def first_problem(errors: Sequence[Mapping[str, Any]], where: str = "options") -> str:
    """``field: message`` of the first of pydantic's validation errors (a body's own
    ``body`` location part left out), as ``invalid_option`` messages say it."""
    first = errors[0] if errors else {}
    path = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or where
    return f"{path}: {first.get('msg', 'invalid')}"


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return self.code.kind.http_status

    @property
    def outcome(self) -> str:
        return self.code.kind.outcome

    def retry_after_header(self) -> str | None:
        """Retry-After in whole seconds (at least 1), or None when not transient."""
        if self.retry_after_s is None:
            return None
        return str(max(1, round(self.retry_after_s)))

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code.value, "message": self.message}}
