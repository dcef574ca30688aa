"""The synthetic shapes data set: deterministic, valid COCO, exact boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tierdet.cli import main
from tierdet.training.datasets import synthetic
from tierdet.training.datasets.coco import CocoSplit, read_rgb
from tierdet.training.datasets.synthetic import (
    SHAPE_NAMES,
    SHAPES,
    SynthConfig,
    annotations_path,
    generate,
    render,
)

SMALL = SynthConfig(size=96)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    a = _files(generate(tmp_path / "a", {"train": 6, "val": 3}, SMALL, seed=7))
    b = _files(generate(tmp_path / "b", {"train": 6, "val": 3}, SMALL, seed=7))
    assert len(a) == 6 + 3 + 3  # images, two annotation files, the manifest
    assert a == b


def test_other_seed_other_images_and_splits_differ(tmp_path: Path):
    a = _files(generate(tmp_path / "a", {"train": 3, "val": 3}, SMALL, seed=1))
    b = _files(generate(tmp_path / "b", {"train": 3, "val": 3}, SMALL, seed=2))
    assert a["train/000000.jpg"] != b["train/000000.jpg"]
    assert a["train/000000.jpg"] != a["val/000000.jpg"]  # val is not a copy of train


def test_a_smaller_split_is_a_prefix_of_a_larger_one(tmp_path: Path):
    small = _files(generate(tmp_path / "s", {"train": 2}, SMALL, seed=3))
    large = _files(generate(tmp_path / "l", {"train": 5}, SMALL, seed=3))
    assert small["train/000001.jpg"] == large["train/000001.jpg"]


def test_annotations_are_valid_coco(tmp_path: Path):
    from pycocotools.coco import COCO

    root = generate(tmp_path, {"train": 20}, SMALL, seed=0)
    coco = json.loads(annotations_path(root, "train").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SHAPE_NAMES) + 1))
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    assert max(max(s) for s in sizes.values()) == SMALL.size
    assert len(coco["annotations"]) >= 20
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert min(x, y) >= 0 and x + w <= width and y + h <= height
        assert w >= 0.05 * SMALL.size and h >= 0.05 * SMALL.size
        assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert {a["category_id"] for a in coco["annotations"]} <= set(SHAPES.category_ids)
    truth = COCO(str(annotations_path(root, "train")))
    assert len(truth.getImgIds()) == 20


def test_every_class_appears_with_varied_sizes():
    objects = [a for i in range(40) for a in render(SynthConfig(), 0, "train", i)[1]]
    assert {a.category_id for a in objects} == set(SHAPES.category_ids)
    extents = [max(a.bbox[2], a.bbox[3]) for a in objects]
    assert min(extents) < 0.15 * 256 and max(extents) > 0.35 * 256


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_boxes_are_tight_around_what_is_drawn(shape: str):
    # The box comes from the vertices; the pixels the shape touches must
    # span the same extent to within a pixel on every side (cv2's own
    # anti-aliased fill overshoots by more).
    rng = np.random.default_rng(0)
    for _ in range(5):
        polys = synthetic._pose(synthetic._SHAPE_MAKERS[shape](rng), rng, rng.uniform(12, 60))
        polys = [p + rng.uniform(31, 33, 2) for p in polys]  # off the pixel grid
        mask = np.zeros((64, 64), np.uint8)
        synthetic._fill(mask, polys, np.zeros(2))
        ys, xs = np.nonzero(mask)
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        lo, hi = polys[0].min(0), polys[0].max(0)
        np.testing.assert_allclose(drawn, [*lo, *hi], atol=1.0)


def test_label_set_maps_slots_to_category_ids():
    assert SHAPES.num_classes == len(SHAPE_NAMES)
    assert SHAPES.lookup(0) == (1, "circle")
    assert SHAPES.lookup(len(SHAPE_NAMES) - 1) == (len(SHAPE_NAMES), SHAPE_NAMES[-1])
    assert SHAPES.lookup(len(SHAPE_NAMES)) is None


def test_split_reader_gives_boxes_in_xyxy_and_slots(tmp_path: Path):
    root = generate(tmp_path, {"val": 3}, SMALL, seed=0)
    split = CocoSplit(root, "val")
    samples = split.samples(SHAPES)
    ann = split.coco["annotations"][0]
    first = next(s for s in samples if s.image_id == ann["image_id"])
    x, y, w, h = ann["bbox"]
    np.testing.assert_allclose(first.boxes[0], [x, y, x + w, y + h], rtol=1e-6)
    assert first.slots[0] == ann["category_id"] - 1
    assert read_rgb(first.path).shape[2] == 3
    assert "seed0" in split.label


def test_cli_writes_the_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "shapes"
    assert main(["dataset", "synth", "--out", str(out), "--train", "2", "--val", "1",
                 "--size", "64", "--seed", "4"]) == 0
    assert (out / "train" / "000001.jpg").is_file() and (out / "val" / "000000.jpg").is_file()
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["seed"] == 4 and manifest["splits"] == {"train": 2, "val": 1}
    assert "2 train + 1 val" in capsys.readouterr().out
