"""Tiled inference (``tile=auto``): the grid the budget allows, boxes merged
across views, and on the real stack small objects of a large image found that
the whole view loses, each once, at its place (tierdet's shapes model, whose
boxes are known from the scene generator)."""

from __future__ import annotations

import itertools

import cv2
import httpx
import numpy as np
from tierdet.contract.results import Detection
from tierdet.serving import tiling
from tierdet.training.datasets.synthetic import SynthConfig, render

SHAPES_MODEL = "shapes-ns"  # 256 px input, the fine-tuned card of conftest.CARDS
CELL = 256


def test_no_tiles_for_an_image_not_much_larger_than_the_input():
    assert tiling.plan(500, 400, 256, 7) == []  # under twice the input
    assert tiling.plan(4000, 3000, 512, 1) == []  # the budget leaves room for one


def test_the_finest_grid_that_fits_the_batch_covers_the_image_with_overlap():
    tiles = tiling.plan(4000, 3000, 512, 7)
    assert 2 <= len(tiles) <= 7
    side = tiles[0].width
    assert side >= 512 and all(t.width <= side and t.height <= side for t in tiles)
    covered = np.zeros((3000, 4000), bool)
    for t in tiles:
        covered[t.y:t.y + t.height, t.x:t.x + t.width] = True
    assert covered.all()
    xs = sorted({t.x for t in tiles})
    assert all(b - a <= side * (1 - tiling.OVERLAP) + 1 for a, b in itertools.pairwise(xs))
    # More room, finer tiles (smaller sides, so less shrink).
    assert tiling.plan(4000, 3000, 512, 30)[0].width < side


def test_an_object_seen_by_two_tiles_and_the_whole_view_comes_back_once():
    person = Detection(100.0, 100.0, 140.0, 180.0, 0.9, 1, "person")
    again = Detection(101.0, 99.5, 139.0, 181.0, 0.8, 1, "person")
    dog = Detection(102.0, 101.0, 138.0, 179.0, 0.7, 18, "dog")  # another class stays
    far = Detection(500.0, 500.0, 540.0, 580.0, 0.6, 1, "person")
    assert tiling.merge([again, dog, person, far], limit=10) == (person, dog, far)
    assert tiling.merge([again, person, far], limit=1) == (person,)


def test_a_tiles_box_moves_to_the_tiles_place_in_the_image():
    box = Detection(10.0, 20.0, 30.0, 40.0, 0.5, 1, "person")
    assert tiling.shifted(box, 600, 300, 1000, 1000) == Detection(
        610.0, 320.0, 630.0, 340.0, 0.5, 1, "person")
    assert tiling.shifted(box, 990, 0, 1000, 1000).x2 == 1000  # clipped to the image


def mosaic(columns: int, rows: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Generated shape scenes side by side: a large image of small objects, and
    every object's class and box (xyxy) in it."""
    canvas = np.full((rows * CELL, columns * CELL, 3), 128, np.uint8)
    truth = []
    config = SynthConfig(size=CELL)
    for index in range(columns * rows):
        image, annotations = render(config, 7, "val", index)
        y, x = divmod(index, columns)
        h, w = image.shape[:2]
        canvas[y * CELL:y * CELL + h, x * CELL:x * CELL + w] = image
        for a in annotations:
            bx, by, bw, bh = a.bbox
            truth.append((a.category_id, np.array([x * CELL + bx, y * CELL + by,
                                                   x * CELL + bx + bw, y * CELL + by + bh])))
    return canvas, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) -
                                                             max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def matches(answer: dict, truth: list) -> list[int]:
    """For each true object, how many boxes of its class overlap it (IoU >= 0.5)."""
    boxes = [(d["class_id"], np.array([d["x1"], d["y1"], d["x2"], d["y2"]]))
             for d in answer["detections"]]
    return [sum(c == cls and iou(box, b) >= 0.5 for c, b in boxes) for cls, box in truth]


def test_a_large_image_in_tiles_finds_its_small_objects_once(card_stack):
    image, truth = mosaic(6, 4)  # 1536 x 1024: the whole view shrinks it 6x
    jpeg = cv2.imencode(".png", image[..., ::-1])[1].tobytes()

    def detect(tile: str) -> dict:
        r = httpx.post(card_stack.http + "/v1/detect", timeout=120,
                       files={"image": ("m.png", jpeg, "image/png")},
                       data={"model": SHAPES_MODEL, "sla_ms": "60000", "tile": tile,
                             "score_threshold": "0.3", "max_detections": "300"})
        assert r.status_code == 200, r.text
        return r.json()

    whole, tiled = detect("off"), detect("auto")
    assert whole["routing"]["tiles"] == 0
    assert 2 <= tiled["routing"]["tiles"] <= 7
    found_whole, found_tiled = matches(whole, truth), matches(tiled, truth)
    # Tiles find what the whole view lost, and nothing comes back twice.
    assert sum(n > 0 for n in found_tiled) >= 2 * max(1, sum(n > 0 for n in found_whole))
    assert max(found_tiled) == 1
    # Objects in the overlap of two tiles were seen by both: still one box each.
    tiles = tiling.plan(image.shape[1], image.shape[0], CELL, tiled["routing"]["tiles"])
    inside = [sum(t.x <= box[0] and box[2] <= t.x + t.width and t.y <= box[1] and
                  box[3] <= t.y + t.height for t in tiles) for _, box in truth]
    shared = [n for n, views in zip(found_tiled, inside, strict=True) if views >= 2]
    assert shared and all(n <= 1 for n in shared) and sum(shared) >= 1


def test_a_box_cut_off_by_a_tiles_inner_edge_is_left_to_the_view_that_holds_it_whole():
    tile = tiling.Tile(600, 0, 600, 600)  # the image is 2000 x 600: left and right are inner
    cut = Detection(600.5, 100.0, 650.0, 200.0, 0.9, 1, "person")
    whole = Detection(700.0, 100.0, 900.0, 200.0, 0.9, 1, "person")
    at_the_image_top = Detection(700.0, 0.0, 900.0, 200.0, 0.9, 1, "person")
    assert tiling.cut_off(cut, tile, 1, 2000, 600)
    assert not tiling.cut_off(whole, tile, 1, 2000, 600)
    assert not tiling.cut_off(at_the_image_top, tile, 1, 2000, 600)  # the image's own edge
