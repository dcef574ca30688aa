"""The model registry: the one place where facts about a model are written.

Exports, Triton configs, the router's accuracy table, the README table and
metric labels are all derived from these specs. Importing this module must
stay cheap (no torch, no onnxruntime): the gateway reads it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from tierdet.labels import COCO80, COCO90, LabelSet


class Family(str, Enum):
    EFFICIENTDET = "efficientdet"
    DAMOYOLO = "damoyolo"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's uint8 input tensor.

    ``resize`` happens in the gateway (it must know the geometry to map boxes
    back); ``mean``/``std`` (in 0..255 pixel units) are applied inside the
    ONNX graph so the wire carries uint8, 4x less than float32.
    """

    resize: Literal["letterbox", "stretch"]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Letterbox fill colour (RGB); the image sits at the top-left corner.
    pad_rgb: tuple[int, int, int] = (0, 0, 0)


# effdet's eval transform: ImageNet mean/std, aspect kept, padded bottom/right
# with the mean colour.
IMAGENET = Preprocessing(
    resize="letterbox",
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    pad_rgb=(124, 116, 104),
)
# DAMO-YOLO's eval transform: RGB 0..255 stretched to SxS, no normalisation.
RAW_STRETCH = Preprocessing(resize="stretch")


@dataclass(frozen=True)
class OfficialWeights:
    """Where the published checkpoint lives and the digest it must have."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Batching:
    """Triton dynamic-batching settings for one model."""

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    priority_levels: int = 2
    # Requests that wait longer than this in Triton's queue are rejected
    # unless the request carries its own (tighter) timeout.
    default_timeout_us: int = 10_000_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    arch: str  # family-specific builder key
    input_size: int
    preprocessing: Preprocessing
    labels: LabelSet
    coco_ap: float  # published COCO val2017 AP of the official weights
    params_m: float  # published parameter count, millions
    official_weights: OfficialWeights | None
    max_detections: int = 100
    # Candidates kept before NMS. TensorRT's TopK layer refuses K > 3840, and
    # one ONNX file serves every backend, so every model uses 3840.
    pre_nms_top_k: int = 3840
    nms_iou: float = 0.5
    batching: Batching = field(default_factory=Batching)


_EFFDET_RELEASE = "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/"


def _effdet(
    level: int, size: int, ap: float, params_m: float, file: str, sha256: str
) -> ModelSpec:
    return ModelSpec(
        name=f"efficientdet-d{level}",
        family=Family.EFFICIENTDET,
        arch=f"tf_efficientdet_d{level}",
        input_size=size,
        preprocessing=IMAGENET,
        labels=COCO90,
        coco_ap=ap,
        params_m=params_m,
        official_weights=OfficialWeights(url=_EFFDET_RELEASE + file, sha256=sha256),
    )


# AP: effdet 0.4.1's published val2017 figures for its port of the TF weights.
# sha256: the release file names carry the first 8 hex digits; the full digests
# were measured from the release files (see README, "Model zoo").
SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _effdet(
            0, 512, 34.2, 3.9, "tf_efficientdet_d0_34-f153e0cf.pth",
            "f153e0cfe3c987981ab2d02ce32c8a5fa0b4092bc97abcf95c887e2e05bd4003",
        ),
    )
}

DEFAULT_MODELS: tuple[str, ...] = ("efficientdet-d0",)


class UnknownModelError(KeyError):
    pass


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise UnknownModelError(name) from None


__all__ = [
    "COCO80",
    "COCO90",
    "DEFAULT_MODELS",
    "SPECS",
    "Batching",
    "Family",
    "ModelSpec",
    "OfficialWeights",
    "Preprocessing",
    "UnknownModelError",
    "get_spec",
]
