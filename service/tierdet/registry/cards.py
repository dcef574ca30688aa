"""Model cards: your own detector, described in YAML, served like a zoo model.

A card names a graph (an ONNX file from any exporter) or a zoo-family
checkpoint trained on your own classes, and says how its input is made and
what its output means. ``tierdet build --card FILE`` wraps it with the same
in-graph preprocessing, decode, top-k and NMS as the zoo
(``tierdet.build.cards``), so the serving path keeps its one ``[B, K, 6]``
contract; ``tierdet up --card FILE`` serves it beside the zoo, and a gateway
learns of it from ``TIERDET_CARDS``. A card is validated here (pydantic), with
errors naming the field; a wrong shape or dtype of the graph itself is found
at build time, by running it once.

    name: yolox-nano                  # serves yolox-nano-320 and yolox-nano-416
    source: {onnx: ../../weights/yolox-nano/yolox_nano.onnx, sha256: 695e...}
    input: {size: [320, 416], layout: NCHW, dtype: float32, channels: BGR,
            resize: letterbox, placement: top-left, pad: [114, 114, 114]}
    output: {format: yolox, strides: [8, 16, 32]}
    classes: coco80
    published_ap: {ap: 25.8, dataset: COCO val2017}
    measured_ap: {ap: {320: 26.1, 416: 30.8}, dataset: coco-val2017-128,
                  command: tierdet eval ...}
    licence: Apache-2.0
    provenance: the official YOLOX-Nano checkpoint, exported by ...
"""

from __future__ import annotations

