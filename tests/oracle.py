"""An independent oracle for what the gateway should answer: ONNX Runtime on the
served model file, with this file's own decode, resize and box mapping.

Written from the specification (the registry's preprocessing: letterbox at
the top-left with the pad colour, or stretch; INTER_AREA when shrinking a
letterbox, INTER_LINEAR otherwise), not from the gateway's code, so a
mistake in the serving path cannot hide in its own test.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
from tierdet.registry.specs import ModelSpec


def decode(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 (EXIF orientation applied, as IMREAD_COLOR does)."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


def model_input(image: np.ndarray, spec: ModelSpec, resize: str | None = None
                ) -> tuple[np.ndarray, float, float]:
    """The model's uint8 input and the scale applied on each axis."""
    size, prep = spec.input_size, spec.preprocessing
    h, w = image.shape[:2]
    if (resize or prep.resize) == "stretch":
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR), size / w, size / h
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.full((size, size, 3), prep.pad_rgb, np.uint8)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return canvas, nw / w, nh / h


def detections(session: ort.InferenceSession, image: np.ndarray, spec: ModelSpec,
               threshold: float, resize: str | None = None) -> list[dict]:
    """What the served graph finds, boxes in image pixels, as the API spells them."""
    tensor, sx, sy = model_input(image, spec, resize)
    rows = session.run(None, {session.get_inputs()[0].name: tensor[None]})[0][0]
    h, w = image.shape[:2]
    out = []
    for x1, y1, x2, y2, score, slot in rows:
        if score < threshold or not 0 <= slot < spec.labels.num_classes:
            continue
        cid = spec.labels.category_ids[int(slot)]
        box = (min(max(x1 / sx, 0), w), min(max(y1 / sy, 0), h),
               min(max(x2 / sx, 0), w), min(max(y2 / sy, 0), h))
        if cid is None or box[2] <= box[0] or box[3] <= box[1]:
            continue
        out.append({"x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                    "score": float(score), "class_id": cid})
    return out


def same(got: list[dict], want: list[dict], box_px: float = 0.05) -> bool:
    """Equal up to the order of tied scores."""
    return len(got) == len(want) and all(
        any(abs(g["score"] - w["score"]) < 1e-4 and g["class_id"] == w["class_id"]
            and max(abs(g[k] - w[k]) for k in ("x1", "y1", "x2", "y2")) < box_px for w in want)
        for g in got)
