"""What every gRPC service of the gateway reads from a call's context: its
metadata (request id, trace context, API key), its deadline and peer, the
``grpc_call`` every method runs in (id, span, access-log line), and the one
bound on detect calls in progress that the port's detect services share
(health and reflection are outside it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving import access, tracing
from tierdet.serving.security import bearer
from tierdet.serving.usecase import Caller, Detector


class CallLimit:
    """Detect calls in progress on the port (``TIERDET_MAX_CONCURRENCY``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


def metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


@contextlib.contextmanager
def grpc_call(context: grpc.aio.ServicerContext, protocol: str, span: str, method: str,
              log: access.AccessLog, calls: CallLimit | None = None) -> Iterator[access.Call]:
    """The call's id (the caller's ``x-request-id`` when sane), returned in the
    trailing metadata; its server span; the access-log line of a call that
    reached no image; counted in ``calls`` while it runs. Every gRPC service's
    methods run in one."""
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := metadata(context, k))}
    with access.incoming(protocol, method, metadata(context, access.HEADER),
                         carrier.get("traceparent")) as call, \
            tracing.server_span(span, carrier):
        context.set_trailing_metadata(tuple(call.ids()))
        if calls is not None:
            calls.active += 1
        try:
            yield call
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            call.code = ErrorCode.CANCELLED.value
            raise
        finally:
            if calls is not None:
                calls.active -= 1
            status = "OK" if call.code == "ok" else ErrorCode(call.code).kind.grpc_status
            access.ended(call, status, log)


def admit(detector: Detector, calls: CallLimit, context: grpc.aio.ServicerContext,
          protocol: str, received: float | None = None) -> Caller:
    """The call's concurrency slot (taken by ``grpc_call``), then its key."""
    if calls.active > calls.limit:  # this call is one too many
        detector.metrics.observe_failure(protocol, None, "none", "shed")
        raise ApiError(ErrorCode.OVERLOADED, "the gateway is serving all the calls it may "
                       "at once (TIERDET_MAX_CONCURRENCY)", retry_after_s=1.0)
    return detector.admit(credentials(context), protocol, received, deadline_ms(context),
                          peer_address(context))


def credentials(context: grpc.aio.ServicerContext) -> str | None:
    """The API key the call presents (``authorization: Bearer`` or ``x-api-key``)."""
    return bearer(metadata(context, "authorization"), metadata(context, "x-api-key"))


def deadline_ms(context: grpc.aio.ServicerContext) -> float | None:
    remaining_s = context.time_remaining()
    return remaining_s * 1e3 if remaining_s is not None else None


def peer_address(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's address as HTTP names it (``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``,
    ``ipv6:[::1]:5678`` -> ``::1``), so a source has one count of failed keys."""
    kind, _, rest = (context.peer() or "").partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return rest or None  # unix sockets and the like: as given
    return rest.rsplit(":", 1)[0].strip("[]")
