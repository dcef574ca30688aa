"""Geometry: a box drawn at a known place comes back at that place."""

import numpy as np
import pytest
from tierdet.serving.imaging import boxes_to_image, letterbox, stretch


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
