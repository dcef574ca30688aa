"""Draw detections on an image: boxes, class names and scores (OpenCV).

Used by ``POST /v1/detect?render=true`` and by ``tierdet detect --out``, so
an annotated image looks the same whichever way it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from tierdet.contract.results import Detection

ImageFormat = Literal["jpeg", "png"]
MEDIA_TYPES: dict[ImageFormat, str] = {"jpeg": "image/jpeg", "png": "image/png"}

# Tableau-like colours (RGB), chosen to stay distinguishable on photographs;
# a class keeps its colour across images because it is picked by class id.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
    (219, 219, 141), (158, 218, 229), (57, 59, 121), (99, 121, 57), (140, 109, 49),
)


def color_for(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def draw(image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
    """A copy of ``image`` (RGB uint8 HxWx3) with each detection drawn on it."""
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    # Line width and text size follow the image, so a 4K frame stays legible
    # and a thumbnail is not buried under labels.
    thickness = max(2, round(min(h, w) / 320))
    font_scale = max(0.35, min(h, w) / 1100)
    # Lowest score first: the most confident boxes end up on top.
    for det in sorted(detections, key=lambda d: d.score):
        color = color_for(det.class_id)
        p1 = (round(det.x1), round(det.y1))
        p2 = (round(det.x2), round(det.y2))
        cv2.rectangle(out, p1, p2, color, thickness)  # axis-aligned: no need for AA
        _label(out, f"{det.class_name} {det.score:.2f}", p1, color, font_scale, thickness)
    return out


def _label(image: np.ndarray, text: str, corner: tuple[int, int], color: tuple[int, int, int],
           font_scale: float, thickness: int) -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_thickness = max(1, thickness // 2)
    (tw, th), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
    pad = max(2, thickness)
    x = min(max(0, corner[0]), max(0, image.shape[1] - tw - 2 * pad))
    top = corner[1] - th - baseline - 2 * pad
    if top < 0:  # no room above the box: put the label just inside it
        top = corner[1]
    bottom = top + th + baseline + 2 * pad
    cv2.rectangle(image, (x, top), (x + tw + 2 * pad, bottom), color, cv2.FILLED)
    # Dark text on light colours, white on dark (relative luminance).
    lum = 0.2126 * color[0] + 0.7152 * color[1] + 0.0722 * color[2]
    ink = (0, 0, 0) if lum > 140 else (255, 255, 255)
    cv2.putText(image, text, (x + pad, bottom - baseline - pad), font, font_scale, ink,
                text_thickness, cv2.LINE_AA)


def encode(image: np.ndarray, fmt: ImageFormat, jpeg_quality: int = 90) -> bytes:
    """RGB uint8 -> JPEG or PNG bytes."""
    bgr = image[..., ::-1]
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError(f"could not encode the image as {fmt}")
    return buf.tobytes()


def negotiate(accept: str | None) -> ImageFormat:
    """JPEG or PNG from an ``Accept`` header (q-values honoured); JPEG by default.

    Anything we cannot satisfy (``application/json`` alone, say) also gets
    JPEG: the caller asked to render, so an image is the useful answer.
    """
    best: tuple[float, ImageFormat] = (0.0, "jpeg")
    for part in (accept or "").split(","):
        media, _, params = part.strip().partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:  # q=0: explicitly not acceptable
            continue
        matches: tuple[tuple[ImageFormat, bool], ...] = (
            ("png", media == "image/png"), ("jpeg", media in ("image/jpeg", "image/jpg")))
        for fmt, exact in matches:
            if exact and q > best[0]:
                best = (q, fmt)
    return best[1]
