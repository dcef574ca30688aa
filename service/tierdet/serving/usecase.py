"""The detect use case: the one entry every front end calls.

``Detector.admit`` turns presented credentials into a ``Caller`` (API key and
rate limit; HTTP calls it before reading a body). ``Detector.detect`` takes
the caller, the image bytes and the parsed ``DetectOptions`` and reads
straight through:

    validate (``validation``: a rate token per image; the grant, the tier, the
    budget, the candidate models and their class filters, resolved once)
    -> shed early if even the fastest candidate cannot make it -> an image
    slot (``slots``) -> decode (``decoding``) -> route (``routing``: model and
    endpoint) -> letterbox, tiles (``tiling``) -> infer (``infer``: deadline,
    priority, failover) -> rows back to image pixels, filter, threshold, limit.

Every refusal is an ``ApiError``; every outcome is counted on one failure
path (``_counted``) and logged, so the front ends only translate wire formats.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import DetectResult, ModelsInfo, Routing, TierInfo, Timing
from tierdet.registry.cards import register as register_card
from tierdet.registry.specs import get_spec
from tierdet.serving import access, decoding, imaging, memory, postprocess, scores, tiling, tracing
from tierdet.serving.access import AccessLog
from tierdet.serving.backend import Backend
from tierdet.serving.canary import Canaries, Rule
from tierdet.serving.catalog import Catalog, build_router, public
from tierdet.serving.changes import ModelChanges
from tierdet.serving.infer import Infer
from tierdet.serving.metrics import Metrics
from tierdet.serving.outcome import Outcome, code_of
from tierdet.serving.pool import EndpointPool
from tierdet.serving.routing import Decision, Router
from tierdet.serving.security import AdminKey, Allowance, ApiKey, FailedAttempts, KeyRing
from tierdet.serving.settings import Settings
from tierdet.serving.shadow import Shadow
from tierdet.serving.slots import FairSlots, ImageSlot
from tierdet.serving.tile_budget import TileBudget
from tierdet.serving.turns import DeviceTurns
from tierdet.serving.validation import Validator, ValidRequest

T = TypeVar("T")

# Readiness older than this is not trusted: the watcher refreshes every second,
# a refresh waits at most a few seconds for Triton (a new model's latency
# probe included).
STALE_S = 30.0


@dataclass(frozen=True)
class Caller:
    """Who asks, and how: what ``Detector.admit`` let in."""

    key: ApiKey | None  # None when the gateway has no keys configured
    protocol: str  # the metrics label: one of access.TRANSPORTS ("http", "v2-grpc", ...)
    received: float  # perf_counter() when the request arrived: budgets count from here
    deadline_ms: float | None = None  # the transport's own deadline from ``received``
    item: int | None = None  # a batch image's index, a stream frame's id
    # The tokens admission paid for (one image); shared by the call's images.
    allowance: Allowance = field(default_factory=Allowance, compare=False)

    def restarted(self, item: int | None = None) -> Caller:
        """The same caller for one more piece of work starting now, with no
        transport deadline (a batch image, a stream frame: each has its budget)."""
        return replace(self, received=time.perf_counter(), deadline_ms=None, item=item)


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
        self.canaries = Canaries(Rule.of(settings), metrics)
        self.changes = ModelChanges(settings, self.pool, self.catalog, self.canaries)
        self.keys = KeyRing.load(settings.api_keys_file)
        self.failed_keys = FailedAttempts(settings.failed_key_limit)
        self.admin = AdminKey(settings.admin_key_sha256)
        # What the public /metrics hashes Triton's addresses with: a deployment's
        # secret where it has one, so an alias cannot be matched to an address.
        self.endpoint_alias_key = (settings.admin_key_sha256 or settings.triton_api_key
                                   or "tierdet").encode()
        metrics.tiers = frozenset(self.router.tiers.tiers)  # other names: one label
        self.access = AccessLog(settings.access_log)
        self.last_request_at = 0.0  # time.monotonic() of the last admitted caller
        # Decoded images held at once: what bounds the gateway's memory (see memory),
        # shared fairly between keys (see slots).
        self.image_slots = FairSlots(memory.image_slots(settings), len(self.keys.keys))
        self._idle_trim = memory.IdleTrim()
        self.validator = Validator(self.keys, self.router, self.catalog,
                                   settings.default_score_threshold)
        turns = DeviceTurns(settings.device_turns)
        self.infer = Infer(self.pool, self.router, self.catalog, metrics,
                           settings.request_timeout_s, turns)
        self.tile_budget = TileBudget(self.router)
        self.shadow = Shadow(settings, self.pool, self.router, self.catalog, metrics,
                             self.canaries, turns=turns)

    @contextmanager
    def _counted(self, protocol: str, seen: Outcome | None = None) -> Iterator[None]:
        """The one failure path: every refusal or error of the block is counted,
        under the tier and model decided so far (``seen``), if any."""
        try:
            yield
        except BaseException as exc:
            outcome = (exc.outcome if isinstance(exc, ApiError) else
                       "timeout" if isinstance(exc, asyncio.CancelledError) else "error")
            tier, model = seen.labels() if seen is not None else (None, "none")
            self.metrics.observe_failure(protocol, tier, model, outcome)
            raise

    # -- admission -------------------------------------------------------

    def admit(self, credentials: str | None, protocol: str, received: float | None = None,
              deadline_ms: float | None = None, source: str | None = None) -> Caller:
        """Authenticate and rate-limit a caller (no-op without configured keys).
        ``source``: the peer's address, whose failed key attempts are throttled."""
        with self._counted(protocol), tracing.span("admission"):
            key = self._authenticate(credentials, source)
            if key is not None and (call := access.current()) is not None:
                call.key = key.name  # known now, even if the rate refuses it
            self.keys.take(key)
        self.last_request_at = time.monotonic()
        if received is None:  # the budget counts from the request's first sight (its
            call = access.current()  # headers), not from the end of its body's parsing
            received = call.started if call is not None else time.perf_counter()
        return Caller(key, protocol, received, deadline_ms)

    def _authenticate(self, credentials: str | None, source: str | None) -> ApiKey | None:
        """The caller's key; a wrong key counts against its source address."""
        if not self.keys.enabled:
            return None
        self.failed_keys.check(source)
        try:
            return self.keys.authenticate(credentials)
        except ApiError:
            if credentials:  # a guess, not a forgotten header
                self.failed_keys.failed(source)
            raise

    def authorize(self, caller: Caller, options: DetectOptions) -> None:
        """403 unless the caller's key may ask for these options at all (a whole
        call's check, e.g. a batch's; ``detect`` confines every image anyway)."""
        with self._counted(caller.protocol, Outcome(options)):
            self.validator.confine(caller.key, options, caller.deadline_ms)

    # -- what is served ----------------------------------------------------

    def models(self, admin: bool = False) -> ModelsInfo:
        """What is served; server paths and Triton's load errors only for ``admin``."""
        tiers = self.router.tiers
        infos = tuple(replace(info, canary=self.canaries.info(info.name))
                      for info in self.catalog.infos())
        return ModelsInfo(
            default_tier=tiers.default,
            tiers=tuple(TierInfo(t.name, t.budget_ms, t.models, t.degrade,
                                 t.name == tiers.default) for t in tiers.tiers.values()),
            models=infos if admin else tuple(map(public, infos)))

    async def poll_queues(self) -> None:
        """Read every endpoint's queue into the router (the queue watcher's call)."""
        await self.pool.poll_queues()
        queues = self.pool.queues(max_age_s=1.0)
        self.router.observe_queues(queues)
        pending: dict[str, int] = {}
        service: dict[tuple[str, str], float] = {}
        for url, (_, report) in queues.items():
            for model, count in report.pending.items():
                pending[model] = pending.get(model, 0) + count
            for model in filter(self.catalog.serves, report.served):  # not others' models
                service[model, url] = self.router.service_ms(model, url)
        self.metrics.observe_queues(pending, service)

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
        with self._counted(caller.protocol, Outcome(options)):
            valid = self.validator.validate(caller.key, options, caller.deadline_ms)
            self.router.precheck(valid.route, _ms_since(caller.received),
                                 self.catalog.placement(list(valid.candidates)))

    async def detect(self, caller: Caller, image: bytes | Pixels,
                     options: DetectOptions) -> DetectResult:
        """validate -> decode -> route -> infer -> postprocess, counted and logged.
        ``image``: encoded bytes, or raw ``Pixels`` (decoding is then only the limits)."""
        seen = Outcome(options)
        self.metrics.inflight.inc()
        self._idle_trim.begin()
        try:
            with tracing.span("detect"), self._counted(caller.protocol, seen):
                try:
                    self._pay(caller)
                    valid = self.validator.validate(caller.key, options, caller.deadline_ms)
                    # Counted from validation on (no await between): a model retired
                    # meanwhile is unloaded only once this request is done with it.
                    with self.catalog.using(*valid.candidates):
                        seen.result = await self._detect(caller, image, valid, seen)
                except BaseException as exc:
                    seen.code = code_of(exc)
                    if seen.decision is not None and seen.code is ErrorCode.DEADLINE_EXCEEDED:
                        self.metrics.route_factor.set(
                            self.router.learn(seen.decision, _ms_since(caller.received)))
                    raise
                finally:
                    self._log_access(caller, options, len(image), seen)
        finally:
            self.metrics.inflight.dec()
            self._idle_trim.end()
        result, decision = seen.result, seen.decision
        assert result is not None and decision is not None  # answered: both are known
        self.metrics.route_factor.set(self.router.learn(decision, result.timing.total_ms))
        self.metrics.observe_result(caller.protocol, result)
        self.canaries.answered(decision.model, result.timing.total_ms)
        if seen.view is not None:  # answered: a sample of it is scored in the background
            self.shadow.offer(decision, image, *seen.view)
        return result

    async def _detect(self, caller: Caller, image: bytes | Pixels, valid: ValidRequest,
                      seen: Outcome) -> DetectResult:
        start = caller.received
        reachable = self.router.precheck(valid.route, _ms_since(start),
                                         self.catalog.placement(list(valid.candidates)))
        wait_ms = self.router.slot_wait_ms(valid.route, _ms_since(start),
                                           self.catalog.placement(reachable))
        async with self.image_slot(caller, wait_ms) as slot:
            # The decoders release the GIL: decoding in a worker thread keeps the
            # event loop answering other requests meanwhile.
            with tracing.span("decode", image_bytes=len(image)):
                slot.image, decode_s = await _in_thread(
                    decoding.decode_for, image, list(map(get_spec, reachable)), self.settings,
                    valid.tiled)
            # Only among the models the image was decoded for (see precheck).
            with tracing.span("route", candidates=",".join(reachable)):
                decision = self.router.decide(valid.route, _ms_since(start),
                                              self.catalog.placement(reachable))
                decision, valid = self._canary(decision, valid, _ms_since(start))
                tiles, decision = (self.tile_budget.plan(decision, slot.take(), _ms_since(start))
                                   if valid.tiled else ([], decision))
            seen.decision = decision
            # A request diverted to a canary counts as using it from the diversion on
            # (no await between): its rollback waits for it.
            with self.catalog.using(*{decision.model} - set(valid.candidates)):
                # The decision of the endpoint that answered, and the whole view's rows.
                result, seen.decision, seen.view = await self._run(decision, slot, valid,
                                                                   start, decode_s, tiles)
        return result

    def _canary(self, decision: Decision, valid: ValidRequest, elapsed_ms: float
                ) -> tuple[Decision, ValidRequest]:
        """A share of the requests routed to a model with a running canary go to the
        canary instead (where it is ready and would answer in time); it is prepared
        for like the model it would replace."""
        side = self.canaries.divert(decision.model)
        if side is None:
            return decision, valid
        diverted = self.router.reroute(replace(decision, model=side), elapsed_ms,
                                       self.catalog.placement([side]), ())
        if diverted is None:
            return decision, valid
        return diverted, replace(valid, keep={**valid.keep, side: valid.keep[decision.model]})

    def log_refused(self, caller: Caller, options: DetectOptions, exc: ApiError) -> None:
        """The access-log line of an image refused before it reached ``detect``."""
        self._log_access(caller, options, 0, Outcome(options, code=exc.code))

    def _log_access(self, caller: Caller, options: DetectOptions, image_bytes: int,
                    seen: Outcome) -> None:
        """The access-log line of one image (see access)."""
        call = access.current()
        if call is not None:
            call.images += 1
        if call is None or not (self.access.enabled or tracing.enabled()):
            return
        fields = seen.access_fields(access.TRANSPORTS[caller.protocol] == "http", caller.item,
                                    _ms_since(caller.received), image_bytes)
        tracing.annotate(**fields)  # on this image's span
        self.access.write(call, **fields)

    def image_slot(self, caller: Caller | None = None, wait_ms: float | None = None
                   ) -> ImageSlot:
        """A slot for one decoded image (``async with``): waits while every slot
        of this worker is taken, or the caller's key holds its share, at most
        ``wait_ms`` (then ``overloaded``)."""
        key = caller.key.name if caller is not None and caller.key is not None else None
        return ImageSlot(self.image_slots, key, None if wait_ms is None else wait_ms / 1e3)

    def _pay(self, caller: Caller) -> None:
        """One rate token per image: admission paid for the call's first."""
        if not caller.allowance.use():
            self.keys.take(caller.key)

    async def _run(self, decision: Decision, slot: ImageSlot, valid: ValidRequest,
                   start: float, decode_s: float, tiles: list[tiling.Tile]
                   ) -> tuple[DetectResult, Decision, tuple[np.ndarray, imaging.Geometry]]:
        """The answer, the decision that gave it (another endpoint after a failover),
        and the whole view's rows and geometry (what shadow scoring scores)."""
        spec = get_spec(decision.model)
        keep = valid.keep[decision.model]
        size = spec.input_size
        step = slot.take().step
        # The input is written where the endpoint reads it from (its shared memory).
        with self.infer.backend(decision).input_buffer((1 + len(tiles), size, size, 3)) as batch:
            with tracing.span("preprocess", input_size=size, tiles=len(tiles)):
                geometries, prep_s = await _in_thread(
                    tiling.prepare_views, slot.take(), size, spec.preprocessing, tiles, batch)
            slot.release()  # letterboxed: the pixels are not needed while Triton runs
            self.tile_budget.learn(prep_s, len(batch))
            t_infer = time.perf_counter()
            rows, decision = await self.infer.run(decision, batch, start)
            t_post = time.perf_counter()
        threshold, limit = valid.threshold, valid.limit(spec)
        whole = geometries[0]
        with tracing.span("postprocess"):
            # Thresholds apply to the score the client gets; shadow scoring reads raw rows.
            views = (scores.calibrated_rows(rows, spec.score_calibration)
                     if self.settings.calibrated_scores else rows)
            if not tiles:  # one view: nothing to merge, the limit applies at once
                detections = postprocess.detections_from_rows(views[0], spec.labels, whole,
                                                              threshold, limit, keep)
            else:
                detections = tiling.detections_from_views(
                    views, spec.labels, geometries, tiles, step, threshold, limit,
                    spec.max_detections, keep)
        end = time.perf_counter()
        timing = Timing(decode_s * 1e3, prep_s * 1e3, (t_post - t_infer) * 1e3,
                        (end - t_post) * 1e3, (end - start) * 1e3)
        routing = Routing(decision.tier, decision.budget_ms, decision.predicted_ms,
                          timing.total_ms, decision.degraded, len(tiles))
        return DetectResult(spec.name, whole.width, whole.height, detections, timing,
                            routing), decision, (rows[0], whole)

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
