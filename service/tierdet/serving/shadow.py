"""Shadow scoring: each served model's accuracy estimated live, without labels.

After a caller has its answer, a share of answered requests
(``TIERDET_SHADOW_SAMPLE``) is run once more on the reference: the most
accurate ready model of the served model's label set, as the router ranks
them (a request the reference itself answered is not sampled). The served
model's rows for the whole image (at COCO's evaluation threshold, whatever
the caller's threshold, class filter or tiles) are scored against the
reference's detections at or above ``TIERDET_SHADOW_SCORE_THRESHOLD`` (the
pseudo-labels), both mapped to image pixels by the gateway's own code, with
COCO AP@[.5:.95] (``apscore``: the code ``tierdet eval`` measures with). The
agreement of a (tier, model) is the mean of the per-image AP over its last
``TIERDET_SHADOW_WINDOW`` scored images; an image whose reference finds
nothing has nothing to score against and is counted ``empty``.

Shadow work never takes from callers: a sample waits in a small queue
(``TIERDET_SHADOW_QUEUE``; full: dropped) for one background task, which
decodes the image again itself (one image at a time, outside the callers'
image slots: ``memory`` counts it), and sends it to the reference only where
the reference's device is idle (nothing of this gateway's in flight there and
Triton's queue empty, checked before decoding and again before sending; else
dropped), at Triton's lowest priority level. While a canary runs (``canary``),
every answer of it is sampled and, once scored, paired with the answer of the
model it would replace to the same image, run here too; the pair goes to the
canary's rule. While it runs, the router counts
it as work on that device like any other, so callers are routed around it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.contract.results import Detection
from tierdet.registry.specs import get_spec
from tierdet.serving import decoding, imaging, memory, postprocess, tiling
from tierdet.serving.apscore import coco_ap
from tierdet.serving.canary import Canaries
from tierdet.serving.catalog import Catalog
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import EndpointPool
from tierdet.serving.routing import Decision, Router
from tierdet.serving.settings import Settings
from tierdet.serving.turns import DeviceTurns

log = logging.getLogger("tierdet")

# What became of a sample: the label values of tierdet_shadow_samples_total.
OUTCOMES = ("sampled", "scored", "empty", "dropped_queue", "dropped_busy", "too_large",
            "failed")
# What the shadow's decode refuses (memory.SHADOW_MAX_*): the sample is dropped.
TOO_LARGE = {ErrorCode.IMAGE_TOO_LARGE, ErrorCode.TOO_MANY_PIXELS}
# The served rows are scored as `tierdet eval` scores a model: everything it
# ranks, at most 100 detections (COCO practice); AP weighs the scores.
SERVED_FLOOR = 0.001
MAX_DETECTIONS = 100


@dataclass(frozen=True)
class Sample:
    """An answered request to score: the served model's rows for the whole view."""

    tier: str | None
    model: str
    reference: str
    image: bytes | Pixels  # what the caller sent: decoded again for the reference
    rows: np.ndarray  # [K, 6] in the served model's input pixels
    geometry: imaging.Geometry  # how they map back to the image


def agreement(served: tuple[Detection, ...], reference: tuple[Detection, ...]) -> float | None:
    """COCO AP@[.5:.95] of ``served`` against ``reference`` taken as ground truth
    (one image, image pixels); None where the reference has no box."""
    if not reference:
        return None
    classes = sorted({d.class_id for d in (*served, *reference)})

    def box(d: Detection) -> list[float]:
        return [d.x1, d.y1, d.x2 - d.x1, d.y2 - d.y1]

    truth = {"images": [{"id": 1}], "categories": [{"id": c} for c in classes],
             "annotations": [{"id": i, "image_id": 1, "category_id": d.class_id,
                              "bbox": box(d), "area": (d.x2 - d.x1) * (d.y2 - d.y1),
                              "iscrowd": 0} for i, d in enumerate(reference, start=1)]}
    answers = [{"image_id": 1, "category_id": d.class_id, "bbox": box(d), "score": d.score}
               for d in served]
    return max(0.0, coco_ap(truth, answers).ap)


