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
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # pycocotools narrates every step on stdout; a report is printed by us.
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        if not detections:
            return APResult(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        result = truth.loadRes(detections)
        evaluator = COCOeval(truth, result, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return APResult.from_stats(evaluator.stats)
