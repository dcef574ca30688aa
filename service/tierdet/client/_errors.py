"""``TierdetError``: every refusal the client reports, from either transport."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tierdet.contract.errors import GRPC_CODE_KEY

CONNECTION_FAILED = "connection_failed"  # client-side code: no answer from the server


class TierdetError(Exception):
    """A refusal from the gateway (or no answer at all: ``connection_failed``).

    ``code`` is the stable error code of the README's table; ``status`` the
    HTTP status or ``grpc_code`` the gRPC status name; ``attempts`` how many
    times the request was sent (retries included).
    """

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 grpc_code: str | None = None, retry_after_s: float | None = None,
                 attempts: int = 1) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.grpc_code = grpc_code
        self.retry_after_s = retry_after_s
        self.attempts = attempts


def retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP-date: the gateway never sends one
        return None


def from_http(status: int, body: bytes, headers: Mapping[str, str], attempts: int
              ) -> TierdetError:
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{status}", body[:200].decode("utf-8", "replace")
    return TierdetError(code, message, status=status, attempts=attempts,
                        retry_after_s=retry_after(headers.get("retry-after")))


def from_grpc(exc: Any, attempts: int) -> TierdetError:
    """From a ``grpc.RpcError``: the gateway's code from the trailing metadata, or
    the transport's own status where the gateway's handlers never answered."""
    status = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    meta = dict(trailing or ())
    code = meta.get(GRPC_CODE_KEY)
    if code is None:
        code = CONNECTION_FAILED if status == "UNAVAILABLE" else status.lower()
    return TierdetError(code, details.removeprefix(f"{code}: "), grpc_code=status,
                        attempts=attempts, retry_after_s=retry_after(meta.get("retry-after")))
