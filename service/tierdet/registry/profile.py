"""Latency profiles: how long each model takes per batch size on this hardware.

``tierdet profile`` measures them through the running Triton
(``tierdet.devstack.profiling``) and writes a JSON file; the gateway's router
loads it and corrects it online. The file
is per machine: a profile from a GPU host says nothing about a CPU host.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

from tierdet.registry.specs import Batching

PROFILE_VERSION = 1


@dataclass
class ModelProfile:
    """Median Triton round-trip per batch size, in milliseconds."""

    batch_ms: dict[int, float]

    def service_ms(self, batch: int) -> float:
        """Latency of one batch of ``batch`` images (interpolated if unmeasured)."""
        if batch in self.batch_ms:
            return self.batch_ms[batch]
        sizes = sorted(self.batch_ms)
        below = max((b for b in sizes if b <= batch), default=sizes[0])
        above = min((b for b in sizes if b >= batch), default=sizes[-1])
        if below == above:  # outside the measured range: scale linearly
            return self.batch_ms[below] * batch / below
        t = (batch - below) / (above - below)
        return self.batch_ms[below] * (1 - t) + self.batch_ms[above] * t

    def per_request_ms(self, batch: float) -> float:
        """The time of the execution a request ran in, on average, where the
        executions averaged ``batch`` images (Triton counts an execution's run
        once per request in it, so a batch of n weighs n times). The sizes are
        taken as the two whole numbers around the mean: 8 singles and a pair
        average 1.11 images, and their requests 1.2."""
        low = max(1, int(batch))
        high_share = max(0.0, min(1.0, batch - low))  # of executions
        images = (1 - high_share) * low + high_share * (low + 1)
        return ((1 - high_share) * low * self.service_ms(low)
                + high_share * (low + 1) * self.service_ms(low + 1)) / images

    def marginal_ms(self) -> float:
        """Cost one more queued image adds when the model is busy: the
        per-image time at the largest measured batch. On a CPU this is about
        the batch-1 time; on a GPU it is much less (batching pays)."""
        largest = max(self.batch_ms)
        return self.batch_ms[largest] / largest


@dataclass
class LatencyProfile:
    models: dict[str, ModelProfile] = field(default_factory=dict)
    machine: str = ""

    def to_json(self) -> str:
        return json.dumps({
            "version": PROFILE_VERSION, "machine": self.machine,
            "models": {name: {"batch_ms": {str(b): round(ms, 3) for b, ms in p.batch_ms.items()}}
                       for name, p in sorted(self.models.items())},
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LatencyProfile:
        raw = json.loads(text)
        if raw.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {raw.get('version')} != {PROFILE_VERSION}")
        models = {name: ModelProfile({int(b): float(ms) for b, ms in m["batch_ms"].items()})
                  for name, m in raw["models"].items()}
        return cls(models, raw.get("machine", ""))

    @classmethod
    def load(cls, path: Path | None) -> LatencyProfile:
        if path is None or not path.is_file():
            return cls()
        return cls.from_json(path.read_text())

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


def tuned_batching(batching: Batching, profile: ModelProfile | None) -> Batching:
    """Dynamic-batching settings from measurements, bounded by the spec's.

    Waiting for company only pays where a batch costs less than its images
    one by one (GPUs). On a CPU a batch of n costs about n singles, so any
    queue delay is pure added latency: it is set to 0 there.
    """
    if profile is None:
        return batching
    single = profile.service_ms(1)
    if profile.marginal_ms() > 0.7 * single:
        return replace(batching, max_queue_delay_us=0)
    # A quarter of a batch-1 run: enough for a burst to coalesce.
    delay_us = min(batching.max_queue_delay_us, int(single * 1e3 * 0.25))
    return replace(batching, max_queue_delay_us=delay_us)


def machine_id() -> str:
    return f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()
