from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectRequest(_message.Message):
    __slots__ = ("image", "model", "score_threshold", "max_detections", "tier", "sla_ms", "classes", "tile")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SLA_MS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    model: str
    score_threshold: float
    max_detections: int
    tier: str
    sla_ms: float
    classes: _containers.RepeatedScalarFieldContainer[str]
    tile: str
    def __init__(self, image: _Optional[bytes] = ..., model: _Optional[str] = ..., score_threshold: _Optional[float] = ..., max_detections: _Optional[int] = ..., tier: _Optional[str] = ..., sla_ms: _Optional[float] = ..., classes: _Optional[_Iterable[str]] = ..., tile: _Optional[str] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "score", "class_id", "class_name")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    class_name: str
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., score: _Optional[float] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "infer_ms", "postprocess_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    INFER_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., infer_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("tier", "budget_ms", "predicted_ms", "actual_ms", "degraded", "tiles")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MS_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_MS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    budget_ms: float
    predicted_ms: float
    actual_ms: float
    degraded: bool
    tiles: int
    def __init__(self, tier: _Optional[str] = ..., budget_ms: _Optional[float] = ..., predicted_ms: _Optional[float] = ..., actual_ms: _Optional[float] = ..., degraded: _Optional[bool] = ..., tiles: _Optional[int] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("model", "width", "height", "detections", "timing", "routing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    model: str
    width: int
    height: int
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    timing: Timing
    routing: Routing
    def __init__(self, model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "input_size", "preprocessing", "published_coco_ap", "params_m", "ready", "weights", "measured_ap", "status", "reason", "latency_ms", "routing_ap", "label_set", "canary")
    class MeasuredApEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_COCO_AP_FIELD_NUMBER: _ClassVar[int]
    PARAMS_M_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AP_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_AP_FIELD_NUMBER: _ClassVar[int]
    LABEL_SET_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    input_size: int
    preprocessing: str
    published_coco_ap: float
    params_m: float
    ready: bool
    weights: str
    measured_ap: _containers.ScalarMap[str, float]
    status: str
    reason: str
    latency_ms: float
    routing_ap: float
    label_set: str
    canary: CanaryInfo
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., input_size: _Optional[int] = ..., preprocessing: _Optional[str] = ..., published_coco_ap: _Optional[float] = ..., params_m: _Optional[float] = ..., ready: _Optional[bool] = ..., weights: _Optional[str] = ..., measured_ap: _Optional[_Mapping[str, float]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., latency_ms: _Optional[float] = ..., routing_ap: _Optional[float] = ..., label_set: _Optional[str] = ..., canary: _Optional[_Union[CanaryInfo, _Mapping]] = ...) -> None: ...

class CanaryInfo(_message.Message):
    __slots__ = ("model", "share", "state", "decided_by", "reason", "samples", "old_samples", "agreement", "old_agreement", "p99_ms", "old_p99_ms", "pairs", "agreement_drop")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OLD_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    OLD_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    OLD_P99_MS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_DROP_FIELD_NUMBER: _ClassVar[int]
    model: str
    share: float
    state: str
    decided_by: str
    reason: str
    samples: int
    old_samples: int
    agreement: float
    old_agreement: float
    p99_ms: float
    old_p99_ms: float
    pairs: int
    agreement_drop: float
    def __init__(self, model: _Optional[str] = ..., share: _Optional[float] = ..., state: _Optional[str] = ..., decided_by: _Optional[str] = ..., reason: _Optional[str] = ..., samples: _Optional[int] = ..., old_samples: _Optional[int] = ..., agreement: _Optional[float] = ..., old_agreement: _Optional[float] = ..., p99_ms: _Optional[float] = ..., old_p99_ms: _Optional[float] = ..., pairs: _Optional[int] = ..., agreement_drop: _Optional[float] = ...) -> None: ...

class TierInfo(_message.Message):
    __slots__ = ("name", "budget_ms", "models", "degrade", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEGRADE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    budget_ms: float
    models: _containers.RepeatedScalarFieldContainer[str]
    degrade: bool
    default: bool
    def __init__(self, name: _Optional[str] = ..., budget_ms: _Optional[float] = ..., models: _Optional[_Iterable[str]] = ..., degrade: _Optional[bool] = ..., default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_tier", "tiers")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIER_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_tier: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_tier: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierInfo, _Mapping]]] = ...) -> None: ...

class DetectFrame(_message.Message):
    __slots__ = ("frame_id", "request")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    request: DetectRequest
    def __init__(self, frame_id: _Optional[int] = ..., request: _Optional[_Union[DetectRequest, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retry_after_s: float
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class DetectFrameResult(_message.Message):
    __slots__ = ("frame_id", "response", "error")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    response: DetectResponse
    error: Error
    def __init__(self, frame_id: _Optional[int] = ..., response: _Optional[_Union[DetectResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
