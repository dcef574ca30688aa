"""A deterministic synthetic detection data set: coloured shapes on cluttered backgrounds.

Why: weights cannot be downloaded on the build machines, yet the service
needs *trained* models to prove that the serving path keeps accuracy. Shapes
are learnable in CPU minutes, and every box is exact (computed from the
shape's own vertices, not from pixels), so AP measures the model and the
serving path rather than label noise.

What varies per object: class, size, aspect, rotation, colour, outline,
position and overlap (an object may hide at most ``max_occlusion`` of any
earlier one). Per image: orientation and aspect of the canvas, a colour
gradient, low-frequency blotches, a texture (stripes, dots or grid),
distractor lines (some drawn over the objects) and sensor noise.

Determinism: image ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, s, i])`` alone, so the same seed gives
byte-identical files, and a smaller split is a prefix of a larger one.

Layout written by :func:`generate` (COCO format)::

    DIR/dataset.json                          how it was made
    DIR/annotations/instances_{train,val}.json
    DIR/{train,val}/000000.jpg ...

Boxes follow COCO's convention: continuous pixel coordinates, pixel ``i``
spans ``[i, i + 1)``; ``bbox`` is ``[x, y, w, h]`` of the whole shape (amodal),
``area`` the shape's exact area (holes removed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from tierdet.registry.labels import SHAPE_NAMES, SHAPES

# Bump when the drawing changes: the same seed then gives different images.
GENERATOR_VERSION = 2
SPLITS: dict[str, int] = {"train": 0, "val": 1}
_SUBPIXEL_BITS = 4  # cv2 fixed-point vertices: 1/16 px
_SUPERSAMPLE = 4
_CIRCLE_POINTS = 96

Polygon = np.ndarray  # [K, 2] float64 (x, y)


@dataclass(frozen=True)
class SynthConfig:
    size: int = 256  # long side of every image, pixels
    min_aspect: float = 0.75  # short side / long side, drawn in [min_aspect, 1]
    min_objects: int = 1
    max_objects: int = 6
    # Object extent (the longer side of its box) as a fraction of ``size``.
    min_object_frac: float = 0.1
    max_object_frac: float = 0.45
    max_occlusion: float = 0.4  # most of an earlier object a later one may hide
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        if not 0 < self.min_aspect <= 1:
            raise ValueError("min_aspect must be in (0, 1]")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 0 < self.min_object_frac <= self.max_object_frac < 1:
            raise ValueError("need 0 < min_object_frac <= max_object_frac < 1")
        if self.size < 32:
            raise ValueError("size must be at least 32")


@dataclass(frozen=True)
class Annotation:
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h (COCO)
    area: float


# -- shapes in unit coordinates (centred, extent about 2) ---------------------


def _ellipse(rng: np.random.Generator) -> Polygon:
    b = rng.uniform(0.75, 1.0)  # a circle seen slightly off-axis
    t = np.linspace(0, 2 * np.pi, _CIRCLE_POINTS, endpoint=False)
    return np.stack([np.cos(t), b * np.sin(t)], 1)


def _circle(rng: np.random.Generator) -> list[Polygon]:
    return [_ellipse(rng)]


def _square(rng: np.random.Generator) -> list[Polygon]:
    b = rng.uniform(0.6, 1.0)  # up to a 1:1.67 rectangle
    return [np.array([[-1, -b], [1, -b], [1, b], [-1, b]], np.float64)]


def _triangle(rng: np.random.Generator) -> list[Polygon]:
    angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
    radii = rng.uniform(0.8, 1.0, 3)
    return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)]


def _star(rng: np.random.Generator) -> list[Polygon]:
    inner = rng.uniform(0.38, 0.5)
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return [np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)]


def _ring(rng: np.random.Generator) -> list[Polygon]:
    outer = _ellipse(rng)
    # A hole of at least 45% keeps it a ring; at most 70% keeps it visible
    # at the smallest sizes.
    return [outer, outer * rng.uniform(0.45, 0.7)]


def _cross(rng: np.random.Generator) -> list[Polygon]:
    w = rng.uniform(0.22, 0.34)  # half-width of an arm
    return [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1],
                      [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]], np.float64)]


_SHAPE_MAKERS: dict[str, Callable[[np.random.Generator], list[Polygon]]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star,
    "ring": _ring, "cross": _cross,
}


def _polygon_area(poly: Polygon) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_area(polys: Sequence[Polygon]) -> float:
    # The first polygon is the outline, any further ones are holes.
    return _polygon_area(polys[0]) - sum(_polygon_area(p) for p in polys[1:])


def _pose(polys: list[Polygon], rng: np.random.Generator, extent: float
          ) -> list[Polygon]:
    """Rotate, then scale so the box's longer side is ``extent`` (pixels)."""
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    polys = [p @ rot.T for p in polys]
    lo, hi = polys[0].min(0), polys[0].max(0)
    scale = extent / float((hi - lo).max())
    return [(p - (lo + hi) / 2) * scale for p in polys]


