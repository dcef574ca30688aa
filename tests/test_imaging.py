"""Geometry: a box drawn at a known place comes back at that place."""

import dataclasses

import cv2
import numpy as np
import pytest
from tierdet.registry.specs import get_spec
from tierdet.serving.decoding import decode, reduction
from tierdet.serving.imaging import boxes_to_image, covers, letterbox, prepare, stretch


def _edges(coverage: np.ndarray) -> tuple[float, float]:
    """Sub-pixel extent of a white bar from its per-pixel coverage (0..1)."""
    (hit,) = np.nonzero(coverage > 0.02)
    first, last = hit.min(), hit.max()
    return first + 1 - coverage[first], last + coverage[last]


def _found_box(canvas: np.ndarray) -> np.ndarray:
    white = canvas[..., 0].astype(np.float64) / 255.0
    x1, x2 = _edges(white.max(axis=0))
    y1, y2 = _edges(white.max(axis=1))
    return np.array([[x1, y1, x2, y2]])


@pytest.mark.parametrize("width,height", [(640, 480), (480, 640), (1920, 300), (300, 1920),
                                          (512, 512), (97, 211)])
@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_box_round_trip(width, height, mode):
    image = np.zeros((height, width, 3), np.uint8)
    box = np.array([width * 0.3, height * 0.4, width * 0.7, height * 0.9]).round().astype(int)
    image[box[1]:box[3], box[0]:box[2]] = 255
    if mode == "letterbox":
        canvas, geometry = letterbox(image, 512, (0, 0, 0))
        tolerance = 1.0
    else:
        canvas, geometry = stretch(image, 512)
        # DAMO-YOLO's INTER_LINEAR does not average when shrinking, so an
        # edge may land anywhere within one input pixel.
        tolerance = max(1.0, 1.0 / min(geometry.scale_x, geometry.scale_y))
    assert canvas.shape == (512, 512, 3)
    back = boxes_to_image(_found_box(canvas), geometry)[0]
    assert np.abs(back - box).max() <= tolerance, (back, box)


def test_letterbox_pads_bottom_right_with_the_fill():
    canvas, geometry = letterbox(np.zeros((100, 200, 3), np.uint8), 512, (1, 2, 3))
    assert geometry.scale_x == geometry.scale_y == 512 / 200
    assert (canvas[300:, :] == (1, 2, 3)).all()
    assert (canvas[:256, :] == 0).all()


def test_boxes_are_clipped_to_the_image():
    _, geometry = letterbox(np.zeros((100, 200, 3), np.uint8), 512, (0, 0, 0))
    out = boxes_to_image(np.array([[-10.0, -10.0, 600.0, 600.0]]), geometry)
    assert out.tolist() == [[0.0, 0.0, 200.0, 100.0]]


def _extent_by_mass(coverage: np.ndarray) -> tuple[float, float]:
    """A bar's extent from its mass and centroid: exact through any averaging
    resize (two in a row blur an edge over more than one pixel)."""
    mass = coverage.sum()
    centre = (coverage * (np.arange(len(coverage)) + 0.5)).sum() / mass
    return centre - mass / 2, centre + mass / 2


def _found_box_by_mass(canvas: np.ndarray) -> np.ndarray:
    white = canvas[..., 0].astype(np.float64) / 255.0
    row, col = np.unravel_index(np.argmax(white), white.shape)
    x1, x2 = _extent_by_mass(white[row])
    y1, y2 = _extent_by_mass(white[:, col])
    return np.array([[x1, y1, x2, y2]])


def _jpeg(image: np.ndarray) -> bytes:
    """Nearly lossless JPEG (quality 100, no chroma subsampling): edges stay edges."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100,
                                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                           cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("step", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
@pytest.mark.parametrize("width,height", [(2001, 1201), (1201, 2001)])
def test_box_round_trip_through_a_reduced_decode(step, mode, width, height):
    """A JPEG decoded at 1/step of its size (sizes that do not divide: libjpeg
    rounds up) still maps boxes back to the full image's pixels: within 1 px
    for a letterbox (measured: under 0.1 px), within one model pixel for a
    stretch (INTER_LINEAR samples, it does not average)."""
    image = np.zeros((height, width, 3), np.uint8)
    box = np.array([width * 0.3, height * 0.4, width * 0.7, height * 0.9]).round().astype(int)
    image[box[1]:box[3], box[0]:box[2]] = 255
    need = -(-max(width, height) // step)  # exactly what a 1/step decode gives
    decoded = decode(_jpeg(image), 1 << 30, 1 << 30, lambda w, h: max(w, h) >= need)
    assert decoded.step == step and (decoded.width, decoded.height) == (width, height)
    assert decoded.pixels.shape[:2] == (-(-height // step), -(-width // step))
    spec = get_spec("damoyolo-ns" if mode == "stretch" else "efficientdet-d0")
    prep = dataclasses.replace(spec.preprocessing, pad_rgb=(0, 0, 0))  # the pad is no box
    canvas, geometry = prepare(decoded.pixels, 128, prep, decoded.step,
                               (decoded.width, decoded.height))
    tolerance = 1.0 if mode == "letterbox" else 1.0 / min(geometry.scale_x, geometry.scale_y)
    back = boxes_to_image(_found_box_by_mass(canvas), geometry)[0]
    assert np.abs(back - box).max() <= tolerance, (back, box)


@pytest.mark.parametrize("width,height,size,resize,step", [
    (1280, 720, 512, "letterbox", 2),    # 640 still covers 512; 320 would not
    (1920, 1080, 512, "letterbox", 2),
    (1920, 1080, 416, "letterbox", 4),   # 480 >= 416
    (4000, 3000, 416, "letterbox", 8),
    (1920, 1080, 640, "stretch", 1),     # both sides must cover: 540 < 640
    (4000, 3000, 640, "stretch", 4),     # 1000 x 750
    (400, 300, 512, "letterbox", 1),     # smaller than the input: every pixel
])
def test_the_reduction_is_the_largest_that_still_covers_the_input(width, height, size,
                                                                   resize, step):
    prep = get_spec("damoyolo-ns" if resize == "stretch" else "efficientdet-d0").preprocessing
    assert reduction(width, height, lambda w, h: covers(w, h, size, prep)) == step
