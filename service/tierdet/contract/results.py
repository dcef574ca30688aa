"""What the service answers, as plain dataclasses.

One definition serves the gateway (which returns them: FastAPI renders them
as JSON and documents them in OpenAPI from the descriptions here), the
Python client (which parses into them) and the renderer. ``tierdet.contract.wire``
maps them to protobuf; protos/detection.proto mirrors them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import Field


@dataclass(frozen=True)
class Detection:
    """A box in original-image pixels, clipped to the image."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: Annotated[float, Field(description=(
        "The detection's estimated precision (the share of the model's detections at "
        "this score that matched an object on its card's labelled set), the same scale "
        "whichever model answered; the model's own score where its card records no "
        "calibration or the server answers own scores."))]
    class_id: Annotated[int, Field(description="Dataset category id (COCO: 1..90), the same "
                                   "whichever model answered.")]
    class_name: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class Timing:
    decode_ms: float
    preprocess_ms: float
    infer_ms: Annotated[float, Field(description="The Triton round trip.")]
    postprocess_ms: float
    total_ms: float


@dataclass(frozen=True)
class Routing:
    tier: Annotated[str | None, Field(description="Tier applied; null for a pinned model or "
                                      "a bare sla_ms.")]
    budget_ms: Annotated[float, Field(description="The latency budget the router worked to.")]
    predicted_ms: Annotated[float, Field(description="Predicted end-to-end latency at "
                                         "admission.")]
    actual_ms: Annotated[float, Field(description="Measured end-to-end latency at the "
                                      "gateway.")]
    degraded: Annotated[bool, Field(description="True when no model fitted and the tier "
                                    "allowed serving the fastest one late.")]
    tiles: Annotated[int, Field(description="Tiles run beside the whole image (`tile=auto`); "
                                "0: the whole image only.")] = 0


@dataclass(frozen=True)
class DetectResult:
    model: str
    width: int
    height: int
    detections: tuple[Detection, ...]
    timing: Timing
    routing: Routing


@dataclass(frozen=True)
class ErrorInfo:
    """A refusal of one item (a batch image, a stream frame), while the call goes on."""

    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ErrorReply:
    """The body of every HTTP refusal: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorInfo


@dataclass(frozen=True)
class BatchItem:
    index: Annotated[int, Field(description="Position of the image in the request.")]
    filename: Annotated[str | None, Field(description="The multipart file name, if any.")]
    result: Annotated[DetectResult | None, Field(description="Set when the image succeeded.")]
    error: Annotated[ErrorInfo | None, Field(description="Set when the image failed.")]

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchResult:
    results: tuple[BatchItem, ...]
    succeeded: int
    failed: int


@dataclass(frozen=True)
class FrameResult:
    """The answer to one frame of a DetectStream, in the order the frames were sent."""

    frame_id: int
    result: DetectResult | None
    error: ErrorInfo | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CanaryInfo:
    """A model's latest canary: a replacement served beside it on a share of its
    requests, judged on live figures (see the admin API's canaries)."""

    model: Annotated[str, Field(description="The name the canary is served under "
                                "(`<model>.canary`).")]
    share: Annotated[float, Field(description="Share of the model's requests it takes.")]
    state: Annotated[str, Field(description="running, promoting, rolling_back, promoted, "
                                "rolled_back or failed.")]
    decided_by: Annotated[str, Field(description="rule or operator; empty while running.")]
    reason: Annotated[str, Field(description="Why it was decided: the figures of the rule.")]
    samples: Annotated[int, Field(description="The canary's scored shadow samples.")]
    old_samples: Annotated[int, Field(description="The model's own, meanwhile.")]
    agreement: Annotated[float | None, Field(description="The canary's mean shadow agreement "
                                             "(0..1).")]
    old_agreement: Annotated[float | None, Field(description="The model's, meanwhile.")]
    p99_ms: Annotated[float | None, Field(description="p99 of the canary's answers' total "
                                          "time, as the gateway saw it.")]
    old_p99_ms: Annotated[float | None, Field(description="The model's, meanwhile.")]
    pairs: Annotated[int, Field(description="Images both answered (the model in the shadow), "
                                "each scored against the same reference detections.")]
    agreement_drop: Annotated[float | None, Field(
        description="The model's agreement minus the canary's on those images, averaged: "
                    "what the rule judges.")]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    input_size: int
    preprocessing: Annotated[str, Field(description="letterbox or stretch")]
    published_coco_ap: Annotated[float | None, Field(
        description="COCO val2017 AP (percent) published for the official weights; null "
                    "for a model with no published figure (tierdet-trained ones).")]
    params_m: float
    ready: bool
    status: Annotated[str, Field(description="Triton's state: READY, UNAVAILABLE, LOADING, ...")]
    reason: Annotated[str, Field(description="Why the model is not ready (Triton's load "
                                 "error).")]
    weights: Annotated[str, Field(description="Provenance: official, file <path>, or random.")]
    latency_ms: Annotated[float, Field(description="The router's current estimate of one "
                                       "request's Triton time at batch 1 (profile, corrected "
                                       "online).")]
    routing_ap: Annotated[float, Field(description="The AP (percent) the router ranks this "
                                       "model by.")]
    label_set: Annotated[str, Field(description="The data set its classes are (coco, or a "
                                    "card's): the router ranks only models of one label set "
                                    "against each other.")]
    measured_ap: Annotated[dict[str, float], Field(
        description="AP (0..1) measured through the gateway, keyed by dataset (or "
                    "dataset/tier): the model's own evaluation record and `tierdet eval` "
                    "reports.")] = field(default_factory=dict)
    canary: Annotated[CanaryInfo | None, Field(
        description="Its latest canary, running or decided; null if it never had one.")] = None


@dataclass(frozen=True)
class TierInfo:
    name: str
    budget_ms: float
    models: Annotated[tuple[str, ...], Field(description="Models the tier may use; empty: "
                                             "every served model.")]
    degrade: Annotated[bool, Field(description="Nothing fits: the fastest model answers "
                                   "late, marked degraded.")]
    default: Annotated[bool, Field(description="The tier of requests that name no tier, "
                                   "budget or model.")]


@dataclass(frozen=True)
class ModelsInfo:
    default_tier: str
    tiers: tuple[TierInfo, ...]
    models: tuple[ModelInfo, ...]


# A model as the admin API shows it (serving.changes).
State = Literal["serving", "building", "loading", "draining", "retired", "failed"]


@dataclass(frozen=True)
class ModelChange:
    """One model as the admin sees it (``GET /admin/models``)."""

    name: str
    state: State
    reason: str = ""  # why it failed (the build's or Triton's words)
    card: str = ""  # the card it came from through the admin API, if it did
    canary: CanaryInfo | None = None  # its latest canary, running or decided


@dataclass(frozen=True)
class AdminModels:
    """The admin API's answer: the models it shows or a change touched."""

    models: tuple[ModelChange, ...]
