"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``
beside ``Detector`` on the gateway's gRPC port.

The messages and servicer base are tritonclient's generated modules
(``tritonclient.grpc.service_pb2``): Triton's superset of KServe's
grpc_predict_v2.proto, same package and service name, so every KServe and
Triton client speaks to it and the gateway keeps no second copy of the proto.
Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer and ModelStreamInfer; Triton's own extensions (repository,
statistics, shared memory, trace, log settings) answer UNIMPLEMENTED.

Images come as ``raw_input_contents`` (what tritonclient sends) or as
``contents.bytes_contents`` (UINT8 pixels: ``contents.uint_contents``); outputs go back as
``raw_output_contents``, as Triton answers. Refusals carry the same status,
message and ``tierdet-error-code`` metadata as ``Detector`` (``errors``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.frontends import v2_models, v2_tensors
from tierdet.frontends.errors import grpc_abort
from tierdet.frontends.grpc_context import CallLimit, admit, grpc_call
from tierdet.frontends.streaming import ordered_map
from tierdet.frontends.v2_tensors import Target
from tierdet.serving.usecase import Caller, Detector

log = logging.getLogger("tierdet.grpc")
PROTOCOL = "v2-grpc"  # the metrics, access log and trace label
SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_UNIMPLEMENTED = ("ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                  "RepositoryModelUnload", "SystemSharedMemoryStatus",
                  "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                  "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
                  "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")


def _value(parameter: v2.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def parameters_of(parameters: Mapping[str, v2.InferParameter]) -> dict[str, Any]:
    return {name: _value(p) for name, p in parameters.items()}


def _parameter(value: bool | int | float | str) -> v2.InferParameter:
    if isinstance(value, bool):
        return v2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return v2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return v2.InferParameter(double_param=value)
    return v2.InferParameter(string_param=value)


def images_of(request: v2.ModelInferRequest, max_images: int) -> list[bytes | Pixels]:
    if len(request.inputs) != 1:
        raise v2_tensors.bad_request(f"{len(request.inputs)} inputs: send exactly one, "
                                     f"{v2_tensors.INPUT}")
    tensor = request.inputs[0]
    spec = v2_tensors.check_input(tensor.name, tensor.datatype, list(tensor.shape),
                                  max_images)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise v2_tensors.bad_request("raw_input_contents must hold one tensor per input")
        return spec.images(request.raw_input_contents[0])
    if spec.pixels is not None:
        return spec.images(spec.from_values(list(tensor.contents.uint_contents)))
    images: list[bytes | Pixels] = list(tensor.contents.bytes_contents)
    if not images:
        raise ApiError(ErrorCode.EMPTY_IMAGE, f"{v2_tensors.INPUT}: the tensor holds no data")
    return v2_tensors.check_images(images, spec.count)


def infer_response(request: v2.ModelInferRequest, results: list[Any]
                   ) -> v2.ModelInferResponse:
    names = v2_tensors.requested_outputs([o.name for o in request.outputs])
    reply = v2.ModelInferResponse(model_name=request.model_name,
                                  model_version=v2_tensors.VERSION, id=request.id)
    for name, value in v2_tensors.routing_parameters(results).items():
        reply.parameters[name].CopyFrom(_parameter(value))
    for out in v2_tensors.outputs(results, names):
        reply.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        reply.raw_output_contents.append(out.raw())
    return reply


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, detector: Detector, calls: CallLimit) -> None:
        self.detector = detector
        self.calls = calls
        self.max_images = detector.settings.batch_max_images

    def _call(self, context: grpc.aio.ServicerContext, method: str) -> Any:
        return grpc_call(context, PROTOCOL, f"GRPCInferenceService/{method}", method,
                         self.detector.access, self.calls)

    def _admit(self, context: grpc.aio.ServicerContext,
               received: float | None = None) -> Caller:
        return admit(self.detector, self.calls, context, PROTOCOL, received)

    async def ServerLive(self, request: v2.ServerLiveRequest,  # noqa: N802 (gRPC naming)
                         context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.detector.ready()[0])

    async def ServerMetadata(self, request: v2.ServerMetadataRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(**v2_models.server_metadata())

    async def _target(self, context: grpc.aio.ServicerContext, name: str,
                      version: str) -> Target:
        try:
            self._admit(context)
            return v2_models.target(self.detector, name, version)
        except ApiError as exc:
            await grpc_abort(context, exc)

    async def ModelReady(self, request: v2.ModelReadyRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> v2.ModelReadyResponse:
        with self._call(context, "ModelReady"):
            target = await self._target(context, request.name, request.version)
            return v2.ModelReadyResponse(ready=v2_models.model_ready(self.detector, target))

    async def ModelMetadata(self, request: v2.ModelMetadataRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> v2.ModelMetadataResponse:
        with self._call(context, "ModelMetadata"):
            target = await self._target(context, request.name, request.version)
            meta = v2_tensors.model_metadata(target, v2_models.platform(target))
            reply = v2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                             platform=meta["platform"])
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    getattr(reply, kind).add(**t)
            return reply

    async def _infer(self, request: v2.ModelInferRequest, caller: Caller
                     ) -> v2.ModelInferResponse:
        target = v2_models.target(self.detector, request.model_name, request.model_version)
        images = images_of(request, self.max_images)
        options = v2_tensors.options_from_parameters(parameters_of(request.parameters),
                                                     target)
        v2_tensors.requested_outputs([o.name for o in request.outputs])  # before the work
        results = await v2_models.infer(self.detector, caller, images, options)
        return infer_response(request, results)

    async def ModelInfer(self, request: v2.ModelInferRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        received = time.perf_counter()
        with self._call(context, "ModelInfer"):
            try:
                return await self._infer(request, self._admit(context, received))
            except ApiError as exc:
                await grpc_abort(context, exc)
            except Exception:
                log.exception("unhandled error")
                await grpc_abort(context, ApiError(ErrorCode.INTERNAL, "internal error"))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[v2.ModelInferRequest],  # noqa: N802
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """One answer per request, in order; a refused request is answered with its
        ``error_message`` (``<code>: <message>``) and the stream goes on."""
        with self._call(context, "ModelStreamInfer"):
            try:
                caller = self._admit(context)
            except ApiError as exc:
                await grpc_abort(context, exc)

            async def one(request: v2.ModelInferRequest) -> v2.ModelStreamInferResponse:
                try:
                    reply = await self._infer(request, caller.restarted())
                except ApiError as exc:
                    return v2.ModelStreamInferResponse(
                        error_message=f"{exc.code.value}: {exc.message}")
                except Exception:
                    log.exception("unhandled error in a stream request")
                    return v2.ModelStreamInferResponse(error_message="internal_error: "
                                                       "internal error")
                return v2.ModelStreamInferResponse(infer_response=reply)

            async for answer in ordered_map(aiter(request_iterator), one,
                                            self.detector.settings.stream_max_inflight):
                yield answer


async def _unimplemented(self: InferenceServicer, request: Any,
                         context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                        "not served by tierdet: a Triton extension the gateway keeps closed")


for _name in _UNIMPLEMENTED:  # async, so the asyncio server can run them
    setattr(InferenceServicer, _name, _unimplemented)


def add_to_server(detector: Detector, server: grpc.aio.Server, calls: CallLimit) -> None:
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(detector, calls),
                                                       server)
