"""gRPC front end: tierdet.v1.Detector (Detect, DetectStream, ListModels), plus
standard health and reflection."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge
from pydantic import ValidationError

from tierdet.detector import DetectionService, DetectResult
from tierdet.errors import GRPC_CODE_KEY, ApiError, ErrorCode
from tierdet.limits import FrontendLimits
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.security import ApiKey
from tierdet.streaming import ordered_map
from tierdet.validation import DetectOptions

log = logging.getLogger("tierdet.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> None:
    trailing = [(GRPC_CODE_KEY, exc.code.value)]
    if exc.retry_after_s is not None:
        trailing.append(("retry-after", str(max(1, round(exc.retry_after_s)))))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(exc.grpc_status, f"{exc.code.value}: {exc.message}")


def options_from_request(request: pb.DetectRequest) -> DetectOptions:
    try:
        return DetectOptions(
            model=request.model or None,
            score_threshold=(request.score_threshold
                             if request.HasField("score_threshold") else None),
            max_detections=(request.max_detections
                            if request.HasField("max_detections") else None),
            tier=request.tier or None,
            sla_ms=request.sla_ms if request.HasField("sla_ms") else None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(ErrorCode.INVALID_OPTION, f"{where}: {first.get('msg')}") from None


def detect_response(result: DetectResult) -> pb.DetectResponse:
    t, r = result.timing, result.routing
    return pb.DetectResponse(
        model=result.model, width=result.width, height=result.height,
        detections=[pb.Detection(x1=d.x1, y1=d.y1, x2=d.x2, y2=d.y2, score=d.score,
                                 class_id=d.class_id, class_name=d.class_name)
                    for d in result.detections],
        timing=pb.Timing(decode_ms=t.decode_ms, preprocess_ms=t.preprocess_ms,
                         infer_ms=t.infer_ms, postprocess_ms=t.postprocess_ms,
                         total_ms=t.total_ms),
        routing=pb.Routing(tier=r.tier or "", budget_ms=r.budget_ms,
                           predicted_ms=r.predicted_ms, actual_ms=r.actual_ms,
                           degraded=r.degraded),
    )


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


def _deadline_ms(context: grpc.aio.ServicerContext) -> float | None:
    remaining_s = context.time_remaining()
    return remaining_s * 1e3 if remaining_s is not None else None


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, service: DetectionService, limits: FrontendLimits | None = None) -> None:
        self.service = service
        self.limits = limits or FrontendLimits.from_env()
        registry = service.metrics.registry
        self.frames_held = Gauge(
            "tierdet_stream_frames_held", "Frames read from DetectStream calls and not yet "
            "answered (all streams); at most TIERDET_STREAM_MAX_INFLIGHT per stream.",
            registry=registry)
        self.streams_open = Gauge("tierdet_streams_open", "DetectStream calls in progress.",
                                  registry=registry)

    async def Detect(self, request: pb.DetectRequest,  # noqa: N802 (gRPC naming)
                     context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        received = time.perf_counter()
        deadline_ms = _deadline_ms(context)
        try:
            key = self._admit(context)
            options = options_from_request(request)
            self.service.authorize(key, options, "grpc")
            result = await self.service.detect(request.image, options,
                                               protocol="grpc", received=received,
                                               deadline_ms=deadline_ms)
        except ApiError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("unhandled error")
            await _abort(context, ApiError(ErrorCode.INTERNAL, "internal error"))
        return detect_response(result)

    async def DetectStream(self, request_iterator: AsyncIterator[pb.DetectFrame],  # noqa: N802
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.DetectFrameResult]:
        try:
            key = self._admit(context)
        except ApiError as exc:
            await _abort(context, exc)
        self.streams_open.inc()
        try:
            # Each result is yielded only once the previous one is written, and
            # ordered_map reads no further than the bound: a slow reader on the
            # other end stops us reading, and HTTP/2 flow control stops its sender.
            async def frame(f: pb.DetectFrame) -> pb.DetectFrameResult:
                return await self._frame(f, key)

            async for result in ordered_map(aiter(request_iterator), frame,
                                            self.limits.stream_max_inflight, self.frames_held):
                yield result
        finally:
            self.streams_open.dec()

    def _admit(self, context: grpc.aio.ServicerContext) -> ApiKey | None:
        return self.service.admit_key(_metadata(context, "authorization"),
                                      _metadata(context, "x-api-key"), "grpc")

    async def _frame(self, frame: pb.DetectFrame, key: ApiKey | None) -> pb.DetectFrameResult:
        """One frame's answer; its failure is reported in it, never raised.

        The call's deadline is not a frame's: it bounds the whole stream (and
        cancels it when it passes). Each frame is budgeted by its own sla_ms
        or tier, so a long-running stream keeps its tiers' degrade rules."""
        received = time.perf_counter()
        try:
            options = options_from_request(frame.request)
            self.service.authorize(key, options, "grpc")
            result = await self.service.detect(frame.request.image, options, protocol="grpc",
                                               received=received)
        except ApiError as exc:
            return pb.DetectFrameResult(frame_id=frame.frame_id, error=pb.Error(
                code=exc.code.value, message=exc.message, retry_after_s=exc.retry_after_s or 0.0))
        except Exception:
            log.exception("unhandled error in a stream frame")
            return pb.DetectFrameResult(frame_id=frame.frame_id, error=pb.Error(
                code=ErrorCode.INTERNAL.value, message="internal error"))
        return pb.DetectFrameResult(frame_id=frame.frame_id, response=detect_response(result))

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            self._admit(context)
        except ApiError as exc:
            await _abort(context, exc)
        return pb.ListModelsResponse(models=[pb.ModelInfo(**i) for i in self.service.model_infos()])


def create_grpc_server(
    service: DetectionService, address: str, max_message_bytes: int,
    limits: FrontendLimits | None = None, credentials: grpc.ServerCredentials | None = None,
    max_concurrent_rpcs: int | None = None,
) -> tuple[grpc.aio.Server, health.HealthServicer, int]:
    """A grpc.aio server bound to ``address`` (TLS with ``credentials``); returns it,
    its health servicer and port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ], maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_DetectorServicer_to_server(DetectorServicer(service, limits), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    return server, health_servicer, port


async def set_health(health_servicer: health.HealthServicer, ready: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if ready
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