def score(sample: Sample, reference_rows: np.ndarray, geometry: imaging.Geometry,
          threshold: float) -> float | None:
    """The sample's agreement with the reference's rows (see ``agreement``)."""
    served_spec, reference_spec = get_spec(sample.model), get_spec(sample.reference)
    served = postprocess.detections_from_rows(sample.rows, served_spec.labels,
                                              sample.geometry, SERVED_FLOOR, MAX_DETECTIONS)
    labels = postprocess.detections_from_rows(reference_rows, reference_spec.labels, geometry,
                                              threshold, MAX_DETECTIONS)
    return agreement(served, labels)


class Shadow:
    def __init__(self, settings: Settings, pool: EndpointPool, router: Router,
                 catalog: Catalog, metrics: Metrics, canaries: Canaries | None = None,
                 rng: random.Random | None = None, turns: DeviceTurns | None = None) -> None:
        self.settings = settings
        self.turns = turns or DeviceTurns(enabled=False)
        self.canaries = canaries
        self.pool = pool
        self.router = router
        self.catalog = catalog
        self.metrics = metrics
        self.rng = rng or random.Random()
        # The shadow decodes within its own memory (see memory.shadow_bytes).
        self.decode_limits = settings.model_copy(update={
            "max_image_bytes": min(settings.max_image_bytes, memory.SHADOW_MAX_BYTES),
            "max_image_pixels": memory.shadow_pixels(settings)})
        self.windows: dict[tuple[str | None, str], deque[float]] = {}
        self._queue: asyncio.Queue[Sample] | None = None
        self._task: asyncio.Task[None] | None = None

    def reference(self, model: str) -> str | None:
        """The most accurate ready model of ``model``'s label set, as the router
        ranks them; None where that is ``model`` itself."""
        label_set = self.router.label_set(model)
        ready = [m for m in self.catalog.placement()
                 if m in self.router.ap and self.router.label_set(m) == label_set]
        if not ready:
            return None
        best = max(ready, key=lambda m: (self.router.ap[m], m))
        return None if best == model else best

    def offer(self, decision: Decision, image: bytes | Pixels, rows: np.ndarray,
              geometry: imaging.Geometry) -> None:
        """An answered request: sampled or not, queued or dropped; no waiting."""
        # Both sides of a running canary: every answer (the side's at its share).
        watched = self.canaries is not None and self.canaries.watched(decision.model)
        share = 1.0 if watched else self.settings.shadow_sample
        if share <= 0 or self.rng.random() >= share:
            return
        reference = self.reference(decision.model)
        if reference is None:
            return
        self.metrics.observe_shadow(decision.tier, decision.model, "sampled")
        held = image.data if isinstance(image, Pixels) else image
        if len(held) > memory.SHADOW_MAX_BYTES:
            self.metrics.observe_shadow(decision.tier, decision.model, "too_large")
            return
        try:
            self._started().put_nowait(Sample(decision.tier, decision.model, reference, image,
                                              np.array(rows, copy=True), geometry))
        except asyncio.QueueFull:
            self.metrics.observe_shadow(decision.tier, decision.model, "dropped_queue")

    def _started(self) -> asyncio.Queue[Sample]:
        """The queue, its worker started on the first sample in the loop that serves
        (again if that loop changed: a loop that ended took its worker with it)."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue(self.settings.shadow_queue)
            self._task = loop.create_task(self._work())
        return self._queue

    async def join(self) -> None:
        """Until every sample queued so far has ended."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Stop the worker; queued samples are dropped uncounted."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = self._queue = None

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            sample = await self._queue.get()
            try:
                outcome = await self._run(sample)
            except Exception:  # a bug must not stop the worker; the sample counts failed
                log.exception("shadow scoring of %s failed", sample.model)
                outcome = "failed"
            self.metrics.observe_shadow(sample.tier, sample.model, outcome)
            self._queue.task_done()

    def _idle_endpoint(self, model: str) -> str | None:
        """An endpoint with ``model`` ready whose device has nothing queued."""
        for endpoint in self.catalog.placement([model]).get(model, []):
            if self.router.idle(endpoint):
                return endpoint
        return None

    async def _run(self, sample: Sample) -> str:
        """Run the reference on the sample's image and score it: its outcome."""
        if self._idle_endpoint(sample.reference) is None:
            return "dropped_busy"  # checked first: a busy device costs no decode
        try:
            answer = await self._answer(sample.reference, sample.image)
        except ApiError as exc:
            if exc.code in TOO_LARGE:
                return "too_large"
            log.info("shadow run of %s on %s failed: %s", sample.model, sample.reference,
                     exc.message)
            return "failed"
        if answer is None:
            return "dropped_busy"
        rows, geometry = answer
        threshold = self.settings.shadow_score_threshold
        ap = await asyncio.to_thread(score, sample, rows, geometry, threshold)
        if ap is None:
            return "empty"
        self._keep(sample.tier, sample.model, ap)
        await self._pair(sample, ap, rows, geometry)
        return "scored"

    async def _answer(self, model: str, image: bytes | Pixels
                      ) -> tuple[np.ndarray, imaging.Geometry] | None:
        """``model``'s rows for ``image``, decoded and prepared here, sent at Triton's
        lowest priority where its device is idle; None where it is not."""
        spec = get_spec(model)
        size = spec.input_size
        # Ordinary memory, not a shared-memory region: the shadow's input may wait
        # while callers take every region.
        batch = np.empty((1, size, size, 3), np.uint8)
        decoded, _ = await asyncio.to_thread(decoding.decode_for, image, [spec],
                                             self.decode_limits)
        geometries, _ = await asyncio.to_thread(tiling.prepare_views, decoded, size,
                                                spec.preprocessing, [], batch)
        del decoded
        endpoint = self._idle_endpoint(model)  # the device may be busy now
        if endpoint is None:
            return None
        timeout_s = self.settings.request_timeout_s
        with self.router.dispatch(model, endpoint):
            async with self.turns.turn(endpoint, model, timeout_s) as waited_s:
                rows = await self.pool.backend(endpoint).infer(
                    model, batch, timeout_s=timeout_s - waited_s,
                    priority=spec.batching.priority_levels)  # the lowest level
        return rows[0], geometries[0]

    async def _pair(self, sample: Sample, ap: float, reference_rows: np.ndarray,
                    geometry: imaging.Geometry) -> None:
        """A canary's scored answer: the model it would replace answers the same image
        here too, scored against the same reference detections; the pair goes to the
        rule (what differs from image to image cancels). No pair where that model's
        device is busy."""
        canaries = self.canaries
        canary = canaries.running(sample.model) if canaries is not None else None
        # A canary of the reference itself has nothing above it to be judged against:
        # its agreement with the old version is not accuracy (the admin decides it).
        if canaries is None or canary is None or sample.model != canary.side \
                or canary.name == sample.reference or self._idle_endpoint(canary.name) is None:
            return
        try:
            answer = await self._answer(canary.name, sample.image)
        except ApiError as exc:
            log.info("shadow run of %s for its canary failed: %s", canary.name, exc.message)
            return
        if answer is None:
            return
        old = Sample(sample.tier, canary.name, sample.reference, sample.image, *answer)
        old_ap = await asyncio.to_thread(score, old, reference_rows, geometry,
                                         self.settings.shadow_score_threshold)
        if old_ap is not None:
            canaries.paired(canary, ap, old_ap)

    def _keep(self, tier: str | None, model: str, ap: float) -> None:
        window = self.windows.setdefault((tier, model),
                                         deque(maxlen=self.settings.shadow_window))
        window.append(ap)
        self.metrics.set_agreement(tier, model, sum(window) / len(window), len(window))
        if self.canaries is not None:
            self.canaries.scored(model, ap)
