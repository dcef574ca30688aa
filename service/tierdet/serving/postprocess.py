"""Model rows back to what the client asked for: image pixels, its classes, its limits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.results import Detection
from tierdet.registry.labels import LabelSet
from tierdet.serving import imaging


def class_filter(classes: Sequence[str] | None, labels: LabelSet) -> frozenset[int] | None:
    """The category ids ``classes`` names in ``labels`` (None: keep every class);
    ``ApiError`` invalid_option naming the first class ``labels`` lacks."""
    if classes is None:
        return None
    ids = set()
    for name in classes:
        cid = labels.category_id(name)
        if cid is None:
            raise ApiError(ErrorCode.INVALID_OPTION, f"classes: {name!r} is not a class of "
                           f"label set {labels.name!r}")
        ids.add(cid)
    return frozenset(ids)


def knows_classes(classes: Sequence[str] | None, labels: LabelSet) -> bool:
    return classes is None or all(labels.category_id(c) is not None for c in classes)


def unknown_classes(classes: Sequence[str], label_sets: Iterable[LabelSet]) -> list[str]:
    """The entries of ``classes`` that none of ``label_sets`` knows."""
    sets = list(label_sets)
    return [c for c in classes if all(s.category_id(c) is None for s in sets)]


def detections_from_rows(rows: np.ndarray, labels: LabelSet, geometry: imaging.Geometry,
                         score_threshold: float, max_detections: int,
                         keep: frozenset[int] | None = None) -> tuple[Detection, ...]:
    """Model rows [K, 6] (input pixels) -> detections in image pixels, best first.

    The class filter ``keep`` (category ids) applies first, then the score
    threshold, then ``max_detections``."""
    rows = rows[rows[:, 4] >= max(score_threshold, 1e-12)]
    rows = rows[np.argsort(-rows[:, 4], kind="stable")]
    boxes = imaging.boxes_to_image(rows[:, :4], geometry)
    out: list[Detection] = []
    for (x1, y1, x2, y2), row in zip(boxes, rows, strict=True):
        label = labels.lookup(int(row[5]))
        if label is None or x2 <= x1 or y2 <= y1:  # unused slot, or all in padding
            continue
        if keep is not None and label[0] not in keep:
            continue
        out.append(Detection(float(x1), float(y1), float(x2), float(y2), float(row[4]),
                             label[0], label[1]))
        if len(out) == max_detections:
            break
    return tuple(out)
