"""Python client for the tierdet gateway: HTTP or gRPC, sync or async.

    from tierdet.client import Client

    with Client("http://127.0.0.1:8080") as client:
        result = client.detect("photo.jpg", tier="realtime")
        for d in result.detections:
            print(d.class_name, d.score, d.box)

``Client``/``AsyncClient`` speak HTTP (detect, render, batch, models);
``GrpcClient``/``AsyncGrpcClient`` speak gRPC (detect, frame streams,
models). Results are plain dataclasses; every refusal is a ``TierdetError``
carrying the server's stable error code. Answers that say "come back
later" (HTTP 503 or 429 with ``Retry-After``; gRPC with ``retry-after``
metadata) are retried, a bounded number of times for a bounded wait
(``RetryPolicy``). ``api_key`` is sent as ``Authorization: Bearer``.

Only the standard library and grpcio (already a dependency) are used, so
the client adds nothing to an install.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import grpc

from tierdet._httpwire import AsyncWire, Endpoint, Reply, SyncWire, WireError
from tierdet.results import Detection, Routing, Timing

ImageInput = bytes | str | os.PathLike[str]
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
CONNECTION_FAILED = "connection_failed"  # client-side code: no answer from the server


# -- results ---------------------------------------------------------------




@dataclass(frozen=True)
class DetectResult:
    model: str
    width: int
    height: int
    detections: tuple[Detection, ...]
    timing: Timing
    routing: Routing


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    input_size: int
    preprocessing: str
    published_coco_ap: float
    params_m: float
    ready: bool
    weights: str  # provenance: official, file <path>, random ...
    status: str = ""  # Triton's state: READY, UNAVAILABLE, LOADING, ...
    reason: str = ""  # why it is not ready, if known
    measured_ap: dict[str, float] = field(default_factory=dict)  # by dataset[/tier], 0..1


@dataclass(frozen=True)
class TierInfo:
    name: str
    budget_ms: float
    models: tuple[str, ...]
    degrade: bool
    default: bool


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


@dataclass(frozen=True)
class BatchItem:
    index: int
    filename: str | None
    result: DetectResult | None
    error: TierdetError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Frame:
    """One frame of a stream; options left None take the stream's defaults."""

    image: bytes
    frame_id: int | None = None  # default: the frame's position in the stream
    model: str | None = None
    tier: str | None = None
    sla_ms: float | None = None
    score_threshold: float | None = None
    max_detections: int | None = None


@dataclass(frozen=True)
class FrameResult:
    frame_id: int
    result: DetectResult | None
    error: TierdetError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Retry answers that carry a retry-after (the gateway's 503s), within bounds."""

    max_retries: int = 2
    max_wait_s: float = 5.0  # cap on one wait, whatever the server asks
    max_total_wait_s: float = 10.0

    def delay(self, error: TierdetError, waited_s: float) -> float | None:
        """Seconds to wait before sending again, or None to give up."""
        if error.retry_after_s is None or error.attempts > self.max_retries:
            return None
        wait = min(max(error.retry_after_s, 0.0), self.max_wait_s)
        return wait if waited_s + wait <= self.max_total_wait_s else None


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_retries=0)


@dataclass(frozen=True)
class _Options:
    model: str | None = None
    tier: str | None = None
    sla_ms: float | None = None
    score_threshold: float | None = None
    max_detections: int | None = None

    def fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None}


# -- conversions -----------------------------------------------------------


