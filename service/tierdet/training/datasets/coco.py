"""Reading a COCO-format detection split, in either of two layouts:

- ``DIR/annotations/instances_<split>.json`` and ``DIR/<split>/<file_name>``
  (COCO's own, and what :mod:`tierdet.training.datasets.synthetic` writes);
- ``DIR/instances.json`` and ``DIR/images/<file_name>`` (one split in a folder,
  as in ../shared/data/coco-val2017-128).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from tierdet.registry.labels import LabelSet
from tierdet.serving.imaging import to_rgb


@dataclass(frozen=True)
class Sample:
    image_id: int
    path: Path
    boxes: np.ndarray  # [N, 4] float32, x1 y1 x2 y2 in image pixels
    slots: np.ndarray  # [N] int64, model output slot of each box


@dataclass(frozen=True)
class CocoSplit:
    root: Path
    split: str = "val"

    @property
    def flat(self) -> bool:
        """One split in the folder: ``instances.json`` beside ``images/``."""
        return (self.root / "instances.json").is_file() and (self.root / "images").is_dir()

    @property
    def annotations_path(self) -> Path:
        if self.flat:
            return self.root / "instances.json"
        return self.root / "annotations" / f"instances_{self.split}.json"

    @property
    def image_dir(self) -> Path:
        return self.root / "images" if self.flat else self.root / self.split

    @cached_property
    def coco(self) -> dict:
        if not self.annotations_path.is_file():
            raise FileNotFoundError(f"{self.annotations_path}: no such annotation file "
                                    f"(expected DIR/annotations/instances_{self.split}.json, "
                                    "or DIR/instances.json beside DIR/images/)")
        return json.loads(self.annotations_path.read_text())

    @property
    def label(self) -> str:
        """A short name for reports: ``<folder>`` plus the generator's seed if known."""
        manifest = self.root / "dataset.json"
        if manifest.is_file():
            meta = json.loads(manifest.read_text())
            return f"{meta.get('label_set', self.root.name)}-v{meta.get('version')}" \
                   f"-seed{meta.get('seed')}:{self.root.name}"
        return self.root.name

    def samples(self, labels: LabelSet, limit: int | None = None) -> list[Sample]:
        """Images and their boxes, with category ids turned into ``labels``' slots."""
        slot_of = {cid: i for i, cid in enumerate(labels.category_ids) if cid is not None}
        by_image: dict[int, list[dict]] = {}
        for ann in self.coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        out = []
        for info in self.coco["images"][:limit]:
            anns = [a for a in by_image.get(info["id"], []) if not a.get("iscrowd")]
            unknown = {a["category_id"] for a in anns} - slot_of.keys()
            if unknown:
                raise ValueError(f"category ids {sorted(unknown)} are not in label set "
                                 f"{labels.name!r}")
            xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            slots = np.array([slot_of[a["category_id"]] for a in anns], np.int64)
            out.append(Sample(info["id"], self.image_dir / info["file_name"], boxes, slots))
        return out


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8, decoded as the gateway decodes JPEG/PNG."""
    image = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return to_rgb(image)
