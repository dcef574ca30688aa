"""Per-class non-maximum suppression as one ONNX ``NonMaxSuppression`` node.

torch.export cannot trace data-dependent NMS, so NMS is a custom op with a
fixed-shape result: a keep mask ``[B, N]`` (1.0 kept, 0.0 suppressed). In
eager mode torchvision computes it; in the exported graph it is translated
to ``NonMaxSuppression`` + ``ScatterND``, which ONNX Runtime and TensorRT
both implement natively. The graph is written the way TensorRT's ONNX parser
takes it (``tierdet.build.trt_compat`` checks each rule):

- classes are separated by the NMS node itself (scores ``[B, C, N]``, each
  candidate scoring only in its own class), not by shifting each class's
  boxes to its own region: such shifts reach tens of thousands of pixels,
  where fp16 (TensorRT's ``--fp16``) has a spacing of 32 px or overflows;
- the score threshold is an explicit input: without it ONNX Runtime applies
  none and TensorRT applies 0, which would drop every negative logit;
- ScatterND carries no ``reduction`` attribute (the parser refuses any).
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as opset


@torch.library.custom_op("tierdet::nms_keep", mutates_args=())
def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
             num_classes: int, iou_threshold: float, score_threshold: float) -> torch.Tensor:
    """boxes [B, N, 4] xyxy, scores [B, N], classes [B, N] in [0, num_classes) ->
    keep mask [B, N] (float): NMS within each class, over candidates scoring
    above ``score_threshold``."""
    from torchvision.ops import batched_nms

    mask = torch.zeros_like(scores)
    for b in range(boxes.shape[0]):
        above = (scores[b] > score_threshold).nonzero().squeeze(1)
        kept = batched_nms(boxes[b, above], scores[b, above], classes[b, above], iou_threshold)
        mask[b, above[kept]] = 1.0
    return mask


@nms_keep.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, num_classes: int,
      iou_threshold: float, score_threshold: float) -> torch.Tensor:
    return torch.empty_like(scores)


def nms_keep_onnx(boxes: FLOAT, scores: FLOAT, classes: INT64, num_classes: int,
                  iou_threshold: float, score_threshold: float) -> Any:
    # onnxscript's stubs type each op's result as a union of every tensor type,
    # which no op's signature accepts: the values are checked by the exporter.
    op: Any = opset
    # [B, C, N]: a candidate's score in its own class, the threshold (never
    # selected: NMS keeps only scores above it) in every other.
    class_ids = op.Constant(value_ints=list(range(num_classes)))
    own = op.Equal(op.Unsqueeze(classes, op.Constant(value_ints=[1])),
                   op.Unsqueeze(class_ids, op.Constant(value_ints=[0, 2])))
    floor = op.Constant(value_float=score_threshold)
    scores_bcn = op.Where(own, op.Unsqueeze(scores, op.Constant(value_ints=[1])), floor)
    max_per_class = op.Shape(scores, start=1, end=2)  # keep up to N: the mask decides
    iou = op.Constant(value_floats=[iou_threshold])
    threshold = op.Constant(value_floats=[score_threshold])
    selected = op.NonMaxSuppression(boxes, scores_bcn, max_per_class, iou, threshold)  # [M, 3]
    batch_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    zeros = op.Mul(scores, op.Constant(value_float=0.0))
    return op.ScatterND(zeros, batch_and_box, ones)


def drop_default_reduction(model: Any) -> None:
    """Remove ScatterND's ``reduction="none"``, which the exporter writes out
    although it is the default: TensorRT's parser refuses the attribute."""
    graphs = [model.graph, *model.functions]
    for graph in graphs:
        for node in graph.node:
            if node.op_type == "ScatterND":
                kept = [a for a in node.attribute
                        if not (a.name == "reduction" and a.s in (b"", b"none"))]
                del node.attribute[:]
                node.attribute.extend(kept)


CUSTOM_TRANSLATIONS: dict[Any, Any] = {torch.ops.tierdet.nms_keep.default: nms_keep_onnx}
