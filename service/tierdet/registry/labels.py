"""Label sets: what a model's output class index means to a user.

Every detection the service returns carries a ``class_id`` that is the
dataset's category id (for COCO: 1..90 with gaps) and its name. Models of
different families number their outputs differently (EfficientDet has 90
slots indexed by ``category_id - 1``; DAMO-YOLO has 80 contiguous slots), so
the router can switch between families without the meaning of ``class_id``
changing under the client's feet.
"""

from __future__ import annotations

from dataclasses import dataclass

# COCO 2017 categories: category id -> name (80 used ids out of 1..90).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
    33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup",
    48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


@dataclass(frozen=True)
class LabelSet:
    """Maps a model's output slot to a dataset category.

    ``category_ids[i]`` is the category id of output slot ``i``; a slot with
    id ``None`` exists in the network but names no category (EfficientDet's
    10 unused COCO ids) and its detections are dropped by the gateway.
    """

    name: str
    category_ids: tuple[int | None, ...]
    category_names: dict[int, str]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def category_id(self, name_or_id: str) -> int | None:
        """The category a class filter entry names (a category id, or a name in any
        case), or None if this label set has no such class."""
        text = name_or_id.strip()
        if text.isdigit():
            number = int(text)
            return number if number in self.category_names and number in self.category_ids \
                else None
        wanted = text.lower()
        for cid in self.category_ids:
            if cid is not None and self.category_names[cid].lower() == wanted:
                return cid
        return None

    def lookup(self, slot: int) -> tuple[int, str] | None:
        """(category id, name) for an output slot, or None for an unused slot."""
        if not 0 <= slot < len(self.category_ids):
            return None
        cid = self.category_ids[slot]
        if cid is None:
            return None
        return cid, self.category_names[cid]


# EfficientDet (TF/effdet checkpoints): 90 slots, slot i is COCO id i + 1.
COCO90 = LabelSet(
    name="coco",
    category_ids=tuple(i + 1 if i + 1 in COCO_CATEGORIES else None for i in range(90)),
    category_names=COCO_CATEGORIES,
)

# DAMO-YOLO (and most YOLOs): 80 contiguous slots in category-id order.
COCO80 = LabelSet(
    name="coco",
    category_ids=tuple(sorted(COCO_CATEGORIES)),
    category_names=COCO_CATEGORIES,
)

# tierdet's synthetic shapes set (tierdet.training.datasets.synthetic draws it):
# slot i is category id i + 1, as in the COCO files it writes.
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
SHAPES = LabelSet(
    name="shapes",
    category_ids=tuple(range(1, len(SHAPE_NAMES) + 1)),
    category_names={i + 1: name for i, name in enumerate(SHAPE_NAMES)},
)
