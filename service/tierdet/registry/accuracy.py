"""Measured accuracy records: what `tierdet eval` writes and the gateway exports.

``tierdet eval`` appends :class:`EvalRecord` s to an :class:`EvalReport`
JSON file. The gateway reads every report in its evaluation folder
(``TIERDET_EVAL_DIR``) and exports, per (model, tier, dataset, source), the
latest and the previous figures as gauges, so an alert can fire when a new
evaluation comes in lower than the one before. Kept free of numpy and
pycocotools: the serving path imports it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

SCHEMA_VERSION = 1

Source = Literal["gateway", "onnx", "torch", "ground-truth"]
# Gauge label for each AP field, in pycocotools' stats order.
METRIC_LABELS = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "ap_small": "APs",
                 "ap_medium": "APm", "ap_large": "APl"}


@dataclass(frozen=True)
class APResult:
    """COCO bbox AP figures (0..1; -1 where the split has no ground truth of that size)."""

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float

    @classmethod
    def from_stats(cls, stats: Sequence[float]) -> APResult:
        return cls(*(round(float(s), 4) for s in stats[:6]))


@dataclass(frozen=True)
class EvalRecord:
    """One measured AP: what was evaluated, on what, how, and when.

    ``model`` is the model that answered (for a tier: the one that answered
    most images; ``models`` has the full count). ``missed``: images the gateway
    shed or answered late (by error code); they count as found nothing, so the
    AP is what a user with that budget got.
    """

    model: str
    tier: str | None
    source: Source
    dataset: str
    split: str
    images: int
    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    evaluated_at: str  # ISO 8601, UTC
    models: dict[str, int] = field(default_factory=dict)
    onnx: str | None = None
    missed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, result: APResult, *, model: str, tier: str | None, source: Source,
           dataset: str, split: str, images: int, models: dict[str, int] | None = None,
           onnx: str | None = None, evaluated_at: str | None = None,
           missed: dict[str, int] | None = None) -> EvalRecord:
        return cls(model=model, tier=tier, source=source, dataset=dataset, split=split,
                   images=images, **asdict(result), evaluated_at=evaluated_at or _now(),
                   models=dict(models if models is not None else {model: images}),
                   onnx=onnx, missed=dict(missed or {}))

    @property
    def result(self) -> APResult:
        return APResult(self.ap, self.ap50, self.ap75, self.ap_small, self.ap_medium,
                        self.ap_large)

    def key(self) -> tuple[str, str, str, str]:
        return self.model, self.tier or "", self.dataset, self.source

    def metrics(self) -> dict[str, float]:
        """Gauge label -> value; size ranges without ground truth (-1) left out."""
        return {label: getattr(self, name) for name, label in METRIC_LABELS.items()
                if getattr(self, name) >= 0}

    @property
    def timestamp(self) -> float:
        return dt.datetime.fromisoformat(self.evaluated_at).timestamp()


@dataclass
class EvalReport:
    records: list[EvalRecord] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"schema_version": self.schema_version,
                "records": [asdict(r) for r in self.records]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(path)  # the gateway never reads half a file
        return path

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        body = json.loads(path.read_text())
        if body.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {body.get('schema_version')}, "
                             f"expected {SCHEMA_VERSION}")
        known = {f.name for f in fields(EvalRecord)}
        return cls([EvalRecord(**{k: v for k, v in r.items() if k in known})
                    for r in body["records"]])


def load_records(folder: Path | None) -> list[EvalRecord]:
    """Every record of every readable report in ``folder``, oldest first.
    Unreadable files are skipped: one bad file must not blank the gauges."""
    if folder is None or not folder.is_dir():
        return []
    records: list[EvalRecord] = []
    for path in folder.glob("*.json"):
        try:
            records += EvalReport.load(path).records
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return sorted(records, key=lambda r: r.timestamp)


def latest_and_previous(records: list[EvalRecord]
                        ) -> dict[tuple[str, str, str, str], tuple[EvalRecord, EvalRecord | None]]:
    """Per (model, tier, dataset, source): the newest record and the one before it."""
    history: dict[tuple[str, str, str, str], list[EvalRecord]] = {}
    for record in records:
        history.setdefault(record.key(), []).append(record)
    return {k: (v[-1], v[-2] if len(v) > 1 else None) for k, v in history.items()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
