"""The HTTP clients (httpx): ``Client`` and ``AsyncClient`` differ only in I/O."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import httpx

from tierdet.client._calls import HttpCall, HttpCalls, ImageInput
from tierdet.client._errors import CONNECTION_FAILED, TierdetError, from_http
from tierdet.client._retry import DEFAULT_RETRY, RetryPolicy
from tierdet.contract.results import BatchItem, DetectResult, ModelInfo, ModelsInfo, TierInfo

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8080"


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise from_http(response.status_code, response.content, response.headers, 1)
    return response


def _connection_failed(exc: httpx.TransportError) -> TierdetError:
    return TierdetError(CONNECTION_FAILED, str(exc) or type(exc).__name__)


class Client:
    """Sync HTTP client; keeps connections alive (one pool, thread-safe as httpx is)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, api_key: str | None = None) -> None:
        self._calls = HttpCalls(api_key)
        self._http = httpx.Client(base_url=url, timeout=timeout_s)
        self.retry = retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: HttpCall[T]) -> T:
        attempts = self.retry.start()
        while True:
            try:
                return call.read(self._once(call))
            except TierdetError as exc:
                error = exc
            time.sleep(attempts.after(error))

    def _once(self, call: HttpCall[Any]) -> httpx.Response:
        try:
            return _checked(self._http.request(**call.request))
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from None

    def detect(self, image: ImageInput, **options: Any) -> DetectResult:
        """Detect objects in one image (bytes or a file path); ``options`` are
        ``tierdet.contract.options.DetectOptions`` fields (tier, sla_ms, ...)."""
        return self._send(self._calls.detect(image, options))

    def render(self, image: ImageInput, *, fmt: Literal["jpeg", "png"] = "jpeg",
               **options: Any) -> bytes:
        """The image with its detections drawn, encoded as ``fmt``."""
        return self._send(self._calls.render(image, fmt, options))

    def detect_batch(self, images: Sequence[ImageInput], **options: Any) -> list[BatchItem]:
        """Several images in one call; each answered (or refused) on its own."""
        return self._send(self._calls.batch(images, options))

    def models_info(self) -> ModelsInfo:
        """The served models and the tiers, as ``GET /v1/models`` answers."""
        return self._send(self._calls.models())

    def models(self) -> list[ModelInfo]:
        return list(self.models_info().models)

    def tiers(self) -> list[TierInfo]:
        return list(self.models_info().tiers)


class AsyncClient:
    """Async HTTP client (asyncio); safe to share between tasks."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, api_key: str | None = None) -> None:
        self._calls = HttpCalls(api_key)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout_s)
        self.retry = retry

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: HttpCall[T]) -> T:
        attempts = self.retry.start()
        while True:
            try:
                return call.read(await self._once(call))
            except TierdetError as exc:
                error = exc
            await asyncio.sleep(attempts.after(error))

    async def _once(self, call: HttpCall[Any]) -> httpx.Response:
        try:
            return _checked(await self._http.request(**call.request))
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from None

    async def detect(self, image: ImageInput, **options: Any) -> DetectResult:
        return await self._send(self._calls.detect(image, options))

    async def render(self, image: ImageInput, *, fmt: Literal["jpeg", "png"] = "jpeg",
                     **options: Any) -> bytes:
        return await self._send(self._calls.render(image, fmt, options))

    async def detect_batch(self, images: Sequence[ImageInput], **options: Any
                           ) -> list[BatchItem]:
        return await self._send(self._calls.batch(images, options))

    async def models_info(self) -> ModelsInfo:
        return await self._send(self._calls.models())

    async def models(self) -> list[ModelInfo]:
        return list((await self.models_info()).models)

    async def tiers(self) -> list[TierInfo]:
        return list((await self.models_info()).tiers)
