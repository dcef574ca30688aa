"""COCO AP, the one implementation: ``tierdet eval`` (``training.evaluation``)
and shadow scoring (``serving.shadow``) both measure with it.

pycocotools' bbox AP at IoU .50:.95, at most 100 detections per image, as
fractions in 0..1 (-1 where there is no ground truth in a size range).
"""

from __future__ import annotations

import contextlib
import io

from tierdet.registry.accuracy import APResult


def coco_ap(gt: dict, detections: list[dict]) -> APResult:
    """pycocotools bbox AP of ``detections`` (COCO result dicts) against ``gt``."""
    if not detections:
        return APResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    with _quiet():
        evaluator = _evaluated(gt, detections)
        evaluator.accumulate()
        evaluator.summarize()
    return APResult.from_stats(evaluator.stats)


def matched_at_iou50(gt: dict, detections: list[dict]) -> list[tuple[float, bool]]:
    """(score, matched an object at IoU 0.5) of each detection that COCO's own
    matching counts (at most 100 per image, crowd matches left out)."""
    with _quiet():
        evaluator = _evaluated(gt, detections)
    out = []
    for image in evaluator.evalImgs:  # per category, area range and image
        if image is None or image["aRng"] != evaluator.params.areaRng[0]:
            continue
        for score, match, ignore in zip(image["dtScores"], image["dtMatches"][0],
                                        image["dtIgnore"][0], strict=True):
            if not ignore:
                out.append((float(score), bool(match)))
    return out


def _evaluated(gt: dict, detections: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO()
    truth.dataset = gt
    truth.createIndex()
    evaluator = COCOeval(truth, truth.loadRes(detections), "bbox")
    evaluator.evaluate()
    return evaluator


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools narrates every step on stdout; a report is printed by us."""
    return contextlib.redirect_stdout(io.StringIO())
