"""The detect use case: the one entry every front end calls.

``Detector.admit`` turns presented credentials into a ``Caller`` (API key and
rate limit; HTTP calls it before reading a body). ``Detector.detect`` takes
the caller, the image bytes and validated ``DetectOptions`` and owns the rest:

    authorize -> names and classes -> shed early if even the fastest model
    cannot make it -> decode -> route (model and endpoint: budget, profile,
    queues) -> resize -> backend (deadline and priority travel with the call;
    an endpoint found dead leaves the pool and the call goes to another while
    the budget allows) -> rows back to image pixels, the class filter,
    threshold and limit.

Every refusal is an ``ApiError``; every outcome is counted in the metrics here,
so the front ends only translate wire formats.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import DetectResult, ModelsInfo, Routing, TierInfo, Timing
from tierdet.registry.cards import register as register_card
from tierdet.registry.profile import LatencyProfile
from tierdet.registry.specs import get_spec, known, lookup
from tierdet.serving import access, decoding, imaging, memory, postprocess, tiling, tracing
from tierdet.serving.access import AccessLog
from tierdet.serving.backend import Backend
from tierdet.serving.catalog import Catalog, initial_ap
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import EndpointPool
from tierdet.serving.routing import Decision, LatencyModel, Router, RouteRequest, TierConfig
from tierdet.serving.security import ApiKey, KeyRing
from tierdet.serving.settings import Settings
from tierdet.serving.slots import FairSlots

T = TypeVar("T")

# Readiness older than this is not trusted: the watcher refreshes every second,
# a refresh waits at most a few seconds for Triton (a new model's latency
# probe included).
STALE_S = 30.0
# Errors after which the same call may go to another endpoint: the endpoint is
# gone (or lost the model); nothing was computed, detection is idempotent.
FAILOVER = {ErrorCode.TRITON_UNAVAILABLE, ErrorCode.MODEL_NOT_READY}


@dataclass(frozen=True)
class Caller:
    """Who asks, and how: what ``Detector.admit`` let in."""

    key: ApiKey | None  # None when the gateway has no keys configured
    protocol: str  # the metrics label: one of access.TRANSPORTS ("http", "v2-grpc", ...)
    received: float  # perf_counter() when the request arrived: budgets count from here
    deadline_ms: float | None = None  # the transport's own deadline from ``received``
    item: int | None = None  # a batch image's index, a stream frame's id

    def restarted(self, item: int | None = None) -> Caller:
        """The same caller for one more piece of work starting now, with no
        transport deadline (a batch image, a stream frame: each has its budget)."""
        return replace(self, received=time.perf_counter(), deadline_ms=None, item=item)


def build_router(settings: Settings) -> Router:
    tiers = TierConfig.load(settings.tiers_file, settings.default_tier)
    latency = LatencyModel(LatencyProfile.load(settings.profile_file))
    return Router(initial_ap(settings.pin_published_ap), tiers, latency,
                  default_budget_ms=settings.request_timeout_s * 1e3,
                  margin_frac=settings.route_margin_frac, margin_ms=settings.route_margin_ms,
                  calibrate_quantile=settings.route_calibrate_quantile,
                  label_sets={name: spec.labels.name for name, spec in known().items()},
                  default_label_set=settings.default_label_set)


class Detector:
    def __init__(self, settings: Settings, backend: Backend | EndpointPool, metrics: Metrics,
                 router: Router | None = None) -> None:
        """``backend``: the Triton pool, or one backend (a pool of one)."""
        self.settings = settings
        self.pool = backend if isinstance(backend, EndpointPool) else EndpointPool.single(backend)
        self.metrics = metrics
        for card in settings.cards:  # before the router: it ranks every known model
            register_card(card)
        self.router = router or build_router(settings)
        self.catalog = Catalog(settings, self.pool, self.router, metrics)
        self.keys = KeyRing.load(settings.api_keys_file)
        self.access = AccessLog(settings.access_log)
        self.last_request_at = 0.0  # time.monotonic() of the last admitted caller
        # Decoded images held at once: what bounds the gateway's memory (see memory),
        # shared fairly between keys (see slots).
        self.image_slots = FairSlots(memory.image_slots(settings), len(self.keys.keys))
        self._tile_prep_ms = 2.0  # letterbox of one tile, learnt from tiled requests

    # -- admission -------------------------------------------------------

    def admit(self, credentials: str | None, protocol: str, received: float | None = None,
              deadline_ms: float | None = None) -> Caller:
        """Authenticate and rate-limit a caller (no-op without configured keys)."""
        try:
            with tracing.span("admission"):
                key = self.keys.authenticate(credentials)
                if key is not None and (call := access.current()) is not None:
                    call.key = key.name  # known now, even if the rate refuses it
                self.keys.take(key)
        except ApiError as exc:
            self.metrics.observe_failure(protocol, None, "none", exc.outcome)
            raise
        self.last_request_at = time.monotonic()
        return Caller(key, protocol, time.perf_counter() if received is None else received,
                      deadline_ms)

    def authorize(self, caller: Caller, options: DetectOptions) -> None:
        """403 unless the caller's key may use the tier and model asked for."""
        try:
            self.keys.authorize(caller.key, options.tier, options.model)
        except ApiError as exc:
            self.metrics.observe_failure(caller.protocol, options.tier, "none", exc.outcome)
            raise

    # -- what is served ----------------------------------------------------

    def models(self) -> ModelsInfo:
        tiers = self.router.tiers
        return ModelsInfo(
            default_tier=tiers.default,
            tiers=tuple(TierInfo(t.name, t.budget_ms, t.models, t.degrade,
                                 t.name == tiers.default) for t in tiers.tiers.values()),
            models=self.catalog.infos())

    async def poll_queues(self) -> None:
        """Read every endpoint's queue into the router (the queue watcher's call)."""
        await self.pool.poll_queues()
        queues = self.pool.queues(max_age_s=1.0)
        self.router.latency.observe_queues(queues)
        pending: dict[str, int] = {}
        for _, report in queues.values():
            for model, count in report.pending.items():
                pending[model] = pending.get(model, 0) + count
        self.metrics.observe_queues(pending)

    async def readiness(self) -> tuple[bool, ErrorCode | None, str]:
        """Ask the backend again, then ``ready()`` (the model watcher's call)."""
        await self.catalog.refresh()
        return self.ready()

    def ready(self) -> tuple[bool, ErrorCode | None, str]:
        """Ready: the backend is reachable and at least one model is ready, as the
        watcher last saw it. No I/O: a probe is answered at once even while
        Triton hangs (asking it could take the call's 2 s, past a probe's
        timeout). Models that are down are reported in ``models()`` and not
        routed to."""
        seen = self.catalog.refreshed_at
        if seen is None or time.monotonic() - seen > STALE_S:
            return False, ErrorCode.TRITON_UNAVAILABLE, "the model state is stale"
        if not self.catalog.backend_up:
            return False, ErrorCode.TRITON_UNAVAILABLE, "triton is unreachable"
        if not self.catalog.ready_models():
            return False, ErrorCode.MODEL_NOT_READY, "no model is ready"
        return True, None, "ready"

    # -- detect ----------------------------------------------------------

    def refuse_early(self, caller: Caller, options: DetectOptions) -> None:
        """Shed before the request's body is even read, where the options known so
        far (HTTP: the query string's budget, tier or model) already say that not
        even the fastest model could answer in time. Options the body adds can only
        narrow the choice, so a request this lets through may still be shed later."""
        try:
            self.keys.authorize(caller.key, options.tier, options.model)
            request, candidates = self._request(caller, options)
            self.router.precheck(request, _ms_since(caller.received),
                                 self.catalog.placement(candidates))
        except ApiError as exc:
            self.metrics.observe_failure(caller.protocol, options.tier, "none", exc.outcome)
            raise

    async def detect(self, caller: Caller, image: bytes | Pixels,
                     options: DetectOptions) -> DetectResult:
        """``image``: encoded bytes, or raw ``Pixels`` (decoding is then only the limits)."""
        seen = _Outcome()
        with tracing.span("detect"):
            try:
                seen.result = await self._detect(caller, image, options, seen)
                return seen.result
            except ApiError as exc:
                seen.code = exc.code
                raise
            except asyncio.CancelledError:
                seen.code = ErrorCode.CANCELLED
                raise
            except Exception:
                seen.code = ErrorCode.INTERNAL
                raise
            finally:
                self._log_access(caller, options, len(image), seen)

    async def _detect(self, caller: Caller, image: bytes | Pixels,
                      options: DetectOptions,
                      seen: _Outcome) -> DetectResult:
        start = caller.received
        tier, model = options.tier, options.model or "none"
        decision: Decision | None = None
        self.metrics.inflight.inc()
        try:
            self.keys.authorize(caller.key, options.tier, options.model)
            request, candidates = self._request(caller, options)
            reachable = self.router.precheck(request, _ms_since(start),
                                             self.catalog.placement(candidates))
            wait_ms = self.router.slot_wait_ms(request, _ms_since(start),
                                               self.catalog.placement(reachable))
            async with self.image_slot(caller, wait_ms) as slot:
                # The decoders release the GIL: decoding in a worker thread keeps the
                # event loop answering other requests meanwhile.
                tiled = options.tile == "auto"  # tiles need the image's own pixels
                with tracing.span("decode", image_bytes=len(image)):
                    slot.image, decode_s = await _in_thread(self._decode, image, reachable,
                                                            tiled)
                # Only among the models the image was decoded for (see precheck).
                with tracing.span("route", candidates=",".join(reachable)):
                    decision = self.router.decide(request, _ms_since(start),
                                                  self.catalog.placement(reachable))
                    tiles, decision = (self._tiles(decision, slot.take(), _ms_since(start))
                                       if tiled else ([], decision))
                tier, model = decision.tier, decision.model
                seen.decision = decision
                result, decision = await self._run(decision, slot, options, start, decode_s,
                                                   tiles)
                seen.decision = decision  # the endpoint that answered (failover)
        except ApiError as exc:
            if decision is not None and exc.code is ErrorCode.DEADLINE_EXCEEDED:
                self._calibrate(decision, _ms_since(start))
            self.metrics.observe_failure(caller.protocol, tier,
                                         model if lookup(model) else "none", exc.outcome)
            raise
        except asyncio.CancelledError:
            self.metrics.observe_failure(caller.protocol, tier,
                                         model if lookup(model) else "none", "timeout")
            raise
        except Exception:
            self.metrics.observe_failure(caller.protocol, tier,
                                         model if lookup(model) else "none", "error")
            raise
        finally:
            self.metrics.inflight.dec()
        self._calibrate(decision, result.timing.total_ms)
        self._observe(caller.protocol, result)
        return result

    def log_refused(self, caller: Caller, options: DetectOptions, exc: ApiError) -> None:
        """The access-log line of an image refused before it reached ``detect``."""
        self._log_access(caller, options, 0, _Outcome(code=exc.code))

    def _log_access(self, caller: Caller, options: DetectOptions, image_bytes: int,
                    seen: _Outcome) -> None:
        """The access-log line of one image (see access)."""
        call = access.current()
        if call is not None:
            call.images += 1
        if call is None or not (self.access.enabled or tracing.enabled()):
            return
        code, decision, result = seen.code, seen.decision, seen.result
        http = access.TRANSPORTS[caller.protocol] == "http"
        if code is None:
            status: int | str = 200 if http else "OK"
        else:
            status = code.kind.http_status if http else code.kind.grpc_status
        fields = dict(
            item=caller.item, code=code.value if code else "ok", status=status,
            tier=decision.tier if decision else options.tier,
            budget_ms=decision.budget_ms if decision else options.sla_ms,
            model=decision.model if decision else options.model,
            endpoint=decision.endpoint if decision else None,
            predicted_ms=round(decision.predicted_ms, 1) if decision else None,
            latency_ms=round(_ms_since(caller.received), 1), image_bytes=image_bytes,
            width=result.width if result else None, height=result.height if result else None,
            tiles=result.routing.tiles if result else None)
        tracing.annotate(**fields)  # on this image's span
        self.access.write(call, **fields)

    def image_slot(self, caller: Caller | None = None, wait_ms: float | None = None
                   ) -> ImageSlot:
        """A slot for one decoded image (``async with``): waits while every slot
        of this worker is taken, or the caller's key holds its share, at most
        ``wait_ms`` (then ``overloaded``)."""
        key = caller.key.name if caller is not None and caller.key is not None else None
        return ImageSlot(self.image_slots, key, None if wait_ms is None else wait_ms / 1e3)

    def _calibrate(self, decision: Decision, actual_ms: float) -> None:
        """Teach the router how its admitted predictions turned out (a degraded
        answer was never predicted to fit)."""
        if not decision.degraded:
            self.router.calibration.observe(decision.predicted_ms, actual_ms,
                                            decision.budget_ms)
            self.metrics.route_factor.set(self.router.calibration.factor)

    def _request(self, caller: Caller, options: DetectOptions) -> tuple[RouteRequest, list[str]]:
        """Cheap checks before any decoding (the model, tier and classes must exist);
        the routing request and the ready models that may answer it."""
        if options.model is not None and not self.catalog.serves(options.model):
            served = ", ".join(sorted(self.catalog.states)) or "none"
            raise ApiError(ErrorCode.UNKNOWN_MODEL,
                           f"unknown model {options.model!r}; served: {served}")
        request = RouteRequest(options.model, options.tier, options.sla_ms, caller.deadline_ms)
        self.router.tier_for(request)  # raises on an unknown tier
        if options.model is not None and options.model not in self.catalog.ready_models():
            raise ApiError(ErrorCode.MODEL_NOT_READY, f"model {options.model} is not ready",
                           retry_after_s=2.0)
        return request, self._knowing(options)

    def _knowing(self, options: DetectOptions) -> list[str]:
        """Ready models whose classes include every class asked for."""
        ready = self.catalog.ready_models()
        if options.classes is None:
            return ready
        states = self.catalog.states
        unknown = postprocess.unknown_classes(options.classes,
                                              (states[m].spec.labels for m in states))
        if unknown:
            raise ApiError(ErrorCode.INVALID_OPTION, f"classes: unknown class(es) "
                           f"{', '.join(map(repr, unknown))}; no served model has them")
        knowing = [m for m in ready if postprocess.knows_classes(options.classes,
                                                                 states[m].spec.labels)]
        if not knowing and ready:
            raise ApiError(ErrorCode.INVALID_OPTION,
                           f"classes: no ready model has all of {', '.join(options.classes)}")
        return knowing

    def _decode(self, data: bytes | Pixels, models: list[str], full: bool = False
                ) -> tuple[decoding.Decoded, float]:
        """Decode at the smallest scale that still covers every model in ``models``
        (``full``: every pixel)."""
        t0 = time.perf_counter()
        if isinstance(data, Pixels):
            return (decoding.from_pixels(data, self.settings.max_image_bytes,
                                         self.settings.max_image_pixels),
                    time.perf_counter() - t0)
        inputs = [(s.input_size, s.preprocessing) for s in map(get_spec, models)]

        def fits(width: int, height: int) -> bool:
            return all(imaging.covers(width, height, size, prep) for size, prep in inputs)

        reduced = self.settings.decode_scale == "reduced" and not full
        decoded = decoding.decode(data, self.settings.max_image_bytes,
                                  self.settings.max_image_pixels, fits if reduced else None)
        return decoded, time.perf_counter() - t0

    def _tiles(self, decision: Decision, image: decoding.Decoded, elapsed_ms: float
               ) -> tuple[list[tiling.Tile], Decision]:
        """The tiles the budget leaves room for beside the whole view (one batch:
        at most the model's batch size), and the decision with their cost in its
        prediction. Each tile costs the model's marginal device time and its
        letterbox (measured, see ``_learn_tile_prep``)."""
        if decision.degraded:
            return [], decision
        spec = get_spec(decision.model)
        per_tile = self.router.latency.cost_ms(decision.model) + self._tile_prep_ms
        spare = (decision.budget_ms - elapsed_ms - self.router.margin_ms
                 - decision.predicted_ms * self.router.calibration.factor)
        room = int(spare / self.router.calibration.factor // per_tile) if spare > 0 else 0
        height, width = image.pixels.shape[:2]
        tiles = tiling.plan(width, height, spec.input_size,
                            min(spec.batching.max_batch_size - 1, room))
        return tiles, replace(decision,
                              predicted_ms=decision.predicted_ms + len(tiles) * per_tile)

    def _learn_tile_prep(self, prep_s: float, views: int) -> None:
        if views > 1:
            self._tile_prep_ms += 0.2 * (prep_s * 1e3 / views - self._tile_prep_ms)

    @staticmethod
    def _prepare(image: decoding.Decoded, size: int, prep: imaging.Preprocessing,
                 tiles: list[tiling.Tile], out: np.ndarray
                 ) -> tuple[list[imaging.Geometry], float]:
        """The whole view into ``out[0]``, each tile into the next (``tiles`` in
        decoded pixels; their geometry maps boxes back to the tile's corner)."""
        t0 = time.perf_counter()
        _, whole = imaging.prepare(image.pixels, size, prep, image.step,
                                   (image.width, image.height), out[0])
        geometries = [whole]
        for tile, view in zip(tiles, out[1:], strict=True):
            crop = image.pixels[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width]
            original = (min(tile.width * image.step, image.width - tile.x * image.step),
                        min(tile.height * image.step, image.height - tile.y * image.step))
            geometries.append(imaging.prepare(crop, size, prep, image.step, original,
                                              view)[1])
        return geometries, time.perf_counter() - t0

    async def _run(self, decision: Decision, slot: ImageSlot, options: DetectOptions,
                   start: float, decode_s: float, tiles: list[tiling.Tile]
                   ) -> tuple[DetectResult, Decision]:
        """The answer, and the decision that gave it (another endpoint after a failover)."""
        spec = get_spec(decision.model)
        keep = postprocess.class_filter(options.classes, spec.labels)
        size = spec.input_size
        step = slot.take().step
        # The input is written where the endpoint reads it from (its shared memory).
        with self._backend(decision).input_buffer((1 + len(tiles), size, size, 3)) as batch:
            with tracing.span("preprocess", input_size=size, tiles=len(tiles)):
                geometries, prep_s = await _in_thread(
                    self._prepare, slot.take(), size, spec.preprocessing, tiles, batch)
            slot.release()  # letterboxed: the pixels are not needed while Triton runs
            self._learn_tile_prep(prep_s, len(batch))
            t_infer = time.perf_counter()
            rows, decision = await self._infer(decision, batch, start)
            t_post = time.perf_counter()
        threshold = (options.score_threshold if options.score_threshold is not None
                     else self.settings.default_score_threshold)
        limit = min(options.max_detections or spec.max_detections, spec.max_detections)
        whole = geometries[0]
        with tracing.span("postprocess"):
            if not tiles:  # one view: nothing to merge, the limit applies at once
                detections = postprocess.detections_from_rows(rows[0], spec.labels, whole,
                                                              threshold, limit, keep)
            else:
                detections = tiling.detections_from_views(
                    rows, spec.labels, geometries, tiles, step, threshold, limit,
                    spec.max_detections, keep)
        end = time.perf_counter()
        timing = Timing(decode_s * 1e3, prep_s * 1e3, (t_post - t_infer) * 1e3,
                        (end - t_post) * 1e3, (end - start) * 1e3)
        routing = Routing(decision.tier, decision.budget_ms, decision.predicted_ms,
                          timing.total_ms, decision.degraded, len(tiles))
        return DetectResult(spec.name, whole.width, whole.height, detections, timing,
                            routing), decision

    def _backend(self, decision: Decision) -> Backend:
        endpoint = self.pool.endpoints.get(decision.endpoint)
        if endpoint is None:  # left the pool since the decision (re-resolved away)
            raise ApiError(ErrorCode.TRITON_UNAVAILABLE, "the inference server left the pool",
                           retry_after_s=1.0)
        return endpoint.backend

    async def _infer(self, decision: Decision, batch: np.ndarray, start: float
                     ) -> tuple[np.ndarray, Decision]:
        """Run ``batch`` at the decision's endpoint; where that endpoint is gone,
        at the next one with the model while the budget allows. Returns the rows
        and the decision that answered."""
        tried: list[str] = []
        while True:
            timeout_s = (self.settings.request_timeout_s if decision.degraded
                         else decision.timeout_s(_ms_since(start)))
            with self.router.dispatch(decision.model, decision.endpoint) as run, \
                    tracing.span("triton", model=decision.model, endpoint=decision.endpoint,
                                 timeout_ms=round(timeout_s * 1e3, 1)):
                t0 = time.perf_counter()
                try:
                    rows = await self._backend(decision).infer(
                        decision.model, batch, timeout_s=timeout_s, priority=decision.priority)
                except ApiError as exc:
                    failure = exc
                else:
                    if len(batch) == 1:  # the latency model learns single images only
                        run.observe((time.perf_counter() - t0) * 1e3)
                    self.metrics.triton_requests.labels(decision.endpoint, "ok").inc()
                    return rows, decision
            if failure.code not in FAILOVER:
                self.metrics.triton_requests.labels(decision.endpoint, "error").inc()
                raise failure
            self.metrics.triton_requests.labels(decision.endpoint, "unavailable").inc()
            if failure.code == ErrorCode.TRITON_UNAVAILABLE:
                self.pool.mark_down(decision.endpoint)
            else:
                self.pool.model_gone(decision.endpoint, decision.model)
            tried.append(decision.endpoint)
            retry = self.router.reroute(decision, _ms_since(start),
                                        self.catalog.placement([decision.model]), tried)
            if retry is None:
                raise failure
            decision = retry

    def _observe(self, protocol: str, result: DetectResult) -> None:
        t, r = result.timing, result.routing
        stages = {"decode": t.decode_ms / 1e3, "preprocess": t.preprocess_ms / 1e3,
                  "infer": t.infer_ms / 1e3, "postprocess": t.postprocess_ms / 1e3}
        in_slo = t.total_ms <= r.budget_ms and not r.degraded
        self.metrics.observe_ok(protocol, r.tier, result.model, t.total_ms / 1e3, stages,
                                in_slo, r.predicted_ms / 1e3)
        if r.degraded:
            self.metrics.degraded.labels(r.tier or "none", result.model).inc()


@dataclass
class _Outcome:
    """How one image went, for its access-log line."""

    decision: Decision | None = None
    result: DetectResult | None = None
    code: ErrorCode | None = None


class ImageSlot:
    """One of a worker's slots for a decoded image, held from decoding until the
    image is letterboxed; the pixels are dropped with it, so no more decoded
    images than slots are alive at once."""

    def __init__(self, slots: FairSlots, key: str | None, wait_s: float | None) -> None:
        self._slots = slots
        self._key = key
        self._wait_s = wait_s
        self._held = False
        self.image: decoding.Decoded | None = None

    async def __aenter__(self) -> ImageSlot:
        await self._slots.acquire(self._key, self._wait_s)
        self._held = True
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release()

    def take(self) -> decoding.Decoded:
        assert self.image is not None, "nothing decoded into this slot"
        return self.image

    def release(self) -> None:
        self.image = None
        if self._held:
            self._held = False
            self._slots.release(self._key)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread (the decoders release the GIL). If the
    caller is cancelled meanwhile, it still waits for the thread before it goes:
    the thread holds the pixels (their slot) and writes the input buffer, and
    neither may be handed to another request before it is done."""
    future = asyncio.get_running_loop().run_in_executor(
        None, functools.partial(contextvars.copy_context().run, fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
