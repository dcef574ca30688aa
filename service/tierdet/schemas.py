"""Wire models at the HTTP edge (pydantic), mirrored by protos/detection.proto."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tierdet.validation import DetectOptions


class DetectJsonRequest(DetectOptions):
    """JSON form of a detect request: the image travels base64-encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(..., description="Base64-encoded image bytes (JPEG, PNG, WebP, ...).")

    def options(self) -> DetectOptions:
        return DetectOptions(**self.model_dump(exclude={"image"}))


class DetectionOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str


class TimingOut(BaseModel):
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float
    total_ms: float


class RoutingOut(BaseModel):
    tier: str | None = Field(..., description="Tier applied; null for a pinned model or "
                             "a bare sla_ms.")
    budget_ms: float = Field(..., description="The latency budget the router worked to.")
    predicted_ms: float = Field(..., description="Predicted end-to-end latency at admission.")
    actual_ms: float = Field(..., description="Measured end-to-end latency at the gateway.")
    degraded: bool = Field(..., description="True when no model fitted and the tier allowed "
                           "serving the fastest one late.")


class DetectResponse(BaseModel):
    model: str
    width: int
    height: int
    detections: list[DetectionOut]
    timing: TimingOut
    routing: RoutingOut


class ModelInfo(BaseModel):
    name: str
    family: str
    input_size: int
    preprocessing: str
    published_coco_ap: float
    params_m: float
    ready: bool
    status: str = Field(..., description="Triton's state: READY, UNAVAILABLE, LOADING, ...")
    reason: str = Field("", description="Why the model is not ready (Triton's load error).")
    weights: str = Field(..., description="Provenance: official, file <path>, or random.")
    latency_ms: float = Field(..., description="The router's current estimate of one "
                              "request's Triton time at batch 1 (profile, corrected online).")
    measured_ap: dict[str, float] = Field(
        default_factory=dict, description="AP (0..1) measured by `tierdet eval` through the "
        "gateway, keyed by dataset (or dataset/tier); compare with published_coco_ap (%).")


class TierOut(BaseModel):
    name: str
    budget_ms: float
    models: list[str]
    degrade: bool


class ModelsResponse(BaseModel):
    default_tier: str
    tiers: list[TierOut]
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
