"""gRPC front end: tierdet.v1.Detector (Detect, DetectStream, ListModels), the
Open Inference Protocol's inference.GRPCInferenceService (``v2_grpc``), plus
standard health and reflection.

Only detect calls (Detector's and GRPCInferenceService's) count against
``TIERDET_MAX_CONCURRENCY`` (beyond it: RESOURCE_EXHAUSTED ``overloaded``):
health and reflection need no key, so they must not be able to take the slots
detection needs. A DetectStream that sends no frame for
``TIERDET_STREAM_IDLE_S`` while the gateway waits for one is ended
(DEADLINE_EXCEEDED ``request_timeout``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge
from pydantic import ValidationError

from tierdet.contract import wire
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import FrameResult
from tierdet.frontends import v2_grpc
from tierdet.frontends.errors import grpc_abort, invalid_option
from tierdet.frontends.grpc_context import CallLimit, admit, grpc_call
from tierdet.frontends.streaming import ordered_map
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving import access, memory
from tierdet.serving.metrics import ADDS_UP
from tierdet.serving.usecase import Caller, Detector

log = logging.getLogger("tierdet.grpc")
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name
# Every service on the port, as health and reflection list them.
SERVICES = (SERVICE_NAME, v2_grpc.SERVICE_NAME)


def options_from_request(request: pb.DetectRequest) -> DetectOptions:
    try:
        return DetectOptions(**wire.options_from_message(request))
    except ValidationError as exc:
        raise invalid_option(exc) from None


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, detector: Detector, calls: CallLimit) -> None:
        self.detector = detector
        self.calls = calls
        registry = detector.metrics.registry
        self.frames_held = Gauge(
            "tierdet_stream_frames_held", "Frames read from DetectStream calls and not yet "
            "answered (all streams); at most TIERDET_STREAM_MAX_INFLIGHT per stream.",
            multiprocess_mode=ADDS_UP, registry=registry)
        self.streams_open = Gauge("tierdet_streams_open", "DetectStream calls in progress.",
                                  multiprocess_mode=ADDS_UP, registry=registry)

    def _call(self, context: grpc.aio.ServicerContext, method: str
              ) -> contextlib.AbstractContextManager[access.Call]:
        return grpc_call(context, "grpc", f"Detector/{method}", method, self.detector.access,
                         self.calls)


    def _admit(self, context: grpc.aio.ServicerContext,
               received: float | None = None) -> Caller:
        return admit(self.detector, self.calls, context, "grpc", received)

    async def Detect(self, request: pb.DetectRequest,  # noqa: N802 (gRPC naming)
                     context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        received = time.perf_counter()
        with self._call(context, "Detect"):
            try:
                caller = self._admit(context, received)
                result = await self.detector.detect(caller, request.image,
                                                    options_from_request(request))
            except ApiError as exc:
                await grpc_abort(context, exc)
            except Exception:
                log.exception("unhandled error")
                await grpc_abort(context, ApiError(ErrorCode.INTERNAL, "internal error"))
            return wire.to_message(result, pb.DetectResponse())

    async def DetectStream(self, request_iterator: AsyncIterator[pb.DetectFrame],  # noqa: N802
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.DetectFrameResult]:
        with self._call(context, "DetectStream"):
            try:
                caller = self._admit(context)
            except ApiError as exc:
                await grpc_abort(context, exc)
            self.streams_open.inc()
            try:
                # Each result is yielded only once the previous one is written, and
                # ordered_map reads no further than the bound: a slow reader on the
                # other end stops us reading, and HTTP/2 flow control stops its sender.
                async def frame(f: pb.DetectFrame) -> pb.DetectFrameResult:
                    return wire.frame_to_message(await self._frame(f, caller))

                frames = _until_idle(request_iterator, self.detector.settings.stream_idle_s)
                async for result in ordered_map(frames, frame,
                                                self.detector.settings.stream_max_inflight,
                                                self.frames_held):
                    yield result
            except ApiError as exc:  # the stream itself failed (idle too long)
                await grpc_abort(context, exc)
            finally:
                self.streams_open.dec()
                memory.release_freed_soon()  # the stream's frames, freed in gRPC's threads

    async def _frame(self, frame: pb.DetectFrame, caller: Caller) -> FrameResult:
        """One frame's answer; its failure is reported in it, never raised.

        The call's deadline is not a frame's: it bounds the whole stream (and
        cancels it when it passes). Each frame is budgeted by its own sla_ms
        or tier, so a long-running stream keeps its tiers' degrade rules."""
        item = caller.restarted(frame.frame_id)
        try:
            options = options_from_request(frame.request)
        except ApiError as exc:
            self.detector.log_refused(item, DetectOptions.model_validate({}), exc)
            return FrameResult(frame.frame_id, None, wire.error_info(exc))
        try:
            result = await self.detector.detect(item, frame.request.image, options)
        except ApiError as exc:
            return FrameResult(frame.frame_id, None, wire.error_info(exc))
        except Exception:
            log.exception("unhandled error in a stream frame")
            return FrameResult(frame.frame_id, None, wire.error_info(
                ApiError(ErrorCode.INTERNAL, "internal error")))
        return FrameResult(frame.frame_id, result, None)

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        with self._call(context, "ListModels"):
            try:
                self._admit(context)
            except ApiError as exc:
                await grpc_abort(context, exc)
            return wire.to_message(self.detector.models(), pb.ListModelsResponse())


async def _until_idle(frames: AsyncIterator[T], idle_s: float) -> AsyncIterator[T]:
    """``frames``, or ApiError ``request_timeout`` once a wait for the next one
    passes ``idle_s`` (only while one is waited for: a stream held back by the
    gateway's own bound is not idle)."""
    source = aiter(frames)
    while True:
        try:
            item = await asyncio.wait_for(anext(source), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise ApiError(ErrorCode.REQUEST_TIMEOUT,
                           f"no frame came for {idle_s:g} s (TIERDET_STREAM_IDLE_S)") from None
        yield item


def create_grpc_server(
    detector: Detector, address: str, credentials: grpc.ServerCredentials | None = None,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, health.HealthServicer, int]:
    """A grpc.aio server bound to ``address`` (TLS with ``credentials``); returns it,
    its health servicer and port. ``share_port``: bind with SO_REUSEPORT, so the
    gateway's workers share it (gRPC sets it by default, which would let a second
    gateway start on a port already served)."""
    settings = detector.settings
    server = grpc.aio.server(options=[
        # One image as raw bytes (no base64 here) plus room for the options.
        ("grpc.max_receive_message_length", settings.max_image_bytes + 64 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.so_reuseport", 1 if share_port else 0),
    ])  # Detector calls are bounded by the servicer: health and reflection are not
    calls = CallLimit(settings.max_concurrency)  # detect calls of both services
    pb_grpc.add_DetectorServicer_to_server(DetectorServicer(detector, calls), server)
    v2_grpc.add_to_server(detector, server, calls)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    return server, health_servicer, port


async def set_health(health_servicer: health.HealthServicer, ready: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if ready
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", *SERVICES):
        await health_servicer.set(name, status)
