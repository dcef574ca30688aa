"""Image decoding and geometry: bytes -> model input, model boxes -> image boxes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from tierdet.registry.specs import Preprocessing


@dataclass(frozen=True)
class Geometry:
    """How an image was placed into the model input, to undo it on boxes."""

    scale_x: float
    scale_y: float
    width: int  # original image size
    height: int
    offset_x: float = 0.0  # where the resized image starts in the model input
    offset_y: float = 0.0


# Transparent pixels are shown over white, as a browser on a white page would.
ALPHA_BACKGROUND = 255


# Pixels converted at a time: the temporaries of a conversion (a 16-bit band's
# 8-bit copy, an alpha blend's floats: BAND_BYTES at most) stay a few MB
# whatever the image.
BAND_PIXELS = 1 << 16
BAND_BYTES = 48 * BAND_PIXELS


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image (gray, gray+alpha, BGR, BGRA; 8/16-bit or float)
    -> RGB uint8, alpha composited over white. Takes the RGB image's 3 bytes
    a pixel and a band's temporaries beside ``image``, nothing more (see
    serving/memory.py)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    scale = _to_8bit(image)
    out = np.empty((image.shape[0], image.shape[1], 3), np.uint8)
    rows = max(1, BAND_PIXELS // image.shape[1])
    for y in range(0, image.shape[0], rows):
        _band_to_rgb(scale(image[y:y + rows]), out[y:y + rows])
    return out


def _to_8bit(image: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """How a band of ``image`` becomes uint8: the high byte of 16-bit samples,
    other depths stretched from the whole image's range to 0-255."""
    if image.dtype == np.uint8:
        return lambda band: band
    if image.dtype == np.uint16:
        return lambda band: (band >> 8).astype(np.uint8)
    low, high = float(image.min()), float(image.max())
    gain = 255.0 / (high - low) if high > low else 0.0
    return lambda band: cv2.convertScaleAbs(band, alpha=gain, beta=-low * gain)


def _band_to_rgb(band: np.ndarray, out: np.ndarray) -> None:
    if band.ndim == 2:
        cv2.cvtColor(band, cv2.COLOR_GRAY2RGB, dst=out)
        return
    if band.shape[2] == 2:  # gray + alpha
        band = np.dstack([cv2.cvtColor(band[:, :, :1], cv2.COLOR_GRAY2BGR), band[:, :, 1]])
    if band.shape[2] == 4:  # (colour * alpha + white * (255 - alpha)) / 255, rounded
        alpha = band[:, :, 3:].astype(np.uint16)
        blended = band[:, :, :3] * alpha + ((255 - alpha) * ALPHA_BACKGROUND + 127)
        band = (blended // 255).astype(np.uint8)  # at most 65025 + 127: no overflow
    cv2.cvtColor(band, cv2.COLOR_BGR2RGB, dst=out)


@functools.lru_cache(maxsize=32)
def _blank(size: int, pad_rgb: tuple[int, int, int]) -> np.ndarray:
    """A size x size canvas of the pad colour, to copy the pad from."""
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = pad_rgb
    canvas.flags.writeable = False
    return canvas


def letterbox(image: np.ndarray, size: int, pad_rgb: tuple[int, int, int],
              placement: str = "top-left", shrink: str = "area", step: int = 1,
              original: tuple[int, int] | None = None, out: np.ndarray | None = None
              ) -> tuple[np.ndarray, Geometry]:
    """Resize keeping aspect so the long side is ``size``; pad the rest, the image
    at the top-left corner or centred. ``image`` may be a reduced decode: each of
    its pixels covers ``step`` x ``step`` pixels of the ``original`` (w, h) image.
    Written into ``out`` (size x size x 3) when given."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.empty((size, size, 3), np.uint8) if out is None else out
    x0, y0 = ((size - new_w) // 2, (size - new_h) // 2) if placement == "centre" else (0, 0)
    # The pad bands come from a filled canvas: numpy fills a 3-channel colour ~30x
    # slower (3 ms at 512 px) than it copies one.
    blank, x1, y1 = _blank(size, pad_rgb), x0 + new_w, y0 + new_h
    canvas[:y0], canvas[y1:] = blank[:y0], blank[y1:]
    canvas[y0:y1, :x0], canvas[y0:y1, x1:] = blank[y0:y1, :x0], blank[y0:y1, x1:]
    # Shrinking with INTER_AREA averages like effdet's (antialiased) PIL resize;
    # INTER_LINEAR would alias fine detail away (but is what some models trained on).
    interp = cv2.INTER_AREA if scale < 1 and shrink == "area" else cv2.INTER_LINEAR
    _resize_into(image, canvas[y0:y1, x0:x1], interp)
    # Boxes map back with the scale actually applied on each axis.
    ow, oh = original or (w * step, h * step)
    return canvas, Geometry(new_w / (w * step), new_h / (h * step), ow, oh, x0, y0)


def stretch(image: np.ndarray, size: int, step: int = 1,
            original: tuple[int, int] | None = None, out: np.ndarray | None = None
            ) -> tuple[np.ndarray, Geometry]:
    """Resize to size x size ignoring aspect, exactly as DAMO-YOLO's evaluation
    transform does (cv2 INTER_LINEAR): its golden outputs depend on it."""
    h, w = image.shape[:2]
    resized = np.empty((size, size, 3), np.uint8) if out is None else out
    _resize_into(image, resized, cv2.INTER_LINEAR)
    ow, oh = original or (w * step, h * step)
    return resized, Geometry(size / (w * step), size / (h * step), ow, oh)


def _resize_into(image: np.ndarray, dst: np.ndarray, interpolation: int) -> None:
    """cv2.resize straight into ``dst`` (a view: no intermediate image)."""
    written = cv2.resize(image, (dst.shape[1], dst.shape[0]), dst=dst,
                         interpolation=interpolation)
    if written is not dst and not np.shares_memory(written, dst):
        dst[:] = written  # OpenCV allocated its own: copy it in


def prepare(image: np.ndarray, size: int, prep: Preprocessing, step: int = 1,
            original: tuple[int, int] | None = None, out: np.ndarray | None = None
            ) -> tuple[np.ndarray, Geometry]:
    """The model's uint8 input and how to map its boxes back. ``step`` and
    ``original`` describe a reduced decode (see ``tierdet.serving.decoding``);
    ``out``, where to write the input."""
    if prep.resize == "stretch":
        return stretch(image, size, step, original, out)
    return letterbox(image, size, prep.pad_rgb, prep.placement, prep.shrink, step, original,
                     out)


def covers(width: int, height: int, size: int, prep: Preprocessing) -> bool:
    """Whether a width x height image fills a model input of ``size`` without being
    enlarged: its long side for a letterbox, both sides for a stretch."""
    return (min(width, height) if prep.resize == "stretch" else max(width, height)) >= size


def boxes_to_image(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Model-input xyxy boxes [N, 4] -> original-image pixels, clipped."""
    out = boxes.astype(np.float64, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] - geometry.offset_x) / geometry.scale_x
    out[:, [1, 3]] = (out[:, [1, 3]] - geometry.offset_y) / geometry.scale_y
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, geometry.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, geometry.height)
    return out