# -- drawing ------------------------------------------------------------------


def _fill(mask: np.ndarray, polys: Sequence[Polygon], offset: np.ndarray) -> None:
    """Coverage of ``polys`` (continuous coords) as alpha 0..255 into ``mask``.

    Drawn at 4x without anti-aliasing, then area-averaged: cv2's own LINE_AA
    fill spreads every edge by about half a pixel, which would leave boxes
    computed from the vertices short of what is drawn. Continuous
    coordinates put pixel i on [i, i + 1); cv2 puts integer coordinates on
    pixel centres, hence the -0.5. A second polygon is a hole (cv2 fills by
    parity).
    """
    h, w = mask.shape
    big = np.zeros((h * _SUPERSAMPLE, w * _SUPERSAMPLE), np.uint8)
    pts = [np.round(((p - offset) * _SUPERSAMPLE - 0.5) * (1 << _SUBPIXEL_BITS))
           .astype(np.int32) for p in polys]
    cv2.fillPoly(big, pts, (255,), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    mask[:] = cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + blotches + a texture + distractor lines, float32 RGB."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(theta) + ys * math.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    image = c0 + (c1 - c0) * t[..., None]
    cells = int(rng.integers(3, 9))
    blotches = rng.normal(0, 35, (cells, cells, 3)).astype(np.float32)
    image += cv2.resize(blotches, (w, h), interpolation=cv2.INTER_CUBIC)
    texture = rng.choice(["none", "stripes", "dots", "grid"])
    if texture == "stripes":
        phi = rng.uniform(0, np.pi)
        period = rng.uniform(4, 24)
        wave = np.sin(2 * np.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period)
        image += (rng.uniform(8, 25) * wave)[..., None]
    elif texture == "grid":
        step = int(rng.integers(8, 32))
        colour = rng.uniform(0, 255, 3)
        image[::step, :] = 0.5 * image[::step, :] + 0.5 * colour
        image[:, ::step] = 0.5 * image[:, ::step] + 0.5 * colour
    elif texture == "dots":
        for _ in range(int(rng.integers(20, 120))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(image, centre, int(rng.integers(1, 4)), rng.uniform(0, 255, 3).tolist(),
                       -1, cv2.LINE_AA)
    _lines(image, rng, int(rng.integers(0, 8)))
    return image


def _lines(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    h, w = image.shape[:2]
    for _ in range(count):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(image, p0, p1, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 3)),
                 cv2.LINE_AA)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least 100 (L1, 0..765) away from the mean colour it covers."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - under).sum() >= 100:
            return colour
    # Never reached in practice (each draw misses with p < 0.1): the far
    # corner of the RGB cube is at least 381 away.
    return np.where(under < 128, 255.0, 0.0)


@dataclass
class _Canvas:
    image: np.ndarray  # float32 RGB
    owner: np.ndarray  # int16: index of the object on top, -1 background
    full_pixels: list[int]  # pixels of each object when it was drawn


def _try_place(canvas: _Canvas, rng: np.random.Generator, polys: list[Polygon],
               config: SynthConfig) -> np.ndarray | None:
    """A centre for ``polys`` (drawn around 0) that keeps the shape inside the
    image and every earlier object visible enough; None after 20 tries."""
    h, w = canvas.owner.shape
    lo, hi = polys[0].min(0), polys[0].max(0)
    if (hi - lo)[0] > w - 2 or (hi - lo)[1] > h - 2:
        return None
    for _ in range(20):
        centre = np.array([rng.uniform(1 - lo[0], w - 1 - hi[0]),
                           rng.uniform(1 - lo[1], h - 1 - hi[1])])
        x0, y0 = np.floor(lo + centre).astype(int) - 1
        x1, y1 = np.ceil(hi + centre).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        _fill(mask, [p + centre for p in polys], np.array([x0, y0], np.float64))
        covered = mask >= 128
        below = canvas.owner[y0:y1, x0:x1][covered]
        hidden = np.bincount(below[below >= 0], minlength=len(canvas.full_pixels))
        visible = np.asarray(canvas.full_pixels) - hidden
        if np.all(visible >= (1 - config.max_occlusion) * np.asarray(canvas.full_pixels)):
            return centre
    return None


def _draw(canvas: _Canvas, rng: np.random.Generator, polys: list[Polygon]) -> None:
    h, w = canvas.owner.shape
    mask = np.zeros((h, w), np.uint8)
    _fill(mask, polys, np.zeros(2))
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    covered = mask >= 128
    colour = _contrasting_colour(rng, canvas.image[covered].mean(0))
    # A soft shading across the object, so fills are not flat.
    shade = 1.0 + rng.uniform(-0.2, 0.2) * (np.mgrid[0:h, 0:w][1] / w - 0.5)
    fill = np.clip(colour * shade[..., None], 0, 255).astype(np.float32)
    canvas.image[:] = canvas.image * (1 - alpha) + fill * alpha
    if rng.random() < 0.4:  # an outline in a darker tone, clipped to the shape
        stroke = np.zeros((h, w), np.uint8)
        pts = [np.round((p - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32) for p in polys]
        cv2.polylines(stroke, pts, True, (255,), int(rng.integers(2, 4)), cv2.LINE_AA,
                      _SUBPIXEL_BITS)
        a = (stroke.astype(np.float32) / 255.0)[..., None] * alpha
        canvas.image[:] = canvas.image * (1 - a) + (colour * 0.4).astype(np.float32) * a
    canvas.owner[covered] = len(canvas.full_pixels)
    canvas.full_pixels.append(int(covered.sum()))


def render(config: SynthConfig, seed: int, split: str, index: int
           ) -> tuple[np.ndarray, list[Annotation]]:
    """Image ``index`` of ``split``: RGB uint8 [H, W, 3] and its annotations."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    short = round(config.size * rng.uniform(config.min_aspect, 1.0))
    h, w = (config.size, short) if rng.random() < 0.5 else (short, config.size)
    canvas = _Canvas(_background(rng, h, w), np.full((h, w), -1, np.int16), [])
    annotations: list[Annotation] = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        slot = int(rng.integers(0, len(SHAPE_NAMES)))
        extent = config.size * rng.uniform(config.min_object_frac, config.max_object_frac)
        polys = _pose(_SHAPE_MAKERS[SHAPE_NAMES[slot]](rng), rng, extent)
        centre = _try_place(canvas, rng, polys, config)
        if centre is None:
            continue
        polys = [p + centre for p in polys]
        _draw(canvas, rng, polys)
        lo, hi = polys[0].min(0), polys[0].max(0)
        category = SHAPES.category_ids[slot]
        assert category is not None  # every shapes slot names a class
        annotations.append(Annotation(
            category,
            (round(float(lo[0]), 2), round(float(lo[1]), 2),
             round(float(hi[0] - lo[0]), 2), round(float(hi[1] - lo[1]), 2)),
            round(_shape_area(polys), 2)))
    _lines(canvas.image, rng, int(rng.integers(0, 3)))  # clutter over the objects too
    noise = rng.normal(0, rng.uniform(2, 10), canvas.image.shape).astype(np.float32)
    return np.clip(canvas.image + noise, 0, 255).round().astype(np.uint8), annotations


# -- writing ------------------------------------------------------------------


def annotations_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _encode(image: np.ndarray, config: SynthConfig) -> bytes:
    params = ([cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality] if config.image_format == "jpg"
              else [cv2.IMWRITE_PNG_COMPRESSION, 6])
    ok, buf = cv2.imencode("." + config.image_format, image[..., ::-1], params)
    if not ok:
        raise RuntimeError("image encoding failed")
    return buf.tobytes()


def categories() -> list[dict[str, object]]:
    return [{"id": cid, "name": SHAPES.category_names[cid], "supercategory": "shape"}
            for cid in SHAPES.category_ids if cid is not None]


def write_split(root: Path, split: str, count: int, config: SynthConfig, seed: int) -> Path:
    """Render ``count`` images of ``split`` under ``root``; returns its annotation file."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    anns: list[dict] = []
    for index in range(count):
        image, objects = render(config, seed, split, index)
        name = f"{index:06d}.{config.image_format}"
        (folder / name).write_bytes(_encode(image, config))
        images.append({"id": index + 1, "file_name": name, "width": image.shape[1],
                       "height": image.shape[0]})
        for obj in objects:
            anns.append({"id": len(anns) + 1, "image_id": index + 1,
                         "category_id": obj.category_id, "bbox": list(obj.bbox),
                         "area": obj.area, "iscrowd": 0})
    coco = {"info": {"description": f"tierdet synthetic shapes, {split}, seed {seed}",
                     "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": anns, "categories": categories()}
    path = annotations_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed key order and separators: the same seed gives the same bytes.
    path.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return path


def generate(root: Path, counts: dict[str, int], config: SynthConfig, seed: int) -> Path:
    """Write every split in ``counts`` (e.g. {"train": 2000, "val": 200}) to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        write_split(root, split, count, config, seed)
    manifest = {"generator": "tierdet.training.datasets.synthetic", "version": GENERATOR_VERSION,
                "label_set": SHAPES.name, "seed": seed, "splits": counts,
                "config": asdict(config)}
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root
