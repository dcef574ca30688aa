"""What every gRPC service of the gateway reads from a call's context: its
metadata (request id, trace context, API key), its deadline, and the
``grpc_call`` every method runs in (id, span, access-log line)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from tierdet.contract.errors import ErrorCode
from tierdet.serving import access, tracing
from tierdet.serving.security import bearer


def metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


@contextlib.contextmanager
def grpc_call(context: grpc.aio.ServicerContext, protocol: str, span: str, method: str,
              log: access.AccessLog) -> Iterator[access.Call]:
    """The call's id (the caller's ``x-request-id`` when sane), returned in the
    trailing metadata; its server span; the access-log line of a call that
    reached no image. Every gRPC service's methods run in one."""
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := metadata(context, k))}
    with access.incoming(protocol, method, metadata(context, access.HEADER),
                         carrier.get("traceparent")) as call, \
            tracing.server_span(span, carrier):
        context.set_trailing_metadata(tuple(call.ids()))
        try:
            yield call
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            call.code = ErrorCode.CANCELLED.value
            raise
        finally:
            status = "OK" if call.code == "ok" else ErrorCode(call.code).kind.grpc_status
            access.ended(call, status, log)


def credentials(context: grpc.aio.ServicerContext) -> str | None:
    """The API key the call presents (``authorization: Bearer`` or ``x-api-key``)."""
    return bearer(metadata(context, "authorization"), metadata(context, "x-api-key"))


def deadline_ms(context: grpc.aio.ServicerContext) -> float | None:
    remaining_s = context.time_remaining()
    return remaining_s * 1e3 if remaining_s is not None else None
