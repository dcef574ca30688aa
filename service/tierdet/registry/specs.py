"""The model registry: the one place where facts about a model are written.

Exports, Triton configs, the router's accuracy table, the docs' zoo table and
metric labels are all derived from these specs. Importing this module must
stay cheap (no torch, no onnxruntime): the gateway reads it at start-up.

AP has two meanings kept apart: ``published_ap`` is the COCO val2017 figure
published for a model's official weights (None where nothing is published);
what a *served* model measured is read from its build's provenance (the
sidecar of the checkpoint it was built from, see ``tierdet.registry.trained``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from tierdet.registry.labels import COCO80, COCO90, SHAPES, LabelSet


class Family(str, Enum):
    EFFICIENTDET = "efficientdet"
    DAMOYOLO = "damoyolo"
    ONNX = "onnx"  # a graph from another exporter, wrapped from its model card


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input.

    The gateway resizes (it must know the geometry to map boxes back) and
    always sends uint8 RGB NHWC pixels; everything else happens inside the
    ONNX graph, so the wire carries uint8, 4x less than float32: ``mean`` and
    ``std`` (in 0..255 pixel units), and for a model card's graph its own
    channel order, layout and dtype (``tierdet.build.cards``).
    """

    resize: Literal["letterbox", "stretch"]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Letterbox fill colour (RGB) and where the image sits in the square.
    pad_rgb: tuple[int, int, int] = (0, 0, 0)
    placement: Literal["top-left", "centre"] = "top-left"
    # The resize's interpolation: "area" (when the image shrinks; else linear)
    # averages like effdet's antialiased PIL resize; "linear" is cv2.resize's
    # default (YOLOX, DAMO-YOLO); "cubic" is PaddleDetection's (PicoDet).
    shrink: Literal["area", "linear", "cubic"] = "area"
    channels: Literal["RGB", "BGR"] = "RGB"  # what the network itself expects


# effdet's eval transform: ImageNet mean/std, aspect kept, padded bottom/right
# with the mean colour.
IMAGENET = Preprocessing(
    resize="letterbox",
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    pad_rgb=(124, 116, 104),
)
# DAMO-YOLO's eval transform: RGB 0..255 stretched to SxS, no normalisation.
RAW_STRETCH = Preprocessing(resize="stretch", shrink="linear")


DigestKind = Literal["sha256", "sha256-prefix", "none"]
_MIN_PREFIX = 8  # torch.hub's convention: the file name carries >= 8 hex digits


