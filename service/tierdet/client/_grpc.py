"""The gRPC clients (grpcio): ``GrpcClient`` and ``AsyncGrpcClient`` differ only in I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from tierdet.client._calls import Frame, ImageInput, detect_options, grpc_frame, grpc_request
from tierdet.client._errors import from_grpc
from tierdet.client._retry import DEFAULT_RETRY, RetryPolicy
from tierdet.contract import wire
from tierdet.contract.results import DetectResult, FrameResult, ModelInfo, ModelsInfo, TierInfo
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc

T = TypeVar("T")
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
# Large enough for a frame at the gateway's default image limit (20 MiB).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class _Channel:
    """What both gRPC clients keep: channel options, metadata, timeout, retries."""

    def __init__(self, target: str, timeout_s: float, retry: RetryPolicy,
                 max_message_bytes: int, channel_options: Iterable[tuple[str, Any]],
                 api_key: str | None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry = retry
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.options = [("grpc.max_send_message_length", max_message_bytes),
                        ("grpc.max_receive_message_length", max_message_bytes),
                        *channel_options]


class GrpcClient(_Channel):
    """Sync gRPC client over one channel (thread-safe, as gRPC channels are)."""

    def __init__(self, target: str = DEFAULT_GRPC_TARGET, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 channel_options: Iterable[tuple[str, Any]] = (),
                 api_key: str | None = None) -> None:
        super().__init__(target, timeout_s, retry, max_message_bytes, channel_options, api_key)
        self._channel = grpc.insecure_channel(self.target, options=self.options)
        self._stub = pb_grpc.DetectorStub(self._channel)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Callable[..., T], request: Any) -> T:
        attempts = self.retry.start()
        while True:
            try:
                return method(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = from_grpc(exc, 1)
            time.sleep(attempts.after(error))

    def detect(self, image: ImageInput, **options: Any) -> DetectResult:
        """Detect objects in one image; ``options`` as for ``Client.detect``."""
        reply = self._unary(self._stub.Detect, grpc_request(image, options))
        return wire.from_message(DetectResult, reply)

    def detect_stream(self, frames: Iterable[bytes | Frame], *, timeout_s: float | None = None,
                      **options: Any) -> Iterator[FrameResult]:
        """One ``FrameResult`` per frame, in order; a failed frame carries its error.

        Frames are pulled from ``frames`` only as fast as the server takes
        them (it holds a bounded number per stream). Not retried.
        """
        defaults = detect_options(options)
        requests = (grpc_frame(i, f, defaults) for i, f in enumerate(frames))
        call = self._stub.DetectStream(requests, timeout=timeout_s, metadata=self.metadata)
        try:
            for reply in call:
                yield wire.frame_from_message(reply)
        except grpc.RpcError as exc:
            raise from_grpc(exc, 1) from None
        finally:
            call.cancel()  # the consumer stopped early: end the stream server-side too

    def models_info(self) -> ModelsInfo:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return wire.from_message(ModelsInfo, reply)

    def models(self) -> list[ModelInfo]:
        return list(self.models_info().models)

    def tiers(self) -> list[TierInfo]:
        return list(self.models_info().tiers)


class AsyncGrpcClient(_Channel):
    """Async gRPC client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str = DEFAULT_GRPC_TARGET, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 channel_options: Iterable[tuple[str, Any]] = (),
                 api_key: str | None = None) -> None:
        super().__init__(target, timeout_s, retry, max_message_bytes, channel_options, api_key)
        self._channel = grpc.aio.insecure_channel(self.target, options=self.options)
        self._stub = pb_grpc.DetectorStub(self._channel)

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        attempts = self.retry.start()
        while True:
            try:
                return await method(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = from_grpc(exc, 1)
            await asyncio.sleep(attempts.after(error))

    async def detect(self, image: ImageInput, **options: Any) -> DetectResult:
        reply = await self._unary(self._stub.Detect, grpc_request(image, options))
        return wire.from_message(DetectResult, reply)

    async def detect_stream(self, frames: AsyncIterable[bytes | Frame] | Iterable[bytes | Frame],
                            *, timeout_s: float | None = None, **options: Any
                            ) -> AsyncIterator[FrameResult]:
        """As ``GrpcClient.detect_stream``; ``frames`` may be sync or async."""
        defaults = detect_options(options)

        async def requests() -> AsyncIterator[pb.DetectFrame]:
            source = frames if isinstance(frames, AsyncIterable) else _aiter(frames)
            position = 0
            async for f in source:
                yield grpc_frame(position, f, defaults)
                position += 1

        call = self._stub.DetectStream(requests(), timeout=timeout_s, metadata=self.metadata)
        try:
            async for reply in call:
                yield wire.frame_from_message(reply)
        except grpc.RpcError as exc:
            raise from_grpc(exc, 1) from None
        finally:
            call.cancel()

    async def models_info(self) -> ModelsInfo:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return wire.from_message(ModelsInfo, reply)

    async def models(self) -> list[ModelInfo]:
        return list((await self.models_info()).models)

    async def tiers(self) -> list[TierInfo]:
        return list((await self.models_info()).tiers)


async def _aiter(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item
