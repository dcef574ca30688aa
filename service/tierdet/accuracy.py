"""Measured accuracy, as the gateway sees it: evaluation records -> gauges.

``tierdet eval`` writes one JSON record per evaluated (model, tier,
dataset) into the evaluation folder (``TIERDET_EVAL_DIR``); the gateway
reads the folder and exports the latest and previous figures, so an alert
can fire when a new evaluation comes in lower than the one before.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EvalRecord:
    model: str
    dataset: str
    metrics: dict[str, float]  # AP, AP50, AP75, APs, APm, APl (0..1)
    tier: str = ""  # empty: the model was pinned
    source: str = "gateway"  # "gateway" (full serving path) or "onnx" (bare model)
    images: int = 0
    evaluated_at: float = field(default_factory=time.time)

    def key(self) -> tuple[str, str, str, str]:
        return self.model, self.tier, self.dataset, self.source

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.evaluated_at))
        name = f"{self.model}_{self.tier or 'pinned'}_{self.dataset}_{self.source}_{stamp}.json"
        path = folder / name
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def load_records(folder: Path | None) -> list[EvalRecord]:
    """Every readable record in ``folder``, oldest first; unreadable files are skipped."""
    if folder is None or not folder.is_dir():
        return []
    records = []
    for path in folder.glob("*.json"):
        try:
            records.append(EvalRecord(**json.loads(path.read_text())))
        except (ValueError, TypeError):
            continue
    return sorted(records, key=lambda r: r.evaluated_at)


def latest_and_previous(records: list[EvalRecord]
                        ) -> dict[tuple[str, str, str, str], tuple[EvalRecord, EvalRecord | None]]:
    """Per (model, tier, dataset, source): the newest record and the one before it."""
    history: dict[tuple[str, str, str, str], list[EvalRecord]] = {}
    for record in records:
        history.setdefault(record.key(), []).append(record)
    return {k: (v[-1], v[-2] if len(v) > 1 else None) for k, v in history.items()}