import hashlib
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tierdet.registry.labels import COCO80, LabelSet
from tierdet.registry.specs import CARD_SPECS, SPECS, Family, ModelSpec, Preprocessing

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class CardError(ValueError):
    """A card that cannot be used, with the file and the field that is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class OnnxSource(_Strict):
    onnx: Path | dict[int, Path] = Field(description=(
        "The graph, relative to the card's folder; a card of several sizes may name one "
        "file per size ({320: a.onnx, 416: b.onnx}) or one size-free graph for all."))
    sha256: SHA256 | dict[int, SHA256] | None = Field(
        None, description="Checked at build time when given (per size where the files are).")


class CheckpointSource(_Strict):
    family: Literal["efficientdet", "damoyolo"]
    arch: str = Field(description="effdet's model name (tf_efficientdet_d0) or a DAMO-YOLO "
                                  "variant (ns, nm, nl, t, s, m, l).")
    checkpoint: Path = Field(description="The state_dict, relative to the card's folder.")


Side = Annotated[int, Field(ge=32, le=4096)]


class CardInput(_Strict):
    size: Side | tuple[Side, ...] = Field(description=(
        "Square input side, pixels; a list serves each size as a model of its own, named "
        "<name>-<size> (the graph's input re-pinned to each)."))
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"
    channels: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # 0..255 pixel units
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: Literal["letterbox", "stretch"] = "letterbox"
    placement: Literal["top-left", "centre"] = "top-left"
    pad: tuple[int, int, int] = (114, 114, 114)
    shrink: Literal["area", "linear", "cubic"] = Field("linear", description=(
        "the resize's interpolation: area (shrinking; enlarging is linear), linear, cubic"))
    name: str | None = Field(None, description="The graph's input; default: its only one.")


# Where a cell's point is, for cell x of a level of stride s (GFL decodes from it).
CellCentre = Literal["(x+0.5)*s", "x*s+(s-1)/2", "x*s"]


class CardOutput(_Strict):
    format: Literal["end2end", "yolox", "boxes_scores", "gfl"] = Field(
        description="end2end: [B, K, 6] x1 y1 x2 y2 score class; yolox: the raw grid "
                    "[B, N, 5 + C] (box, objectness, class probabilities) with its strides; "
                    "boxes_scores: boxes [B, N, 4] xyxy and scores [B, N, C]; gfl: the "
                    "GFL/DFL head (PicoDet, NanoDet): per stride a class map [B, HW, C], "
                    "then per stride a distance map [B, HW, 4 x bins] (left, top, right, "
                    "bottom), HW = ceil(size / stride)^2 cells row-major.")
    strides: tuple[int, ...] = ()
    bins: int = Field(8, ge=2, le=64, description="gfl: bins of each side's distance "
                                                  "distribution (distances 0..bins-1, "
                                                  "times the stride)")
    cell_centre: CellCentre = Field("(x+0.5)*s", description=(
        "gfl: the point of cell x the distances are measured from"))
    scores: Literal["probabilities", "logits"] = "probabilities"
    multi_label: bool = Field(True, description="Rank every (box, class) pair, as the zoo "
                                                "does; false: each box its best class only "
                                                "(YOLOX's own evaluation).")
    names: tuple[str, ...] = Field((), description="The graph's outputs in the order the "
                                                   "format lists them; default: as exported.")

    @model_validator(mode="after")
    def _strides_for_grids(self) -> CardOutput:
        if self.format in ("yolox", "gfl") and not self.strides:
            raise ValueError(f"a {self.format} output needs its strides, e.g. [8, 16, 32]")
        return self


class PublishedAP(_Strict):
    ap: float = Field(gt=0, lt=100, description="AP in percent (IoU .50:.95).")
    dataset: str = Field(min_length=1)


class MeasuredAP(_Strict):
    ap: float | dict[int, float] = Field(description=(
        "AP in percent (IoU .50:.95) measured through the gateway, per size for a card of "
        "several sizes; the router ranks by it (over published_ap)."))
    dataset: str = Field(min_length=1, description="The images it was measured on.")
    command: str = Field(min_length=1, description="How it was measured (to measure again).")


class ScoreCalibration(_Strict):
    knots: list[tuple[float, float]] | dict[int, list[tuple[float, float]]] = Field(
        description="(model score, share of its detections at that score that matched an "
                    "object at IoU 0.5) pairs, per size for a card of several sizes")
    dataset: str = Field(min_length=1, description="The images it was measured on.")
    command: str = Field(min_length=1, description="How it was measured (to measure again).")

    @model_validator(mode="after")
    def _curves(self) -> ScoreCalibration:
        curves = self.knots.values() if isinstance(self.knots, dict) else [self.knots]
        for curve in curves:
            _check_knots(curve)
        return self


def _check_knots(knots: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """``knots`` as a calibration curve, or ValueError: at least two, in 0..1,
    scores increasing, precisions non-decreasing."""
    pairs = tuple((float(x), float(y)) for x, y in knots)
    if len(pairs) < 2:
        raise ValueError("a score calibration needs at least two knots")
    if not all(0 <= v <= 1 for pair in pairs for v in pair):
        raise ValueError("knots: scores and precisions lie in 0..1")
    if any(not (x1 > x0 and y1 >= y0) for (x0, y0), (x1, y1) in pairwise(pairs)):
        raise ValueError("knots: scores increasing, precisions non-decreasing")
    return pairs


class ModelCard(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]
    source: OnnxSource | CheckpointSource
    input: CardInput
    output: CardOutput = Field(default_factory=lambda: CardOutput.model_validate(
        {"format": "end2end"}))
    classes: Literal["coco80"] | tuple[str, ...] = Field(
        description="coco80 (COCO's 80 classes in the usual order; ids are COCO's) or the "
                    "class names in output order (ids 1..N).")
    label_set: Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)] | None \
        = Field(None, description=(
            "The data set these classes are: the router ranks by AP only models of one label "
            "set (APs on different data sets do not compare). Default: coco for coco80, "
            "else the card's name; cards fine-tuned on the same classes share one."))
    published_ap: PublishedAP | None = None
    measured_ap: MeasuredAP | None = None
    score_calibration: ScoreCalibration | None = Field(None, description=(
        "What the gateway maps the model's scores through, so that a score is the "
        "detection's estimated precision on every model (`tierdet eval --calibrate`)."))
    nms_iou: float = Field(0.5, gt=0, lt=1)
    pre_nms_top_k: int = Field(3840, ge=1, le=3840, description=(
        "(box, class) candidates kept for NMS, best first (TensorRT's TopK allows 3840)"))
    max_detections: int = Field(100, ge=1, le=1000)
    licence: str = Field(min_length=1)
    provenance: str = Field(min_length=1)

    @model_validator(mode="after")
    def _coco_is_cocos_classes(self) -> ModelCard:
        coco = self.classes == "coco80"
        if self.label_set is not None and coco != (self.label_set == COCO80.name):
            raise ValueError(f"label_set: {COCO80.name!r} is the label set of classes: coco80, "
                             "and only of it")
        return self

    @model_validator(mode="after")
    def _per_size_fields_name_the_sizes(self) -> ModelCard:
        if len(set(sizes_of(self))) != len(sizes_of(self)) or not sizes_of(self):
            raise ValueError("input.size: each size once, at least one")
        sizes = set(sizes_of(self))
        per_size: list[tuple[str, object]] = [
            ("measured_ap.ap", self.measured_ap.ap if self.measured_ap else None),
            ("score_calibration.knots",
             self.score_calibration.knots if self.score_calibration else None)]
        if isinstance(self.source, OnnxSource):
            per_size += [("source.onnx", self.source.onnx), ("source.sha256", self.source.sha256)]
        for field, value in per_size:
            if isinstance(value, dict) and set(value) != sizes:
                raise ValueError(f"{field}: one entry per input size {sorted(sizes)}, got "
                                 f"{sorted(value)}")
        if isinstance(self.source, OnnxSource) and (
                isinstance(self.source.sha256, dict) and not isinstance(self.source.onnx, dict)):
            raise ValueError("source.sha256: one digest per file: one file, one digest")
        return self

    @model_validator(mode="after")
    def _nms_keeps_enough_candidates(self) -> ModelCard:
        if self.output.format != "end2end" and self.pre_nms_top_k < self.max_detections:
            raise ValueError(f"pre_nms_top_k ({self.pre_nms_top_k}) is below max_detections "
                             f"({self.max_detections}): the detections are the best of the "
                             "candidates")
        return self

    @model_validator(mode="after")
    def _checkpoint_sources_are_graphs_of_their_family(self) -> ModelCard:
        if isinstance(self.source, CheckpointSource):
            if self.output.format != "end2end":
                raise ValueError("output: a checkpoint card is exported by tierdet: leave it out")
            if (self.input.channels, self.input.layout, self.input.dtype) != (
                    "RGB", "NCHW", "float32"):
                raise ValueError("input: a zoo family's network takes RGB NCHW float32")
        return self


def sizes_of(card: ModelCard) -> tuple[int, ...]:
    size = card.input.size
    return size if isinstance(size, tuple) else (size,)


def expand(card: ModelCard) -> tuple[ModelCard, ...]:
    """A card -> one card per input size, each with one file, one digest and one
    measured AP; named ``<name>-<size>`` where the card lists its sizes."""
    listed = isinstance(card.input.size, tuple)
    out = []
    for size in sizes_of(card):
        source = card.source
        if isinstance(source, OnnxSource):
            source = source.model_copy(update={k: _at(v, size) for k, v in (
                ("onnx", source.onnx), ("sha256", source.sha256))})
        measured = card.measured_ap
        if measured is not None:
            measured = measured.model_copy(update={"ap": _at(measured.ap, size)})
        calibration = card.score_calibration
        if calibration is not None:
            calibration = calibration.model_copy(update={"knots": _at(calibration.knots, size)})
        out.append(card.model_copy(update={
            "name": f"{card.name}-{size}" if listed else card.name, "source": source,
            "measured_ap": measured, "score_calibration": calibration,
            "input": card.input.model_copy(update={"size": size})}))
    return tuple(out)


def _at(value, size: int):
    return value[size] if isinstance(value, dict) else value


def _one(value):
    assert not isinstance(value, dict), "expand() the card first"
    return value


def single_size(card: ModelCard) -> int:
    """The input side of an expanded card."""
    size = card.input.size
    assert isinstance(size, int), "expand() the card first"
    return size


def labels_of(card: ModelCard) -> LabelSet:
    if card.classes == "coco80":
        return COCO80
    names = card.classes
    if len(set(names)) != len(names):
        raise CardError(f"{card.name}: classes: a name appears twice")
    return LabelSet(name=card.label_set or card.name, category_ids=tuple(range(1, len(names) + 1)),
                    category_names={i + 1: n for i, n in enumerate(names)})


def spec_of(card: ModelCard) -> ModelSpec:
    source = card.source
    family = Family(source.family) if isinstance(source, CheckpointSource) else Family.ONNX
    arch = source.arch if isinstance(source, CheckpointSource) else card.output.format
    prep = Preprocessing(resize=card.input.resize, mean=card.input.mean, std=card.input.std,
                         pad_rgb=card.input.pad, placement=card.input.placement,
                         shrink=card.input.shrink, channels=card.input.channels)
    return ModelSpec(name=card.name, family=family, arch=arch, input_size=single_size(card),
                     preprocessing=prep, labels=labels_of(card),
                     published_ap=card.published_ap.ap if card.published_ap else None,
                     params_m=0.0, official_weights=None, nms_iou=card.nms_iou,
                     max_detections=card.max_detections,
                     score_calibration=tuple(_one(card.score_calibration.knots))
                     if card.score_calibration else ())


def card_mapping(text: str, where: object) -> dict[str, Any]:
    """A card's text (YAML; JSON is YAML too) as a mapping; ``where`` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CardError(f"{where}: not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise CardError(f"{where}: a card is a YAML mapping (name, source, input, ...)")
    return raw


