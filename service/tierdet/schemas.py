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


class DetectResponse(BaseModel):
    model: str
    width: int
    height: int
    detections: list[DetectionOut]
    timing: TimingOut


class ModelInfo(BaseModel):
    name: str
    family: str
    input_size: int
    preprocessing: str
    published_coco_ap: float
    params_m: float
    ready: bool
    weights: str = Field(..., description="Provenance: official, file <path>, or random.")


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
