"""The gateway's only door to Triton: async gRPC, errors mapped to ApiError.

``TritonClient`` is the real ``tierdet.serving.backend.Backend``.

Triton's control plane is closed to everyone but the gateway: its model
control (load, unload: a load can carry files that run code), model config,
shared-memory, statistics, trace and logging APIs answer only calls that
carry ``API_KEY_HEADER`` (over gRPC ``GRPC_KEY_HEADER``) with the
deployment's key (``restricted_api_args`` are the tritonserver flags, the
one definition the local stack uses and the chart and compose mirror); the
gateway sends it on its own such calls.
Inference, health and metadata stay open to whoever reaches the port."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import httpx
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.registry.tensors import INPUT_NAME, OUTPUT_NAME, PROVENANCE_PREFIX
from tierdet.serving import tracing
from tierdet.serving.backend import QueueReport, Served
from tierdet.serving.shm import Region, SharedMemoryPool, UnmappableError

log = logging.getLogger("tierdet.triton")
KEEPALIVE_MS = 10_000
API_KEY_HEADER = "tierdet-admin"  # over HTTP; gRPC metadata: GRPC_KEY_HEADER
GRPC_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"  # Triton's prefix for gRPC
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace",
                   "logging")


def restricted_api_args(key: str) -> list[str]:
    """tritonserver flags that restrict ``RESTRICTED_APIS`` to callers sending
    ``key`` in ``API_KEY_HEADER`` (gRPC: ``GRPC_KEY_HEADER``), over HTTP and gRPC."""
    spec = f"{','.join(RESTRICTED_APIS)}:{API_KEY_HEADER}={key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def channel_args(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """gRPC channel options of a client to one Triton.

    Keep-alive pings make a call to a Triton that vanished without closing the
    connection (a node lost, a partition) fail within ``keepalive_ms`` + 2 s, not
    at its deadline; 0 turns them off. Triton (gRPC's server defaults:
    --grpc-http2-min-recv-ping-interval-without-data 300 s, --grpc-http2-max-ping-strikes
    2) answers a client that pings more often while it sends no data with GOAWAY
    "too_many_pings". This client pings only while a call is open, at most twice
    until data flows, and the model watcher reads Triton's repository index every
    second, which is data: against a tritonserver with that policy it is never cut
    off (tests/test_keepalive.py, which also shows a client that pings idle
    channels is). A short reconnect backoff lets a restarted Triton be used again
    within a second or two (gRPC's default backoff grows to minutes).
    """
    keepalive = [("grpc.keepalive_time_ms", keepalive_ms), ("grpc.keepalive_timeout_ms", 2_000),
                 ("grpc.keepalive_permit_without_calls", 0),
                 ("grpc.http2.max_pings_without_data", 2)] if keepalive_ms else []
    return [*keepalive,
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024)]


_PENDING = "nv_inference_pending_request_count{"
_DONE = ("nv_inference_request_success{", "nv_inference_request_failure{")
# What each answered request cost the device (cumulative counters).
_SERVED = {"nv_inference_request_success{": "requests",
           "nv_inference_queue_duration_us{": "queue_us",
           "nv_inference_count{": "images", "nv_inference_exec_count{": "executions",
           "nv_inference_compute_infer_duration_us{": "compute_us"}


def _by_model(line: str, prefix: str, out: dict[str, float]) -> None:
    labels, _, value = line[len(prefix):].rpartition("} ")
    for label in labels.split(","):
        key, _, quoted = label.partition("=")
        if key == "model":
            name = quoted.strip('"')
            out[name] = out.get(name, 0) + float(value)


def queue_report(metrics_text: str) -> QueueReport:
    """Triton's queue per model from its /metrics page (summed over versions and
    failure reasons): requests waiting, and requests taken in so far."""
    pending: dict[str, float] = {}
    done: dict[str, float] = {}
    served: dict[str, dict[str, float]] = {name: {} for name in _SERVED.values()}
    for line in metrics_text.splitlines():
        prefix = line[:line.find("{") + 1]
        if prefix == _PENDING:
            _by_model(line, _PENDING, pending)
        elif prefix in _DONE:
            _by_model(line, prefix, done)
        if prefix in _SERVED:
            _by_model(line, prefix, served[_SERVED[prefix]])
    arrived = {m: int(done.get(m, 0) + pending.get(m, 0)) for m in done.keys() | pending.keys()}
    models = set().union(*served.values())
    return QueueReport({m: int(n) for m, n in pending.items()}, arrived, {
        m: Served(int(served["requests"].get(m, 0)), served["queue_us"].get(m, 0.0),
                  int(served["images"].get(m, 0)), int(served["executions"].get(m, 0)),
                  served["compute_us"].get(m, 0.0))
        for m in models})


def _unreachable(exc: InferenceServerException) -> bool:
    status = exc.status() or ""
    return "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status


def _to_api_error(exc: InferenceServerException, model: str) -> ApiError:
    status = exc.status() or ""
    text = exc.message() or str(exc)
    if "DEADLINE_EXCEEDED" in status or "timeout" in text.lower():
        return ApiError(ErrorCode.DEADLINE_EXCEEDED, f"{model}: the deadline passed at Triton")
    if "UNAVAILABLE" in status or "failed to connect" in text.lower():
        return ApiError(ErrorCode.TRITON_UNAVAILABLE, "the inference server is unreachable",
                        retry_after_s=1.0)
    if "not ready" in text.lower() or "unknown model" in text.lower() or "NOT_FOUND" in status:
        return ApiError(ErrorCode.MODEL_NOT_READY, f"model {model} is not loaded",
                        retry_after_s=5.0)
    return ApiError(ErrorCode.INFERENCE_FAILED, f"{model}: inference failed")


class TritonClient:
    def __init__(self, url: str, shared_memory: bool = True,
                 keepalive_ms: int = KEEPALIVE_MS, api_key: str | None = None) -> None:
        """``api_key``: what Triton's restricted APIs want (None: sent nothing)."""
        self.url = url
        self._key = {GRPC_KEY_HEADER: api_key} if api_key else None
        self._said_refused = False
        self._client = triton_aio.InferenceServerClient(
            url, channel_args=channel_args(keepalive_ms))
        self.shm = SharedMemoryPool(self._register) if shared_memory else None
        self._staged: dict[int, Region] = {}  # buffer address -> its region
        self._http: httpx.AsyncClient | None = None  # for Triton's metrics page

    async def close(self) -> None:
        if self.shm is not None:
            for name in self.shm.registered():
                with contextlib.suppress(InferenceServerException):
                    await self._client.unregister_system_shared_memory(
                        name, headers=self._key, client_timeout=1.0)
            self.shm.close()
        if self._http is not None:
            await self._http.aclose()
        await self._client.close()

    async def queued(self, metrics_url: str, timeout_s: float = 0.5) -> QueueReport:
        """This Triton's queue per model (every client's requests)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=timeout_s)
        response = await self._http.get(metrics_url, timeout=timeout_s)
        response.raise_for_status()
        return queue_report(response.text)

    async def _register(self, name: str, key: str, size: int) -> None:
        try:
            await self._client.register_system_shared_memory(name, key, size, headers=self._key,
                                                             client_timeout=2.0)
        except InferenceServerException as exc:
            if _unreachable(exc):
                raise
            raise UnmappableError(exc.message() or str(exc)) from None

    @contextlib.contextmanager
    def input_buffer(self, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """A uint8 array to prepare one call's input in: a shared-memory region that
        Triton reads in place when it can, else ordinary memory."""
        pool = self.shm
        region = pool.take(int(np.prod(shape))) if pool is not None else None
        if pool is None or region is None:
            yield np.empty(shape, np.uint8)
            return
        self._staged[region.address] = region
        try:
            yield region.view(shape)
        finally:
            del self._staged[region.address]
            pool.release(region)

    async def infer(self, model: str, images: np.ndarray, timeout_s: float,
                    priority: int = 0) -> np.ndarray:
        """uint8 [B, S, S, 3] -> detections [B, K, 6]; ``timeout_s`` bounds the call
        and travels to Triton's queue policy so expired work is dropped there.
        An array from ``input_buffer`` goes by its shared-memory region."""
        pool = self.shm
        region = self._staged.get(images.__array_interface__["data"][0])
        try:
            if pool is not None and region is not None and not await pool.ready(region):
                region = None  # Triton cannot map it: the same pixels over the wire
            return await self._infer(model, images, timeout_s, priority, region)
        except InferenceServerException as exc:
            if pool is None or region is None or \
                    "shared memory" not in (exc.message() or "").lower():
                raise _to_api_error(exc, model) from None
            pool.forget()  # Triton restarted: it knows none of the regions
        try:  # the region was unknown to Triton: this once, over the wire
            return await self._infer(model, images, timeout_s, priority, None)
        except InferenceServerException as exc:
            raise _to_api_error(exc, model) from None

    async def _infer(self, model: str, images: np.ndarray, timeout_s: float, priority: int,
                     region: Region | None) -> np.ndarray:
        tensor = InferInput(INPUT_NAME, list(images.shape), "UINT8")
        if region is not None:
            tensor.set_shared_memory(region.name, images.nbytes)
        else:
            tensor.set_data_from_numpy(images)
        result = await self._client.infer(
            model, [tensor], outputs=[InferRequestedOutput(OUTPUT_NAME)],
            priority=priority, timeout=max(1, int(timeout_s * 1e6)),
            client_timeout=timeout_s, headers=tracing.headers(),  # Triton continues the trace
        )
        return result.as_numpy(OUTPUT_NAME)

    async def server_live(self, timeout_s: float = 1.0) -> bool:
        try:
            return await self._client.is_server_live(client_timeout=timeout_s)
        except InferenceServerException:
            return False

    async def model_ready(self, model: str, timeout_s: float = 1.0) -> bool:
        try:
            return await self._client.is_model_ready(model, client_timeout=timeout_s)
        except InferenceServerException:
            return False

    async def repository_models(self, timeout_s: float = 2.0) -> dict[str, tuple[str, str]]:
        """Model name -> (state, reason) as Triton reports it: READY, UNAVAILABLE
        (with the load error as reason), LOADING, ..."""
        try:
            index = await self._client.get_model_repository_index(
                as_json=True, headers=self._key, client_timeout=timeout_s)
        except InferenceServerException as exc:
            self._say_if_refused(exc)
            raise
        # One entry per version: a model being replaced lists its old version
        # (UNLOADING) beside the new one; it serves while any version is READY.
        out: dict[str, tuple[str, str]] = {}
        for m in index.get("models", []):
            state = (m.get("state", ""), m.get("reason", ""))
            if m["name"] not in out or state[0] == "READY":
                out[m["name"]] = state
        return out

    async def load_model(self, model: str, timeout_s: float = 300.0) -> None:
        """Load ``model`` from Triton's repository (explicit model control); for a
        loaded one, load the versions its folder holds now: the old keeps serving
        until the new is ready, then finishes what it holds and is unloaded."""
        try:
            await self._client.load_model(model, headers=self._key, client_timeout=timeout_s)
        except InferenceServerException as exc:
            self._say_if_refused(exc)
            raise ApiError(ErrorCode.LOAD_FAILED, f"{model}: triton {self.url} did not load "
                           f"it: {exc.message() or exc}") from None

    async def unload_model(self, model: str, timeout_s: float = 30.0) -> None:
        """Unload ``model``: Triton lets the requests it holds finish first."""
        try:
            await self._client.unload_model(model, headers=self._key, client_timeout=timeout_s)
        except InferenceServerException as exc:
            self._say_if_refused(exc)
            raise ApiError(ErrorCode.LOAD_FAILED, f"{model}: triton {self.url} did not unload "
                           f"it: {exc.message() or exc}") from None

    def _say_if_refused(self, exc: InferenceServerException) -> None:
        """Log, once, that Triton refuses this gateway's key: to the gateway that
        looks like a Triton that is down, and the operator must learn why."""
        if "restricted" in (exc.message() or "") and not self._said_refused:
            self._said_refused = True
            log.error("triton %s refuses the gateway's calls to its restricted APIs: "
                      "TIERDET_TRITON_API_KEY is %s", self.url,
                      "wrong" if self._key else "not set")

    async def batch_executions(self, model: str, timeout_s: float = 2.0) -> dict[int, int]:
        """Cumulative executions per batch size for ``model`` (statistics API)."""
        stats = await self._client.get_inference_statistics(model, as_json=True, headers=self._key,
                                                            client_timeout=timeout_s)
        out: dict[int, int] = {}
        for entry in stats.get("model_stats", []):
            for batch in entry.get("batch_stats", []):
                size = int(batch["batch_size"])
                out[size] = out.get(size, 0) + int(batch["compute_infer"]["count"])
        return out

    async def provenance(self, model: str, timeout_s: float = 2.0) -> dict[str, str]:
        """The ``tierdet.*`` parameters written into the model's config at build time."""
        config = await self._client.get_model_config(model, as_json=True, headers=self._key,
                                                     client_timeout=timeout_s)
        params = config.get("config", {}).get("parameters", {})
        return {k[len(PROVENANCE_PREFIX):]: v.get("string_value", "")
                for k, v in params.items() if k.startswith(PROVENANCE_PREFIX)}