def validated(raw: dict[str, Any], where: object) -> ModelCard:
    """``raw`` as a card, or a ``CardError`` naming every field that is wrong."""
    try:
        return ModelCard(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}"
                             for e in exc.errors())
        raise CardError(f"{where}: {problems}") from None


def load_card(path: Path) -> ModelCard:
    """The card at ``path``, validated; paths in it made absolute (relative to it)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card ({exc.strerror})") from None
    card = validated(card_mapping(text, path), path)
    source = card.source
    if isinstance(source, OnnxSource):
        onnx = source.onnx
        source = source.model_copy(update={"onnx": (
            {s: (path.parent / p).resolve() for s, p in onnx.items()}
            if isinstance(onnx, dict) else (path.parent / onnx).resolve())})
    else:
        source = source.model_copy(
            update={"checkpoint": (path.parent / source.checkpoint).resolve()})
    return card.model_copy(update={"source": source})


def register(path: Path) -> tuple[ModelCard, ...]:
    """Load a card and add its models (one per size) to ``CARD_SPECS``, so every part
    of tierdet in this process knows them (``tierdet.registry.specs.get_spec``). A
    card may not take the name of a shipped model, nor of another card's."""
    cards = expand(load_card(path))
    for card in cards:
        spec = spec_of(card)
        if card.name in SPECS:
            raise CardError(f"{path}: name: {card.name!r} is already a model of the registry")
        if CARD_SPECS.get(card.name, spec) != spec:
            raise CardError(f"{path}: name: {card.name!r} is already another card's model")
        CARD_SPECS[card.name] = spec
    return cards


# The cards a checkout ships (examples/cards): what `tierdet up` serves by default.
SHIPPED = Path(__file__).resolve().parents[3] / "examples" / "cards"


def shipped_cards() -> list[Path]:
    """The shipped cards whose files are here (a checkout; an installed package has none)."""
    return sorted(SHIPPED.glob("*.yaml")) if SHIPPED.is_dir() else []


# The tiers set for the shipped cards' models (TIERDET_TIERS_FILE's format).
SHIPPED_TIERS = SHIPPED.parent / "tiers" / "ladder.yaml"


def shipped_tiers() -> Path | None:
    """The shipped ladder's tiers file, if this is a checkout."""
    return SHIPPED_TIERS if SHIPPED_TIERS.is_file() else None


def sha256_file(path: Path) -> str:
    """The sha256 a card names a file by (its graph, its weights), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
