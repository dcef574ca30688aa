"""Models tierdet trains itself on its synthetic shapes data set.

Their specs are ordinary :class:`tierdet.specs.ModelSpec` values (the same
exporter, Triton configs and gateway serve them), with two differences the
reader must not miss:

* ``labels`` is :data:`tierdet.datasets.synthetic.SHAPES` (6 classes), not COCO;
* ``coco_ap`` holds AP (percent, pycocotools, IoU .50:.95) measured on the
  synthetic val split through the gateway, NOT on COCO. The figure and the
  command that produced it are in ``weights/<checkpoint>.json``.

Checkpoints are plain fp16 state_dicts in the layout the exporter already
loads (effdet's own keys; DAMO-YOLO's unfused, official-style keys), so
``tierdet build --models <name> --weights weights/<file>`` needs no loader
of its own.

This module must stay importable from ``tierdet.specs`` (cheap, no torch), and
it imports ``tierdet.specs`` only inside :func:`trained_specs` so that either
module may be imported first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tierdet.datasets.synthetic import SHAPES

if TYPE_CHECKING:
    from tierdet.specs import ModelSpec

INPUT_SIZE = 256
EFFDET_SHAPES = "efficientdet-d0-shapes"
DAMOYOLO_SHAPES = "damoyolo-ns-shapes"
# Shipped checkpoints (repository-relative) with their training sidecars beside them.
CHECKPOINTS: dict[str, str] = {name: f"weights/{name}.fp16.pt"
                               for name in (EFFDET_SHAPES, DAMOYOLO_SHAPES)}

# Synthetic val AP (percent) through the gateway: the serving_eval records in
# weights/<checkpoint>.json (tests/test_eval_trained.py keeps the two equal).
MEASURED_AP: dict[str, float] = {EFFDET_SHAPES: 67.7, DAMOYOLO_SHAPES: 84.8}


def trained_specs() -> dict[str, ModelSpec]:
    from tierdet.specs import IMAGENET, RAW_STRETCH, Family, ModelSpec

    # params_m: counted on the 6-class networks (torch, before RepConv fusion).
    specs = (
        # tf_efficientdet_d0 unchanged but for the class count and the input
        # size (anchors follow the size): effdet's create_model builds it.
        ModelSpec(name=EFFDET_SHAPES, family=Family.EFFICIENTDET, arch="tf_efficientdet_d0",
                  input_size=INPUT_SIZE, preprocessing=IMAGENET, labels=SHAPES,
                  coco_ap=MEASURED_AP[EFFDET_SHAPES], params_m=3.83, official_weights=None),
        ModelSpec(name=DAMOYOLO_SHAPES, family=Family.DAMOYOLO, arch="ns",
                  input_size=INPUT_SIZE, preprocessing=RAW_STRETCH, labels=SHAPES,
                  coco_ap=MEASURED_AP[DAMOYOLO_SHAPES], params_m=1.38, official_weights=None,
                  nms_iou=0.65),
    )
    return {s.name: s for s in specs}


def trained_spec(name: str) -> ModelSpec:
    try:
        return trained_specs()[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a tierdet-trained model; known: "
                       f"{', '.join(trained_specs())}") from None


__all__ = ["CHECKPOINTS", "DAMOYOLO_SHAPES", "EFFDET_SHAPES", "INPUT_SIZE", "MEASURED_AP",
           "trained_spec", "trained_specs"]
