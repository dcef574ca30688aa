"""The detect use case, shared by the HTTP and gRPC front ends.

limits + decode -> route (budget, profile, backlog) -> resize -> Triton
(deadline and priority travel with the call) -> boxes back to image pixels.
Front ends only translate their wire format to and from the dataclasses
here; every error is an ``ApiError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tierdet import imaging, validation
from tierdet.accuracy import latest_and_previous, load_records
from tierdet.config import Settings
from tierdet.errors import ApiError, ErrorCode
from tierdet.metrics import Metrics
from tierdet.profile import LatencyProfile
from tierdet.results import Detection, Routing, Timing
from tierdet.routing import Decision, LatencyModel, Router, RouteRequest, TierConfig
from tierdet.security import ApiKey, KeyRing, bearer
from tierdet.specs import SPECS, ModelSpec
from tierdet.triton_client import TritonClient

log = logging.getLogger("tierdet")


@dataclass(frozen=True)
class DetectResult:
    model: str
    width: int
    height: int
    detections: list[Detection]
    timing: Timing
    routing: Routing


@dataclass
class ModelState:
    spec: ModelSpec
    ready: bool = False
    weights: str = "unknown"
    status: str = "UNKNOWN"  # Triton's state: READY, UNAVAILABLE, LOADING, ...
    reason: str = ""  # why it is not ready (Triton's load error), if known


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


def build_router(settings: Settings) -> Router:
    tiers = TierConfig.load(settings.tiers_file, settings.default_tier)
    latency = LatencyModel(LatencyProfile.load(settings.profile_file))
    return Router(SPECS, tiers, latency, default_budget_ms=settings.request_timeout_s * 1e3,
                  margin_frac=settings.route_margin_frac, margin_ms=settings.route_margin_ms)


class DetectionService:
    def __init__(self, settings: Settings, triton: TritonClient, metrics: Metrics,
                 router: Router | None = None) -> None:
        self.settings = settings
        self.triton = triton
        self.metrics = metrics
        self.router = router or build_router(settings)
        self.keys = KeyRing.load(settings.api_keys_file)
        self.table = ModelTable()
        self.accuracy: dict = {}

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
            state.status, state.reason = (index or {}).get(
                name, ("UNREACHABLE" if index is None else "NOT_LOADED", ""))
            state.ready = state.status == "READY"
            if state.ready and not was_ready:
                await self._read_provenance(state)
                # Awaited: until the router knows a model's latency it would
                # misroute, so the probe is part of getting ready (like warm-up).
                await self._probe_latency(spec)
            self.metrics.model_ready.labels(name).set(1 if state.ready else 0)
            self.metrics.published_ap.labels(name).set(spec.coco_ap)

    def refresh_accuracy(self) -> None:
        """Re-read evaluation records (cheap: a folder of small JSON files)."""
        records = load_records(self.settings.eval_dir)
        self.accuracy = latest_and_previous(records)
        self.metrics.set_accuracy(records)

    def measured_ap(self, model: str) -> dict[str, float]:
        """Latest gateway-path AP of ``model`` per "dataset[/tier]"."""
        return {f"{d}/{t}" if t else d: latest.ap
                for (m, t, d, source), (latest, _) in self.accuracy.items()
                if m == model and source == "gateway"}

    async def refresh_statistics(self) -> None:
        """Batch-size counts from Triton for every ready model (for /metrics)."""
        for name in self.ready_models():
            try:
                stats = await self.triton.batch_executions(name)
            except Exception:
                continue
            self.metrics.triton_batches.update(name, stats)

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

    async def _probe_latency(self, spec: ModelSpec) -> None:
        """Seed the router with one measurement of a model it has no profile for."""
        latency = self.router.latency
        if spec.name in latency.profile.models:
            return
        image = np.full((1, spec.input_size, spec.input_size, 3), 114, np.uint8)
        try:
            for _ in range(2):  # the first call may pay one-off costs
                start = time.perf_counter()
                await self.triton.infer(spec.name, image, timeout_s=60.0)
            ms = (time.perf_counter() - start) * 1e3
        except ApiError:
            return
        latency.finish(latency.admit(spec.name), ms)
        log.info("model %s: no latency profile; measured %.1f ms at batch 1", spec.name, ms)

    def ready_models(self) -> list[str]:
        return [n for n, s in self.table.states.items() if s.ready]

    def model_infos(self) -> list[dict[str, object]]:
        return [
            {"name": name, "family": st.spec.family.value, "input_size": st.spec.input_size,
             "preprocessing": st.spec.preprocessing.resize,
             "published_coco_ap": st.spec.coco_ap, "params_m": st.spec.params_m,
             "ready": st.ready, "status": st.status, "reason": st.reason,
             "weights": st.weights,
             "measured_ap": self.measured_ap(name),
             "latency_ms": round(self.router.latency.service_ms(name), 3)}
            for name, st in sorted(self.table.states.items())
        ]

    async def readiness(self) -> tuple[bool, str]:
        """Ready: Triton reachable and at least one model ready. Models that
        are down are reported in /v1/models and not routed to."""
        await self.refresh()
        if not self.table.triton_up:
            return False, "triton is unreachable"
        if not self.ready_models():
            return False, "no model is ready"
        return True, "ready"

    # -- access --------------------------------------------------------

    def admit_key(self, authorization: str | None, api_key: str | None,
                  protocol: str) -> ApiKey | None:
        """Authenticate and rate-limit a caller (no-op without configured keys)."""
        try:
            key = self.keys.authenticate(bearer(authorization, api_key))
            self.keys.take(key)
        except ApiError as exc:
            self.metrics.observe_failure(protocol, None, "none", outcome_of(exc))
            raise
        return key

    def authorize(self, key: ApiKey | None, options: validation.DetectOptions,
                  protocol: str) -> None:
        try:
            self.keys.authorize(key, options.tier, options.model)
        except ApiError as exc:
            self.metrics.observe_failure(protocol, options.tier, "none", outcome_of(exc))
            raise

    # -- detect ----------------------------------------------------------

    def _check_names(self, options: validation.DetectOptions) -> RouteRequest:
        """Cheap checks before any decoding: the model and tier must exist."""
        if options.model is not None and (
                options.model not in SPECS
                or (self.settings.models and options.model not in self.settings.models)):
            served = ", ".join(sorted(self.table.states)) or "none"
            raise ApiError(ErrorCode.UNKNOWN_MODEL,
                           f"unknown model {options.model!r}; served: {served}")
        request = RouteRequest(model=options.model, tier=options.tier, sla_ms=options.sla_ms)
        self.router.tier_for(request)  # raises on an unknown tier
        if options.model is not None and options.model not in self.ready_models():
            raise ApiError(ErrorCode.MODEL_NOT_READY, f"model {options.model} is not ready",
                           retry_after_s=2.0)
        return request

    def _decode(self, data: bytes) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        image = validation.decode_image(data, self.settings.max_image_bytes,
                                        self.settings.max_image_pixels)
        return image, time.perf_counter() - t0

    @staticmethod
    def _prepare(image: np.ndarray, spec: ModelSpec
                 ) -> tuple[np.ndarray, imaging.Geometry, float]:
        t0 = time.perf_counter()
        tensor, geometry = imaging.prepare(image, spec.input_size, spec.preprocessing)
        return tensor, geometry, time.perf_counter() - t0

    async def detect(self, data: bytes, options: validation.DetectOptions, protocol: str,
                     received: float | None = None, deadline_ms: float | None = None
                     ) -> DetectResult:
        """``received``: perf_counter() when the request arrived; ``deadline_ms``:
        the transport's own deadline from ``received`` (gRPC), if any."""
        start = received if received is not None else time.perf_counter()
        tier: str | None = options.tier
        model = options.model or "none"
        self.metrics.inflight.inc()
        try:
            request = self._check_names(options)
            if deadline_ms is not None:
                request = RouteRequest(request.model, request.tier, request.sla_ms, deadline_ms)
            self.router.precheck(request, _ms_since(start), self.ready_models())
            # OpenCV releases the GIL: decoding in a worker thread keeps the
            # event loop answering other requests meanwhile.
            image, decode_s = await asyncio.to_thread(self._decode, data)
            decision = self.router.decide(request, _ms_since(start), self.ready_models())
            tier, model = decision.tier, decision.model
            result = await self._run(decision, image, options, start, decode_s)
        except ApiError as exc:
            self.metrics.observe_failure(protocol, tier, model if model in SPECS else "none",
                                         outcome_of(exc))
            raise
        except Exception:
            self.metrics.observe_failure(protocol, tier, model if model in SPECS else "none",
                                         "error")
            raise
        finally:
            self.metrics.inflight.dec()
        self._observe(protocol, result)
        return result

    async def _run(self, decision: Decision, image: np.ndarray,
                   options: validation.DetectOptions, start: float, decode_s: float
                   ) -> DetectResult:
        spec = SPECS[decision.model]
        latency = self.router.latency
        ticket = latency.admit(spec.name)
        observed: float | None = None
        try:
            tensor, geometry, prep_s = await asyncio.to_thread(self._prepare, image, spec)
            timeout_s = (self.settings.request_timeout_s if decision.degraded
                         else decision.timeout_s(_ms_since(start)))
            t_infer = time.perf_counter()
            rows = await self.triton.infer(spec.name, tensor[None], timeout_s=timeout_s,
                                           priority=decision.priority)
            t_post = time.perf_counter()
            observed = (t_post - t_infer) * 1e3
        finally:
            latency.finish(ticket, observed)
        threshold = (options.score_threshold if options.score_threshold is not None
                     else self.settings.default_score_threshold)
        limit = min(options.max_detections or spec.max_detections, spec.max_detections)
        detections = detections_from_rows(rows[0], spec, geometry, threshold, limit)
        end = time.perf_counter()
        timing = Timing(decode_s * 1e3, prep_s * 1e3, (t_post - t_infer) * 1e3,
                        (end - t_post) * 1e3, (end - start) * 1e3)
        routing = Routing(decision.tier, decision.budget_ms, decision.predicted_ms,
                          timing.total_ms, decision.degraded)
        return DetectResult(spec.name, geometry.width, geometry.height, detections, timing,
                            routing)

    def _observe(self, protocol: str, result: DetectResult) -> None:
        t, r = result.timing, result.routing
        stages = {"decode": t.decode_ms / 1e3, "preprocess": t.preprocess_ms / 1e3,
                  "infer": t.infer_ms / 1e3, "postprocess": t.postprocess_ms / 1e3}
        in_slo = t.total_ms <= r.budget_ms and not r.degraded
        self.metrics.observe_ok(protocol, r.tier, result.model, t.total_ms / 1e3, stages,
                                in_slo, r.predicted_ms / 1e3)
        if r.degraded:
            self.metrics.degraded.labels(r.tier or "none", result.model).inc()


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def outcome_of(exc: ApiError) -> str:
    """The metrics outcome label of a refusal."""
    if exc.code is ErrorCode.DEADLINE_EXCEEDED:
        return "timeout"
    if exc.code is ErrorCode.SLA_UNATTAINABLE:
        return "shed"
    if exc.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN):
        return "unauthorized"
    if exc.code is ErrorCode.RATE_LIMITED:
        return "rate_limited"
    if exc.http_status < 500:
        return "bad_input"
    return "error"