def _read_image(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def _result_from_json(d: dict[str, Any]) -> DetectResult:
    r = d["routing"]
    return DetectResult(
        model=d["model"], width=d["width"], height=d["height"],
        detections=tuple(Detection(**det) for det in d["detections"]),
        timing=Timing(**d["timing"]),
        routing=Routing(tier=r["tier"], budget_ms=r["budget_ms"],
                        predicted_ms=r["predicted_ms"], actual_ms=r["actual_ms"],
                        degraded=r["degraded"]))


def _result_from_pb(m: Any) -> DetectResult:
    t, r = m.timing, m.routing
    return DetectResult(
        model=m.model, width=m.width, height=m.height,
        detections=tuple(Detection(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id, d.class_name)
                         for d in m.detections),
        timing=Timing(t.decode_ms, t.preprocess_ms, t.infer_ms, t.postprocess_ms, t.total_ms),
        routing=Routing(r.tier or None, r.budget_ms, r.predicted_ms, r.actual_ms, r.degraded))


_MODEL_FIELDS = frozenset(f.name for f in fields(ModelInfo))


def _models_from_json(d: dict[str, Any]) -> list[ModelInfo]:
    # Fields a newer gateway adds are dropped, not fatal.
    return [ModelInfo(**{k: v for k, v in m.items() if k in _MODEL_FIELDS})
            for m in d["models"]]


def _tiers_from_json(d: dict[str, Any]) -> list[TierInfo]:
    return [TierInfo(t["name"], t["budget_ms"], tuple(t["models"]), t["degrade"],
                     t["name"] == d["default_tier"]) for t in d["tiers"]]


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP-date: the gateway never sends one
        return None


def _http_error(reply: Reply, attempts: int) -> TierdetError:
    try:
        body = json.loads(reply.body)["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{reply.status}", reply.body[:200].decode("utf-8", "replace")
    return TierdetError(code, message, status=reply.status, attempts=attempts,
                        retry_after_s=_retry_after(reply.headers.get("retry-after")))


def _json(reply: Reply) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        raise TierdetError("unexpected_response", "the gateway answered with invalid JSON",
                           status=reply.status) from None


def _multipart(files: Sequence[tuple[str, str, bytes]], form: dict[str, str]
               ) -> tuple[bytes, str]:
    """multipart/form-data body and its content type."""
    boundary = "tierdet-" + secrets.token_hex(16)
    out: list[bytes] = []
    for name, value in form.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n".encode())
    for name, filename, data in files:
        safe = filename.replace('"', "'").replace("\r", " ").replace("\n", " ")
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                   f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                   .encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def _batch_files(images: Sequence[ImageInput]) -> list[tuple[str, str, bytes]]:
    files = []
    for i, image in enumerate(images):
        name = f"image-{i}" if isinstance(image, bytes | bytearray | memoryview) else (
            Path(image).name)
        files.append(("images", name, _read_image(image)))
    return files


def _batch_from_json(d: dict[str, Any]) -> list[BatchItem]:
    items = []
    for item in d["results"]:
        err = item.get("error")
        items.append(BatchItem(
            index=item["index"], filename=item.get("filename"),
            result=_result_from_json(item["result"]) if item.get("result") else None,
            error=TierdetError(err["code"], err["message"]) if err else None))
    return items


# -- HTTP ------------------------------------------------------------------


class _HttpRequests:
    """What to send for each call; the sync and async clients only move bytes."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.endpoint = Endpoint.parse(url)
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def detect(self, image: ImageInput, options: _Options, render: str | None = None
               ) -> tuple[str, bytes, dict[str, str]]:
        query = options.fields()
        headers = {**self.auth, "Content-Type": "application/octet-stream"}
        if render is not None:
            query["render"] = "true"
            headers["Accept"] = "image/png" if render == "png" else "image/jpeg"
        return f"/v1/detect?{urlencode(query)}", _read_image(image), headers

    def batch(self, images: Sequence[ImageInput], options: _Options
              ) -> tuple[str, bytes, dict[str, str]]:
        body, ctype = _multipart(_batch_files(images), options.fields())
        return "/v1/detect/batch", body, {**self.auth, "Content-Type": ctype}


class Client:
    """Sync HTTP client. Not thread-safe: one per thread (it keeps a connection)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, api_key: str | None = None) -> None:
        self._req = _HttpRequests(url, api_key)
        self._wire = SyncWire(self._req.endpoint, timeout_s)
        self.retry = retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._wire.close()

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> Reply:
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = self._wire.request(method, path, body, headers)
            except WireError as exc:
                raise TierdetError(CONNECTION_FAILED, str(exc), attempts=attempts) from None
            if reply.status < 400:
                return reply
            error = _http_error(reply, attempts)
            wait = self.retry.delay(error, waited)
            if wait is None:
                raise error
            time.sleep(wait)
            waited += wait

    def detect(self, image: ImageInput, *, model: str | None = None, tier: str | None = None,
               sla_ms: float | None = None, score_threshold: float | None = None,
               max_detections: int | None = None) -> DetectResult:
        """Detect objects in one image (bytes or a file path)."""
        path, body, headers = self._req.detect(image, _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        return _result_from_json(_json(self._send("POST", path, body, headers)))

    def render(self, image: ImageInput, *, fmt: Literal["jpeg", "png"] = "jpeg",
               model: str | None = None, tier: str | None = None, sla_ms: float | None = None,
               score_threshold: float | None = None, max_detections: int | None = None
               ) -> bytes:
        """The image with its detections drawn, encoded as ``fmt``."""
        path, body, headers = self._req.detect(image, _Options(
            model, tier, sla_ms, score_threshold, max_detections), render=fmt)
        return self._send("POST", path, body, headers).body

    def detect_batch(self, images: Sequence[ImageInput], *, model: str | None = None,
                     tier: str | None = None, sla_ms: float | None = None,
                     score_threshold: float | None = None, max_detections: int | None = None
                     ) -> list[BatchItem]:
        """Several images in one call; each answered (or refused) on its own."""
        path, body, headers = self._req.batch(images, _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        return _batch_from_json(_json(self._send("POST", path, body, headers)))

    def models(self) -> list[ModelInfo]:
        return _models_from_json(_json(self._send("GET", "/v1/models", None, self._req.auth)))

    def tiers(self) -> list[TierInfo]:
        return _tiers_from_json(_json(self._send("GET", "/v1/models", None, self._req.auth)))


class AsyncClient:
    """Async HTTP client (asyncio); safe to share between tasks."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy = DEFAULT_RETRY, api_key: str | None = None) -> None:
        self._req = _HttpRequests(url, api_key)
        self._wire = AsyncWire(self._req.endpoint, timeout_s)
        self.retry = retry

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Nothing is kept open between calls; here for symmetry with the others."""

    async def _send(self, method: str, path: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> Reply:
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = await self._wire.request(method, path, body, headers)
            except WireError as exc:
                raise TierdetError(CONNECTION_FAILED, str(exc), attempts=attempts) from None
            if reply.status < 400:
                return reply
            error = _http_error(reply, attempts)
            wait = self.retry.delay(error, waited)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            waited += wait

    async def detect(self, image: ImageInput, *, model: str | None = None,
                     tier: str | None = None, sla_ms: float | None = None,
                     score_threshold: float | None = None, max_detections: int | None = None
                     ) -> DetectResult:
        path, body, headers = self._req.detect(image, _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        return _result_from_json(_json(await self._send("POST", path, body, headers)))

    async def render(self, image: ImageInput, *, fmt: Literal["jpeg", "png"] = "jpeg",
                     model: str | None = None, tier: str | None = None,
                     sla_ms: float | None = None, score_threshold: float | None = None,
                     max_detections: int | None = None) -> bytes:
        path, body, headers = self._req.detect(image, _Options(
            model, tier, sla_ms, score_threshold, max_detections), render=fmt)
        return (await self._send("POST", path, body, headers)).body

    async def detect_batch(self, images: Sequence[ImageInput], *, model: str | None = None,
                           tier: str | None = None, sla_ms: float | None = None,
                           score_threshold: float | None = None,
                           max_detections: int | None = None) -> list[BatchItem]:
        path, body, headers = self._req.batch(images, _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        return _batch_from_json(_json(await self._send("POST", path, body, headers)))

    async def models(self) -> list[ModelInfo]:
        return _models_from_json(_json(await self._send("GET", "/v1/models", None,
                                                         self._req.auth)))

    async def tiers(self) -> list[TierInfo]:
        return _tiers_from_json(_json(await self._send("GET", "/v1/models", None,
                                                        self._req.auth)))


# -- gRPC ------------------------------------------------------------------


def _grpc_error(exc: grpc.RpcError, attempts: int) -> TierdetError:
    status = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    meta = {key: value for key, value in (trailing or ())}
    code = meta.get("tierdet-error-code")
    if code is None:  # not from the gateway's handlers: the transport's own status
        code = (CONNECTION_FAILED if status == grpc.StatusCode.UNAVAILABLE
                else status.name.lower())
    message = details.removeprefix(f"{code}: ")
    return TierdetError(code, message, grpc_code=status.name, attempts=attempts,
                        retry_after_s=_retry_after(meta.get("retry-after")))


def _pb():
    # Imported on first use: HTTP-only users never load the generated code.
    from tierdet.proto import detection_pb2, detection_pb2_grpc

    return detection_pb2, detection_pb2_grpc


def _request_pb(image: bytes, options: _Options) -> Any:
    pb, _ = _pb()
    req = pb.DetectRequest(image=image, model=options.model or "", tier=options.tier or "")
    if options.score_threshold is not None:
        req.score_threshold = options.score_threshold
    if options.max_detections is not None:
        req.max_detections = options.max_detections
    if options.sla_ms is not None:
        req.sla_ms = options.sla_ms
    return req


def _frame_pb(position: int, frame: bytes | Frame, defaults: _Options) -> Any:
    pb, _ = _pb()
    if not isinstance(frame, Frame):
        frame = Frame(image=bytes(frame))
    own = {f.name: getattr(frame, f.name) for f in fields(_Options)
           if getattr(frame, f.name) is not None}
    return pb.DetectFrame(
        frame_id=position if frame.frame_id is None else frame.frame_id,
        request=_request_pb(frame.image, replace(defaults, **own)))


def _frame_result(m: Any) -> FrameResult:
    if m.WhichOneof("outcome") == "error":
        e = m.error
        error = TierdetError(e.code, e.message,
                             retry_after_s=e.retry_after_s if e.retry_after_s > 0 else None)
        return FrameResult(m.frame_id, None, error)
    return FrameResult(m.frame_id, _result_from_pb(m.response), None)


def _model_from_pb(m: Any) -> ModelInfo:
    return ModelInfo(m.name, m.family, m.input_size, m.preprocessing, m.published_coco_ap,
                     m.params_m, m.ready, m.weights, m.status, m.reason, dict(m.measured_ap))


@dataclass
class _GrpcBase:
    target: str = DEFAULT_GRPC_TARGET
    timeout_s: float = 30.0
    retry: RetryPolicy = DEFAULT_RETRY
    # Large enough for a frame at the gateway's default image limit (20 MiB).
    max_message_bytes: int = 32 * 1024 * 1024
    channel_options: tuple[tuple[str, Any], ...] = field(default=())
    api_key: str | None = None

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def _options(self) -> list[tuple[str, Any]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                *self.channel_options]


class GrpcClient(_GrpcBase):
    """Sync gRPC client over one channel (thread-safe, as gRPC channels are)."""

    def __init__(self, target: str = DEFAULT_GRPC_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        _, pb_grpc = _pb()
        self._channel = grpc.insecure_channel(self.target, options=self._options())
        self._stub = pb_grpc.DetectorStub(self._channel)

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def detect(self, image: ImageInput, *, model: str | None = None, tier: str | None = None,
               sla_ms: float | None = None, score_threshold: float | None = None,
               max_detections: int | None = None) -> DetectResult:
        request = _request_pb(_read_image(image), _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = self._stub.Detect(request, timeout=self.timeout_s,
                                          metadata=self._metadata)
                return _result_from_pb(reply)
            except grpc.RpcError as exc:
                error = _grpc_error(exc, attempts)
            wait = self.retry.delay(error, waited)
            if wait is None:
                raise error
            time.sleep(wait)
            waited += wait

    def detect_stream(self, frames: Iterable[bytes | Frame], *, timeout_s: float | None = None,
                      model: str | None = None, tier: str | None = None,
                      sla_ms: float | None = None, score_threshold: float | None = None,
                      max_detections: int | None = None) -> Iterator[FrameResult]:
        """One ``FrameResult`` per frame, in order; a failed frame carries its error.

        Frames are pulled from ``frames`` only as fast as the server takes
        them (it holds a bounded number per stream). Not retried.
        """
        defaults = _Options(model, tier, sla_ms, score_threshold, max_detections)
        requests = (_frame_pb(i, f, defaults) for i, f in enumerate(frames))
        call = self._stub.DetectStream(requests, timeout=timeout_s, metadata=self._metadata)
        try:
            for reply in call:
                yield _frame_result(reply)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, 1) from None
        finally:
            call.cancel()  # the consumer stopped early: end the stream server-side too

    def models(self) -> list[ModelInfo]:
        pb, _ = _pb()
        try:
            reply = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s,
                                          metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, 1) from None
        return [_model_from_pb(m) for m in reply.models]


class AsyncGrpcClient(_GrpcBase):
    """Async gRPC client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str = DEFAULT_GRPC_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        _, pb_grpc = _pb()
        self._channel = grpc.aio.insecure_channel(self.target, options=self._options())
        self._stub = pb_grpc.DetectorStub(self._channel)

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def detect(self, image: ImageInput, *, model: str | None = None,
                     tier: str | None = None, sla_ms: float | None = None,
                     score_threshold: float | None = None, max_detections: int | None = None
                     ) -> DetectResult:
        request = _request_pb(_read_image(image), _Options(
            model, tier, sla_ms, score_threshold, max_detections))
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = await self._stub.Detect(request, timeout=self.timeout_s,
                                                metadata=self._metadata)
                return _result_from_pb(reply)
            except grpc.RpcError as exc:
                error = _grpc_error(exc, attempts)
            wait = self.retry.delay(error, waited)
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            waited += wait

    async def detect_stream(self, frames: AsyncIterable[bytes | Frame] | Iterable[bytes | Frame],
                            *, timeout_s: float | None = None, model: str | None = None,
                            tier: str | None = None, sla_ms: float | None = None,
                            score_threshold: float | None = None,
                            max_detections: int | None = None) -> AsyncIterator[FrameResult]:
        """As ``GrpcClient.detect_stream``; ``frames`` may be sync or async."""
        defaults = _Options(model, tier, sla_ms, score_threshold, max_detections)

        async def requests() -> AsyncIterator[Any]:
            position = 0
            if isinstance(frames, AsyncIterable):
                async for f in frames:
                    yield _frame_pb(position, f, defaults)
                    position += 1
            else:
                for f in frames:
                    yield _frame_pb(position, f, defaults)
                    position += 1

        call = self._stub.DetectStream(requests(), timeout=timeout_s,
                                       metadata=self._metadata)
        try:
            async for reply in call:
                yield _frame_result(reply)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, 1) from None
        finally:
            call.cancel()

    async def models(self) -> list[ModelInfo]:
        pb, _ = _pb()
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s,
                                          metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _grpc_error(exc, 1) from None
        return [_model_from_pb(m) for m in reply.models]


__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncGrpcClient",
    "BatchItem",
    "Client",
    "DetectResult",
    "Detection",
    "Frame",
    "FrameResult",
    "GrpcClient",
    "ModelInfo",
    "RetryPolicy",
    "Routing",
    "TierInfo",
    "TierdetError",
    "Timing",
]
