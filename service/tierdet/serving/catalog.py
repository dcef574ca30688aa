"""What the gateway knows of each model it may serve, refreshed from the Triton pool.

Readiness and Triton's state per model (ready where any endpoint of the pool
has it ready; ``placement`` says which); where its weights came from and the AP
its build measured (the provenance the build wrote into the model's config);
the latest evaluation records (``TIERDET_EVAL_DIR``, beside the AP each build
recorded: the AP gauges hold a model's recorded figure from the first scrape
after it is ready, labelled with the images it was measured on, until a newer
``tierdet eval`` report replaces it). The catalog keeps the
router's AP table current, so the router never prefers meaningless boxes: a
model is ranked by the AP measured for the weights it serves where there is
one; by its published figure only when those are the verified published
weights (an official download, or a file whose sha256 is the published one);
else by 0: untrained (random) weights, or weights nobody measured. Routing
tests and benchmarks on random weights pin the published figures instead
(``TIERDET_PIN_PUBLISHED_AP``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import PurePath

import numpy as np

from tierdet.contract.errors import ApiError
from tierdet.contract.results import ModelInfo
from tierdet.registry.accuracy import APResult, EvalRecord, latest_and_previous, load_records
from tierdet.registry.profile import LatencyProfile, ModelProfile
from tierdet.registry.specs import ModelSpec, known, lookup
from tierdet.serving.backend import Backend
from tierdet.serving.governor import LoadGovernor
from tierdet.serving.latency import LatencyModel
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import EndpointPool
from tierdet.serving.routing import Router
from tierdet.serving.settings import Settings
from tierdet.serving.tiers import TierConfig

log = logging.getLogger("tierdet")


@dataclass
class ModelState:
    spec: ModelSpec
    ready: bool = False
    weights: str = "unknown"
    status: str = "UNKNOWN"  # Triton's state: READY, UNAVAILABLE, LOADING, ...
    reason: str = ""  # why it is not ready (Triton's load error), if known
    measured_ap: float | None = None  # AP (0..1) the build recorded for these weights
    measured_on: str = ""  # ... and the data set it was measured on
    verified: bool = False  # the weights are the ones the published AP is about
    pin_published: bool = False  # rank by the published AP whatever the weights

    @property
    def routing_ap(self) -> float:
        """The AP (percent) the router ranks this model by."""
        if self.measured_ap is not None and not self.pin_published:
            return round(100 * self.measured_ap, 1)
        if self.verified or self.pin_published:
            return self.spec.published_ap or 0.0
        return 0.0


def initial_ap(pin_published: bool) -> dict[str, float]:
    """The router's AP table before any model's provenance is known."""
    return {name: ModelState(spec, pin_published=pin_published).routing_ap
            for name, spec in known().items()}


def verified_weights(spec: ModelSpec, provenance: dict[str, str]) -> bool:
    """Whether the build's weights are those the spec's published AP is about: an
    official download checked against its digest, a card's file checked against
    the sha256 the card names, or a local file whose sha256 is the published one."""
    if spec.published_ap is None:
        return False
    if provenance.get("weights", "").startswith(("official", "card ")):
        return provenance.get("weights_digest_check", "").startswith("sha256")
    official = spec.official_weights
    digest = provenance.get("weights_sha256", "")
    return bool(official and len(official.sha256) >= 8 and digest.startswith(official.sha256))


# When a build record says nothing of its own time: older than any evaluation.
_LONG_AGO = "1970-01-01T00:00:00+00:00"
# The larger batch of the profile measured for a model without one: two images
# tell a device that batches for free (a GPU) from one that runs them one after
# another (a CPU); more would only hold the device longer beside live traffic.
PROBE_BATCH = 2
# How long each probe call waits for the device to fall idle before going anyway.
PROBE_IDLE_WAIT_S = 1.0


def recorded_record(state: ModelState, provenance: dict[str, str]) -> EvalRecord:
    """The AP a build recorded (a card's measured figure, a checkpoint's sidecar) as
    an evaluation through the gateway, dated by the build: AP only, the rest unknown."""
    assert state.measured_ap is not None
    unknown = -1.0  # left out of the gauges, as a size range without ground truth
    return EvalRecord.of(APResult(state.measured_ap, *[unknown] * 5), model=state.spec.name,
                         tier=None, source="gateway", dataset=state.measured_on or "unknown",
                         split="recorded", images=0,
                         evaluated_at=provenance.get("built_at") or _LONG_AGO)


class Catalog:
    def __init__(self, settings: Settings, pool: EndpointPool, router: Router,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.router = router
        self.metrics = metrics
        self.states: dict[str, ModelState] = {}
        self._endpoints_shown: set[str] = set()  # endpoints with an endpoint_up series
        self.backend_up = False
        self.refreshed_at: float | None = None  # time.monotonic() of the last refresh
        self.evaluations: dict[tuple[str, str, str, str],
                               tuple[EvalRecord, EvalRecord | None]] = {}
        self.recorded: dict[str, EvalRecord] = {}  # model -> the AP its build recorded
        # Models changed while serving (tierdet.serving.changes): added beside the
        # configured ones, or retired (never routed to, whatever Triton says).
        self.added: set[str] = set()
        self.retired: set[str] = set()
        # Served only when asked for by name or diverted to (a canary's side):
        # never ranked, so neither the router nor shadow scoring chooses them.
        self.unranked: set[str] = set()
        self._in_use: dict[str, int] = {}  # model -> requests routed to it, not answered
        self._idle: dict[str, asyncio.Event] = {}  # model -> set when none is
        self._refreshing = asyncio.Lock()  # the watcher's and a change's refresh

    def serves(self, name: str) -> bool:
        """``name`` is a model this gateway may route to (ready or not)."""
        return lookup(name) is not None and name not in self.retired and (
            not self.settings.models or name in self.settings.models or name in self.added)

    def ready_models(self) -> list[str]:
        return [n for n, s in self.states.items() if s.ready and n not in self.retired]

    @contextmanager
    def using(self, *models: str) -> Iterator[None]:
        """Count a request that may be routed to ``models`` until it is answered (or
        failed): a retired model is unloaded only when none is left (``drained``)."""
        for model in models:
            self._in_use[model] = self._in_use.get(model, 0) + 1
        try:
            yield
        finally:
            for model in models:
                self._in_use[model] -= 1
                if not self._in_use[model] and model in self._idle:
                    self._idle[model].set()

    async def drained(self, model: str, timeout_s: float) -> bool:
        """Wait until no request routed to ``model`` is in flight; False if some
        still were after ``timeout_s``."""
        if not self._in_use.get(model):
            return True
        idle = self._idle.setdefault(model, asyncio.Event())
        idle.clear()
        try:
            await asyncio.wait_for(idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def retire(self, model: str) -> None:
        """Stop routing to ``model`` at once: requests already routed finish."""
        self.retired.add(model)
        self.added.discard(model)
        state = self.states.get(model)
        if state is not None:
            state.ready = False
        self.metrics.model_ready.labels(model).set(0)

    def forget(self, model: str) -> None:
        """A retired model, drained and unloaded: nothing of it is shown any more.
        (Until now the router kept its AP for the requests validated before.)"""
        self.router.ap.pop(model, None)
        self.router.latency.forget(model)
        self.metrics.drop_route_service(model=model)
        self.states.pop(model, None)
        self.recorded.pop(model, None)

    def add(self, model: str, label_set: str) -> None:
        """Serve ``model`` (loaded at Triton by a change) beside the configured ones."""
        self.retired.discard(model)
        self.added.add(model)
        self.router.label_sets[model] = label_set

    async def renew(self, model: str) -> None:
        """A model replaced under its name: read its build record and measure its
        latency again (the new version's), then rank it by what it serves now."""
        state = self.states.get(model)
        if state is None:
            return
        await self._probe_latency(state.spec, again=True)
        await self._read_provenance(state)

    def placement(self, models: list[str] | None = None) -> dict[str, list[str]]:
        """Each ready model (of ``models``, if given) -> the endpoints serving it now
        (one that failed a call is out at once, not at the next refresh)."""
        where = self.pool.placement()
        names = self.ready_models() if models is None else models
        return {m: where[m] for m in names if m in where}

    async def refresh(self) -> None:
        """Re-read the pool (endpoints, readiness) and weights provenance of every model."""
        async with self._refreshing:  # one at a time: a new model is probed once
            await self._refresh()

    async def _refresh(self) -> None:
        await self.pool.refresh()
        index = self.pool.states() if self.pool.any_up else None
        self.backend_up = index is not None
        self.refreshed_at = time.monotonic()
        self.metrics.triton_up.set(1 if index is not None else 0)
        for url in self._endpoints_shown - set(self.pool.endpoints):  # left the pool
            # 0 first: with workers the series' file outlives remove(), at its last value.
            self.metrics.triton_endpoint_up.labels(url).set(0)
            self.metrics.triton_endpoint_up.remove(url)
            self.router.latency.left(url)
            self.metrics.drop_route_service(endpoint=url)
        self._endpoints_shown = set(self.pool.endpoints)
        for url, endpoint in self.pool.endpoints.items():
            self.metrics.triton_endpoint_up.labels(url).set(1 if endpoint.up else 0)
        names = ((*self.settings.models, *sorted(self.added)) if self.settings.models
                 else tuple(n for n in (index or {}) if lookup(n)))
        for name in names:
            spec = lookup(name)
            if spec is None or name in self.retired:
                continue
            state = self.states.setdefault(
                name, ModelState(spec, pin_published=self.settings.pin_published_ap))
            state.status, state.reason = (index or {}).get(
                name, ("UNREACHABLE" if index is None else "NOT_LOADED", ""))
            if state.status == "READY" and not state.ready:
                # Awaited, and before the provenance ranks it and it is called ready:
                # until the router knows a model's latency it would misroute, so the
                # probe is part of getting ready (like warm-up).
                await self._probe_latency(spec)
                await self._read_provenance(state)
            state.ready = state.status == "READY"
            self.metrics.model_ready.labels(name).set(1 if state.ready else 0)
            if spec.published_ap is not None:
                self.metrics.published_ap.labels(name).set(spec.published_ap)

    def refresh_accuracy(self) -> None:
        """Re-read evaluation records (cheap: a folder of small JSON files); with the
        builds' recorded figures, the newest per model and data set wins."""
        records = sorted([*self.recorded.values(), *load_records(self.settings.eval_dir)],
                         key=lambda r: r.timestamp)
        self.evaluations = latest_and_previous(records)
        self.metrics.set_accuracy(records)

    async def refresh_statistics(self) -> None:
        """Batch-size counts from the backend for every ready model (for /metrics)."""
        where = self.pool.placement()
        for name in self.ready_models():
            if name not in where:
                continue
            try:  # one endpoint's: a sample of how Triton batches this model
                stats = await self.pool.backend(where[name][0]).batch_executions(name)
            except Exception:
                continue
            self.metrics.triton_batches.update(name, stats)

    def measured_ap(self, state: ModelState) -> dict[str, float]:
        """AP (0..1) measured through the gateway, per "dataset[/tier]": the build's
        record of its weights, then the latest evaluation reports."""
        out = {state.measured_on: state.measured_ap} if state.measured_ap is not None else {}
        out.update({f"{d}/{t}" if t else d: latest.ap
                    for (m, t, d, source), (latest, _) in self.evaluations.items()
                    if m == state.spec.name and source == "gateway"})
        return out

    def infos(self) -> tuple[ModelInfo, ...]:
        return tuple(
            ModelInfo(name=name, family=st.spec.family.value, input_size=st.spec.input_size,
                      preprocessing=st.spec.preprocessing.resize,
                      published_coco_ap=st.spec.published_ap, params_m=st.spec.params_m,
                      ready=st.ready, status=st.status, reason=st.reason, weights=st.weights,
                      latency_ms=round(self.router.service_ms(name), 3),
                      routing_ap=st.routing_ap, label_set=st.spec.labels.name,
                      measured_ap=self.measured_ap(st))
            for name, st in sorted(self.states.items()))

    def _backend_of(self, model: str) -> Backend:
        urls = self.pool.placement().get(model)
        return self.pool.backend(urls[0]) if urls else self.pool.first()

    async def _read_provenance(self, state: ModelState) -> None:
        try:
            prov = await self._backend_of(state.spec.name).provenance(state.spec.name)
        except Exception:
            return
        state.weights = prov.get("weights", "unknown")
        state.verified = verified_weights(state.spec, prov)
        if prov.get("measured_ap"):
            state.measured_ap = float(prov["measured_ap"])
            state.measured_on = prov.get("measured_on", "")
            self.recorded[state.spec.name] = recorded_record(state, prov)
            self.refresh_accuracy()
        if state.spec.name not in self.unranked:
            self.router.rank(state.spec.name, state.routing_ap)
        if state.weights.startswith("random"):
            log.warning("model %s serves RANDOM weights: %s", state.spec.name, state.weights)
        else:
            log.info("model %s ready, weights: %s", state.spec.name, state.weights)

    async def _probe_latency(self, spec: ModelSpec, again: bool = False) -> None:
        """Seed the router with a two-point profile of a model it has no profile
        for: batch 1 and a larger batch. Without the second point the router
        could not tell a device that batches for free (a GPU) from one that runs
        the images one after another (a CPU), and would read every batched
        answer against the wrong one. A model added while serving is probed
        beside live traffic: each call waits for an idle device, and is counted
        in the device's backlog as the slowest known model until timed (the
        router's prior for an unknown model, a second, would refuse every
        budgeted request for the probe's length)."""
        known = self.router.profiled(spec.name)
        if known and not again:
            return
        url = self.pool.placement().get(spec.name, [""])[0]
        if url not in self.pool.endpoints:
            return
        if not known:
            latency = self.router.latency
            latency.measured(spec.name, ModelProfile({1: latency.slowest_ms()}))
        batch = min(PROBE_BATCH, spec.batching.max_batch_size)
        timings: dict[int, float] = {}
        try:
            for size in (1, 1, batch):  # the first call may pay one-off costs
                timings[size] = await self._timed_call(spec, url, size)
                if not known and size == 1:
                    self.router.latency.measured(spec.name, ModelProfile({1: timings[1]}))
        except ApiError:
            if not known:
                self.router.latency.forget(spec.name)
            return
        self.router.latency.measured(spec.name, ModelProfile(timings))
        log.info("model %s: %s; measured %s", spec.name,
                 "a new version" if again else "no latency profile",
                 ", ".join(f"{ms:.1f} ms at batch {b}" for b, ms in timings.items()))

    async def _timed_call(self, spec: ModelSpec, url: str, size: int) -> float:
        """One probe call of ``size`` images once ``url``'s device is idle (or
        ``PROBE_IDLE_WAIT_S`` has passed), counted as work on it; its time, ms."""
        deadline = time.monotonic() + PROBE_IDLE_WAIT_S
        while not self.router.idle(url) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        image = np.full((size, spec.input_size, spec.input_size, 3), 114, np.uint8)
        with self.router.dispatch(spec.name, url):
            start = time.perf_counter()
            await self.pool.backend(url).infer(spec.name, image, timeout_s=60.0)
            return (time.perf_counter() - start) * 1e3


def build_router(settings: Settings) -> Router:
    tiers = TierConfig.load(settings.tiers_file, settings.default_tier)
    latency = LatencyModel(LatencyProfile.load(settings.profile_file))
    return Router(initial_ap(settings.pin_published_ap), tiers, latency,
                  default_budget_ms=settings.request_timeout_s * 1e3,
                  margin_frac=settings.route_margin_frac, margin_ms=settings.route_margin_ms,
                  shared_device=settings.route_shared_device,
                  governor=LoadGovernor(target=settings.route_utilization_target),
                  calibrate_quantile=settings.route_calibrate_quantile,
                  label_sets={name: spec.labels.name for name, spec in known().items()},
                  default_label_set=settings.default_label_set)


def public(info: ModelInfo) -> ModelInfo:
    """``info`` without what names the server's folders: the weights file's
    directory (``file <path>`` keeps the file's name) and Triton's load error
    (it quotes paths)."""
    weights = info.weights
    if weights.startswith("file "):
        weights = "file " + PurePath(weights[len("file "):]).name
    return replace(info, weights=weights,
                   reason="not ready (the admin sees why)" if info.reason else "")
