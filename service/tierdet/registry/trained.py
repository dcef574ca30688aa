"""Models tierdet trains itself on its synthetic shapes data set.

Their specs are ordinary :class:`tierdet.registry.specs.ModelSpec` values (the
same exporter, Triton configs and gateway serve them), with two differences the
reader must not miss:

* ``labels`` is :data:`tierdet.registry.labels.SHAPES` (6 classes), not COCO;
* ``published_ap`` is None: nothing is published. Their AP (pycocotools,
  IoU .50:.95, on the synthetic val split, through the gateway) is in the
  checkpoint's sidecar ``weights/<checkpoint>.json`` with the command that
  measured it; :func:`sidecar_ap` reads it, ``tierdet build`` records it in
  the built model's provenance, and the gateway's router ranks by it.

Checkpoints are plain fp16 state_dicts in the layout the exporter already
loads (effdet's own keys; DAMO-YOLO's unfused, official-style keys), so
``tierdet build --models <name> --weights weights/<file>`` needs no loader
of its own.

Their specs are written in ``tierdet.registry.specs`` (``TRAINED``), beside
every other: this module adds the checkpoints and what was measured on them,
and imports ``specs``, never the other way round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tierdet.registry.specs import DAMOYOLO_SHAPES, EFFDET_SHAPES, TRAINED, ModelSpec
from tierdet.registry.specs import SHAPES_INPUT_SIZE as INPUT_SIZE

# Shipped checkpoints (repository-relative) with their training sidecars beside them.
CHECKPOINTS: dict[str, str] = {name: f"weights/{name}.fp16.pt"
                               for name in (EFFDET_SHAPES, DAMOYOLO_SHAPES)}


@dataclass(frozen=True)
class MeasuredAP:
    """AP (0..1) a checkpoint measured through the gateway, and on what."""

    ap: float
    dataset: str


def sidecar_path(checkpoint: Path) -> Path:
    """The JSON written beside a checkpoint: training command, seed, AP curve,
    and (``serving_eval``) the AP measured through the real stack."""
    return checkpoint.with_suffix(".json")


def sidecar_ap(checkpoint: Path) -> MeasuredAP | None:
    """The gateway-path AP recorded beside ``checkpoint``, if any."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return None
    try:
        records = json.loads(path.read_text())["serving_eval"]["records"]
        (record,) = [r for r in records if r["source"] == "gateway" and not r.get("tier")]
        return MeasuredAP(float(record["ap"]), str(record["dataset"]))
    except (KeyError, TypeError, ValueError):
        return None


def trained_specs() -> dict[str, ModelSpec]:
    return dict(TRAINED)


def trained_spec(name: str) -> ModelSpec:
    try:
        return trained_specs()[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a tierdet-trained model; known: "
                       f"{', '.join(trained_specs())}") from None


__all__ = ["CHECKPOINTS", "DAMOYOLO_SHAPES", "EFFDET_SHAPES", "INPUT_SIZE", "MeasuredAP",
           "sidecar_ap", "sidecar_path", "trained_spec", "trained_specs"]