@dataclass(frozen=True)
class OfficialWeights:
    """Where the published checkpoint lives and what its bytes must hash to.

    ``sha256`` is the full digest where one is known. Where only a prefix is
    published (torch.hub style, in the file name) it holds that prefix: a
    weaker check, enough against a truncated or swapped file, not against a
    crafted collision. Empty means no digest is published anywhere we could
    find; the build then records the digest it saw so it can be pinned.
    """

    url: str
    sha256: str = ""

    def __post_init__(self) -> None:
        n = len(self.sha256)
        if not re.fullmatch(r"[0-9a-f]*", self.sha256) or 0 < n < _MIN_PREFIX or n > 64:
            raise ValueError(f"{self.url}: sha256 must be 64 lowercase hex digits, a prefix "
                             f"of at least {_MIN_PREFIX}, or empty; got {self.sha256!r}")

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def digest_kind(self) -> DigestKind:
        if len(self.sha256) == 64:
            return "sha256"
        return "sha256-prefix" if self.sha256 else "none"


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
class Instances:
    """How many copies of a model Triton runs at once (its ``instance_group`` count).

    GPU 2: while one copy's batch computes, the other's inputs are copied in and
    its outputs out (copy/compute overlap), and the dynamic batcher can hand the
    next batch over without waiting. Triton's TensorRT backend shares one engine
    between the copies on a device; each copy adds its execution context and
    activation memory (lower it for a large model on a small GPU). CPU 1: ONNX
    Runtime already spreads one batch over every core it is given (the models'
    thread pool, or Triton's global one), so a second copy would only compete
    for the same cores (and, in the python backend, hold a second session and
    stub process).
    """

    gpu: int = 2
    cpu: int = 1

    def __post_init__(self) -> None:
        if self.gpu < 1 or self.cpu < 1:
            raise ValueError(f"instance counts must be at least 1, got {self}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family
    arch: str  # family-specific builder key
    input_size: int
    preprocessing: Preprocessing
    labels: LabelSet
    # COCO val2017 AP (percent) published for the official weights; None for a
    # model with no published figure (the tierdet-trained ones).
    published_ap: float | None
    params_m: float  # published parameter count, millions
    official_weights: OfficialWeights | None
    max_detections: int = 100
    # Candidates kept before NMS. TensorRT's TopK layer refuses K > 3840, and
    # one ONNX file serves every backend, so every model uses 3840.
    pre_nms_top_k: int = 3840
    nms_iou: float = 0.5
    batching: Batching = field(default_factory=Batching)
    instances: Instances = field(default_factory=Instances)
    # (model score, precision at IoU 0.5) knots measured on a labelled set: the
    # gateway answers a detection's estimated precision (``serving.scores``).
    score_calibration: tuple[tuple[float, float], ...] = ()


_EFFDET_RELEASE = "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/"


def _effdet(level: int, size: int, ap: float, params_m: float, file: str,
            sha256: str) -> ModelSpec:
    return ModelSpec(
        name=f"efficientdet-d{level}",
        family=Family.EFFICIENTDET,
        arch=f"tf_efficientdet_d{level}",
        input_size=size,
        preprocessing=IMAGENET,
        labels=COCO90,
        published_ap=ap,
        params_m=params_m,
        official_weights=OfficialWeights(url=_EFFDET_RELEASE + file, sha256=sha256),
    )


_DAMO_RELEASE = "https://idstcv.oss-cn-zhangjiakou.aliyuncs.com/DAMO-YOLO/release_model/"


def _damoyolo(variant: str, size: int, ap: float, params_m: float, path: str,
              nms_iou: float) -> ModelSpec:
    return ModelSpec(
        name=f"damoyolo-{variant}",
        family=Family.DAMOYOLO,
        arch=variant,  # key of tierdet.build.damoyolo.VARIANTS
        input_size=size,
        preprocessing=RAW_STRETCH,
        labels=COCO80,
        published_ap=ap,
        params_m=params_m,
        # No digest of these files is published (nor in their names).
        official_weights=OfficialWeights(url=_DAMO_RELEASE + path),
        nms_iou=nms_iou,
    )


# EfficientDet. AP: effdet 0.4.1's val2017 figures for its port of the TF
# weights (its README). Params: the EfficientDet paper (Table 2; D7 shares
# D6's network). sha256: D0-D4 full digests measured from the release files
# by a third party, whose first 8 hex digits are the official file names'
# hash fragment; D5-D7: only that fragment is published (a prefix check).
#
# DAMO-YOLO. AP, params and checkpoints: the tinyvision/damo-yolo README
# (commit 319572e), the rows without distillation ("T 42.0", not "T* 43.6"),
# which are the checkpoints named here. nms_iou: the configs' nms_iou_thre
# (0.65 for the nano configs, 0.7 for the others).
ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _effdet(0, 512, 34.2, 3.9, "tf_efficientdet_d0_34-f153e0cf.pth",
                "f153e0cfe3c987981ab2d02ce32c8a5fa0b4092bc97abcf95c887e2e05bd4003"),
        _effdet(1, 640, 40.1, 6.6, "tf_efficientdet_d1_40-a30f94af.pth",
                "a30f94afc3326a6ef7a61c1657baefe3ea7168139006fbf0fe41807260b885b8"),
        _effdet(2, 768, 43.4, 8.1, "tf_efficientdet_d2_43-8107aa99.pth",
                "8107aa9988942c88b909158e14de3319870d64e75bacbe4806c3b84aa8c700e3"),
        _effdet(3, 896, 47.1, 12.0, "tf_efficientdet_d3_47-0b525f35.pth",
                "0b525f352fea3c768fd1a3cc885f1016d24d1b99cf299e8861e784a4ec2f0eff"),
        _effdet(4, 1024, 49.2, 20.7, "tf_efficientdet_d4_49-f56376d9.pth",
                "f56376d93b7f0a5e75eb7d6a54ab6a767c230d4bcb2d44510392f53c781f40a0"),
        _effdet(5, 1280, 51.2, 33.7, "tf_efficientdet_d5_51-c79f9be6.pth", "c79f9be6"),
        _effdet(6, 1280, 52.0, 51.9, "tf_efficientdet_d6_52-4eda3773.pth", "4eda3773"),
        _effdet(7, 1536, 53.1, 51.9, "tf_efficientdet_d7_53-6d1d7a95.pth", "6d1d7a95"),
        _damoyolo("ns", 416, 32.3, 1.41, "ckpt/before_distill/damoyolo_nano_small.pth", 0.65),
        _damoyolo("nm", 416, 38.2, 2.71, "ckpt/before_distill/damoyolo_nano_middle.pth", 0.65),
        _damoyolo("nl", 416, 40.5, 5.69, "ckpt/before_distill/damoyolo_nano_large.pth", 0.65),
        _damoyolo("t", 640, 42.0, 8.5, "clean_model_0317/damoyolo_tinynasL20_T_420.pth", 0.7),
        _damoyolo("s", 640, 46.0, 16.3, "clean_model_0317/damoyolo_tinynasL25_S_460.pth", 0.7),
        _damoyolo("m", 640, 49.2, 28.2, "clean_model_0317/damoyolo_tinynasL35_M_492.pth", 0.7),
        _damoyolo("l", 640, 50.8, 42.1, "clean_model_0317/damoyolo_tinynasL45_L_508.pth", 0.7),
    )
}



