"""The detect use case, shared by the HTTP and gRPC front ends.

decode (limits first) -> choose model -> resize -> Triton -> boxes back to
image pixels. Front ends only translate their wire format to and from the
dataclasses here; every error is an ``ApiError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tierdet import imaging, validation
from tierdet.config import Settings
from tierdet.errors import ApiError, ErrorCode
from tierdet.metrics import Metrics
from tierdet.specs import SPECS, ModelSpec
from tierdet.triton_client import TritonClient

log = logging.getLogger("tierdet")


@dataclass(frozen=True)
class Detection:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str


@dataclass(frozen=True)
class Timing:
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float
    total_ms: float


@dataclass(frozen=True)
class DetectResult:
    model: str
    width: int
    height: int
    detections: list[Detection]
    timing: Timing


@dataclass
class ModelState:
    spec: ModelSpec
    ready: bool = False
    weights: str = "unknown"


@dataclass
class ModelTable:
    """What the gateway knows of each model it may serve, refreshed from Triton."""

    states: dict[str, ModelState] = field(default_factory=dict)
    triton_up: bool = False


def detections_from_rows(rows: np.ndarray, spec: ModelSpec, geometry: imaging.Geometry,
                         score_threshold: float, max_detections: int) -> list[Detection]:
    """Model rows [K, 6] (input pixels) -> detections in image pixels."""
    rows = rows[rows[:, 4] >= max(score_threshold, 1e-12)]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    boxes = imaging.boxes_to_image(rows[:, :4], geometry)
    out: list[Detection] = []
    for (x1, y1, x2, y2), row in zip(boxes, rows, strict=True):
        label = spec.labels.lookup(int(row[5]))
        if label is None or x2 <= x1 or y2 <= y1:  # unused slot, or all in padding
            continue
        out.append(Detection(float(x1), float(y1), float(x2), float(y2), float(row[4]),
                             label[0], label[1]))
        if len(out) == max_detections:
            break
    return out


class DetectionService:
    def __init__(self, settings: Settings, triton: TritonClient, metrics: Metrics) -> None:
        self.settings = settings
        self.triton = triton
        self.metrics = metrics
        self.table = ModelTable()

    # -- model table -----------------------------------------------------

    async def refresh(self) -> None:
        """Re-read readiness and weights provenance of every model from Triton."""
        try:
            index = await self.triton.repository_models()
        except Exception:  # unreachable Triton is a state, not an error
            index = None
        self.table.triton_up = index is not None
        self.metrics.triton_up.set(1 if index is not None else 0)
        names = self.settings.models or tuple(n for n in (index or {}) if n in SPECS)
        for name in names:
            spec = SPECS.get(name)
            if spec is None:
                continue
            state = self.table.states.setdefault(name, ModelState(spec))
            was_ready = state.ready
            state.ready = bool(index) and index.get(name) == "READY"
            if state.ready and not was_ready:
                await self._read_provenance(state)
            self.metrics.model_ready.labels(name).set(1 if state.ready else 0)

    async def _read_provenance(self, state: ModelState) -> None:
        try:
            prov = await self.triton.provenance(state.spec.name)
        except Exception:
            return
        state.weights = prov.get("weights", "unknown")
        if state.weights.startswith("random"):
            log.warning("model %s serves RANDOM weights: %s", state.spec.name, state.weights)
        else:
            log.info("model %s ready, weights: %s", state.spec.name, state.weights)

    def ready_models(self) -> list[str]:
        return [n for n, s in self.table.states.items() if s.ready]

    def model_infos(self) -> list[dict[str, object]]:
        return [
            {"name": name, "family": st.spec.family.value, "input_size": st.spec.input_size,
             "preprocessing": st.spec.preprocessing.resize,
             "published_coco_ap": st.spec.coco_ap, "params_m": st.spec.params_m,
             "ready": st.ready, "weights": st.weights}
            for name, st in sorted(self.table.states.items())
        ]

    async def readiness(self) -> tuple[bool, str]:
        """Ready: Triton reachable, and the default model (or, with none
        configured, at least one model) ready. Other models may be down: they
        are reported in /v1/models and not served."""
        await self.refresh()
        if not self.table.triton_up:
            return False, "triton is unreachable"
        ready = self.ready_models()
        default = self.settings.default_model
        if default in self.table.states and default not in ready:
            return False, f"default model {default} is not ready"
        if not ready:
            return False, "no model is ready"
        return True, "ready"

    # -- detect ----------------------------------------------------------

    def choose_model(self, options: validation.DetectOptions) -> ModelSpec:
        name = options.model or self.settings.default_model
        spec = SPECS.get(name)
        if spec is None or (self.settings.models and name not in self.settings.models):
            served = ", ".join(sorted(self.table.states)) or "none"
            raise ApiError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}; served: {served}")
        state = self.table.states.get(name)
        if state is None or not state.ready:
            raise ApiError(ErrorCode.MODEL_NOT_READY, f"model {name} is not ready",
                           retry_after_s=2.0)
        return spec

    def _decode_and_prepare(self, data: bytes, spec: ModelSpec
                            ) -> tuple[np.ndarray, imaging.Geometry, float, float]:
        t0 = time.perf_counter()
        image = validation.decode_image(data, self.settings.max_image_bytes,
                                        self.settings.max_image_pixels)
        t1 = time.perf_counter()
        tensor, geometry = imaging.prepare(image, spec.input_size, spec.preprocessing)
        return tensor, geometry, t1 - t0, time.perf_counter() - t1

    async def detect(self, data: bytes, options: validation.DetectOptions,
                     protocol: str) -> DetectResult:
        start = time.perf_counter()
        model = options.model or self.settings.default_model
        self.metrics.inflight.inc()
        try:
            spec = self.choose_model(options)
            # OpenCV releases the GIL: decode in a worker thread keeps the
            # event loop answering other requests meanwhile.
            tensor, geometry, decode_s, prep_s = await asyncio.to_thread(
                self._decode_and_prepare, data, spec)
            t_infer = time.perf_counter()
            rows = await self.triton.infer(spec.name, tensor[None],
                                           timeout_s=self.settings.request_timeout_s)
            t_post = time.perf_counter()
            threshold = (options.score_threshold if options.score_threshold is not None
                         else self.settings.default_score_threshold)
            limit = min(options.max_detections or spec.max_detections, spec.max_detections)
            detections = detections_from_rows(rows[0], spec, geometry, threshold, limit)
            end = time.perf_counter()
        except ApiError as exc:
            self.metrics.observe_failure(protocol, model if model in SPECS else "unknown",
                                         _outcome(exc))
            raise
        finally:
            self.metrics.inflight.dec()
        stages = {"decode": decode_s, "preprocess": prep_s, "infer": t_post - t_infer,
                  "postprocess": end - t_post}
        self.metrics.observe_ok(protocol, spec.name, end - start, stages)
        timing = Timing(decode_s * 1e3, prep_s * 1e3, (t_post - t_infer) * 1e3,
                        (end - t_post) * 1e3, (end - start) * 1e3)
        return DetectResult(spec.name, geometry.width, geometry.height, detections, timing)


def _outcome(exc: ApiError) -> str:
    if exc.code is ErrorCode.DEADLINE_EXCEEDED:
        return "timeout"
    if exc.http_status < 500:
        return "bad_input"
    return "error"
