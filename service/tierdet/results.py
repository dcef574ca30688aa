"""What a detect call answers, as plain dataclasses (no dependencies).

One definition serves the gateway (detector), the Python client and the
renderer; the wire forms (pydantic in schemas.py, protobuf) mirror it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Detection:
    """A box in original-image pixels, clipped to the image."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int  # dataset category id (COCO: 1..90), the same for every family
    class_name: str

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class Timing:
    decode_ms: float
    preprocess_ms: float
    infer_ms: float  # Triton round trip
    postprocess_ms: float
    total_ms: float


@dataclass(frozen=True)
class Routing:
    tier: str | None  # None for a pinned model or a bare sla_ms
    budget_ms: float
    predicted_ms: float
    actual_ms: float
    degraded: bool