# Models tierdet trains itself on its synthetic shapes data (6 classes; their
# checkpoints, sidecars and measured AP: tierdet.registry.trained). published_ap is
# None: nothing is published; params_m counted on the 6-class networks (torch,
# before RepConv fusion).
SHAPES_INPUT_SIZE = 256
EFFDET_SHAPES = "efficientdet-d0-shapes"
DAMOYOLO_SHAPES = "damoyolo-ns-shapes"
TRAINED: dict[str, ModelSpec] = {
    s.name: s for s in (
        # tf_efficientdet_d0 unchanged but for the class count and the input
        # size (anchors follow the size): effdet's create_model builds it.
        ModelSpec(name=EFFDET_SHAPES, family=Family.EFFICIENTDET, arch="tf_efficientdet_d0",
                  input_size=SHAPES_INPUT_SIZE, preprocessing=IMAGENET, labels=SHAPES,
                  published_ap=None, params_m=3.83, official_weights=None),
        ModelSpec(name=DAMOYOLO_SHAPES, family=Family.DAMOYOLO, arch="ns",
                  input_size=SHAPES_INPUT_SIZE, preprocessing=RAW_STRETCH, labels=SHAPES,
                  published_ap=None, params_m=1.38, official_weights=None, nms_iou=0.65),
    )
}

# Every model tierdet can build and serve: the published zoo, then the models
# tierdet trains itself on synthetic data (coco_ap there is AP on that data, not COCO).
SPECS: dict[str, ModelSpec] = {**ZOO, **TRAINED}

DEFAULT_MODELS: tuple[str, ...] = ("efficientdet-d0",)

# Models of the model cards registered in this process (tierdet.registry.cards):
# kept apart from SPECS, which is the registry tierdet ships (configs, docs, tests).
CARD_SPECS: dict[str, ModelSpec] = {}


def lookup(name: str) -> ModelSpec | None:
    """The spec of a shipped model or of a registered card's, or None."""
    return SPECS.get(name) or CARD_SPECS.get(name)


def known() -> dict[str, ModelSpec]:
    """Every model this process can build and serve: the registry and the cards."""
    return {**SPECS, **CARD_SPECS}


class UnknownModelError(KeyError):
    pass


def get_spec(name: str) -> ModelSpec:
    spec = lookup(name)
    if spec is None:
        raise UnknownModelError(name)
    return spec


__all__ = [
    "CARD_SPECS",
    "COCO80",
    "COCO90",
    "DEFAULT_MODELS",
    "SPECS",
    "ZOO",
    "Batching",
    "DigestKind",
    "Family",
    "Instances",
    "ModelSpec",
    "OfficialWeights",
    "Preprocessing",
    "UnknownModelError",
    "get_spec",
    "known",
    "lookup",
]
