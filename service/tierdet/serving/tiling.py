"""Tiled inference for images much larger than the model's input (slicing in
the spirit of SAHI).

Letterboxing a 4000x3000 photograph into a 512 px input shrinks it 7.8x:
whatever was under ~10 px is gone. With ``tile=auto`` such an image is also
cut into overlapping tiles, each resized into the model's input (shrunk far
less), and sent in the same Triton batch as the whole view (which keeps the
large objects whole); the boxes of every view are mapped back to the image,
a tile's boxes cut off by its inner edges are dropped (a neighbour or the
whole view holds those objects whole), and the rest are merged by
class-aware NMS across views.

How many tiles is the budget's call (``plan``): the finest grid whose tiles
fit in one batch and whose extra device time fits what the budget leaves;
none when the image is not at least MIN_ZOOM times the input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tierdet.contract.results import Detection
from tierdet.registry.labels import LabelSet
from tierdet.serving import imaging, postprocess
from tierdet.serving.decoding import Decoded

OVERLAP = 0.2  # of a tile's side, shared with its neighbour
MIN_ZOOM = 2.0  # tile only images whose long side is at least this many inputs
GROWTH = 1.25  # a coarser grid's tile side, from the finer one's
MERGE_IOU = 0.5
EDGE_PX = 2.0  # a tile's box this close to an inner edge is cut off by it


@dataclass(frozen=True)
class Tile:
    """A square-ish window of the decoded image, in decoded pixels."""

    x: int
    y: int
    width: int
    height: int


def _starts(length: int, side: int) -> list[int]:
    if length <= side:
        return [0]
    n = math.ceil((length - side) / (side * (1 - OVERLAP))) + 1
    return [round(i * (length - side) / (n - 1)) for i in range(n)]


def grid(width: int, height: int, side: int) -> list[Tile]:
    """Tiles of ``side`` covering the image, neighbours overlapping by at least
    OVERLAP of a side (spread evenly, the last ones flush with the edges)."""
    return [Tile(x, y, min(side, width), min(side, height))
            for y in _starts(height, side) for x in _starts(width, side)]


def plan(width: int, height: int, input_size: int, max_tiles: int) -> list[Tile]:
    """The finest grid of at most ``max_tiles`` tiles (their side from the
    model's input up), or none: the image is too small to gain from tiles, or
    the budget leaves room for fewer than two."""
    if max_tiles < 2 or max(width, height) < MIN_ZOOM * input_size:
        return []
    side = input_size
    while True:
        tiles = grid(width, height, side)
        if len(tiles) <= 1:
            return []
        if len(tiles) <= max_tiles:
            return tiles
        side = math.ceil(side * GROWTH)


def cut_off(detection: Detection, tile: Tile, step: int, width: int, height: int,
            margin: float = EDGE_PX) -> bool:
    """Whether a tile's box (image pixels) touches an edge the tile shares with the
    rest of the image: the object goes on beyond the tile, and the neighbour that
    holds it whole (or the whole view) gives its box; this part would come back
    beside it as a second, smaller object."""
    left, top = tile.x * step, tile.y * step
    right = min(width, (tile.x + tile.width) * step)
    bottom = min(height, (tile.y + tile.height) * step)
    return ((left > 0 and detection.x1 <= left + margin)
            or (top > 0 and detection.y1 <= top + margin)
            or (right < width and detection.x2 >= right - margin)
            or (bottom < height and detection.y2 >= bottom - margin))


def shifted(detection: Detection, dx: float, dy: float, width: int, height: int) -> Detection:
    """A tile's box in the whole image's pixels."""
    return Detection(min(detection.x1 + dx, width), min(detection.y1 + dy, height),
                     min(detection.x2 + dx, width), min(detection.y2 + dy, height),
                     detection.score, detection.class_id, detection.class_name)


def merge(detections: list[Detection], limit: int, iou: float = MERGE_IOU
          ) -> tuple[Detection, ...]:
    """Class-aware greedy NMS over the boxes of every view, best first, at most
    ``limit``: an object seen by two overlapping tiles (and the whole view)
    comes back once, with its best box."""
    if not detections:
        return ()
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    boxes = np.array([[d.x1, d.y1, d.x2, d.y2] for d in detections], dtype=np.float64)
    classes = np.array([d.class_id for d in detections])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    suppressed = np.zeros(len(detections), dtype=bool)
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        if len(kept) == limit:
            break
        x1 = np.maximum(boxes[i, 0], boxes[:, 0])
        y1 = np.maximum(boxes[i, 1], boxes[:, 1])
        x2 = np.minimum(boxes[i, 2], boxes[:, 2])
        y2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        overlap = inter / np.maximum(area[i] + area - inter, 1e-9)
        suppressed |= (overlap > iou) & (classes == classes[i])
    return tuple(detections[i] for i in kept)


def detections_from_views(rows: np.ndarray, labels: LabelSet,
                          geometries: Sequence[imaging.Geometry], tiles: Sequence[Tile],
                          step: int, score_threshold: float, limit: int, per_view: int,
                          keep: frozenset[int] | None = None) -> tuple[Detection, ...]:
    """The detections of one tiled image: ``rows[0]`` and ``geometries[0]`` are
    the whole view's, the rest each tile's in order; ``step`` is the decode's
    scale (tiles are in decoded pixels, boxes in the image's).

    Every view keeps up to ``per_view`` boxes (the model's own limit) and the
    caller's ``limit`` applies only after the merge: the duplicates it removes
    must not have taken the places of distinct objects."""
    whole = geometries[0]
    found = list(postprocess.detections_from_rows(rows[0], labels, whole, score_threshold,
                                                  per_view, keep))
    for tile, geometry, tile_rows in zip(tiles, geometries[1:], rows[1:], strict=True):
        moved = (shifted(d, tile.x * step, tile.y * step, whole.width, whole.height)
                 for d in postprocess.detections_from_rows(tile_rows, labels, geometry,
                                                           score_threshold, per_view, keep))
        found += [d for d in moved if not cut_off(d, tile, step, whole.width, whole.height)]
    return merge(found, limit)


def prepare_views(image: Decoded, size: int, prep: imaging.Preprocessing, tiles: list[Tile],
                  out: np.ndarray) -> tuple[list[imaging.Geometry], float]:
    """The whole view into ``out[0]``, each tile into the next (``tiles`` in
    decoded pixels; their geometry maps boxes back to the tile's corner)."""
    t0 = time.perf_counter()
    _, whole = imaging.prepare(image.pixels, size, prep, image.step,
                               (image.width, image.height), out[0])
    geometries = [whole]
    for tile, view in zip(tiles, out[1:], strict=True):
        crop = image.pixels[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width]
        original = (min(tile.width * image.step, image.width - tile.x * image.step),
                    min(tile.height * image.step, image.height - tile.y * image.step))
        geometries.append(imaging.prepare(crop, size, prep, image.step, original,
                                          view)[1])
    return geometries, time.perf_counter() - t0
