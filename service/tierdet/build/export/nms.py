"""Non-maximum suppression as one ONNX ``NonMaxSuppression`` node.

torch.export cannot trace data-dependent NMS, so NMS is a custom op with a
fixed-shape result: a keep mask ``[B, N]`` (1.0 kept, 0.0 suppressed). In
eager mode torchvision computes it; in the exported graph it is translated
to ``NonMaxSuppression`` + ``ScatterND``, which ONNX Runtime and TensorRT
both implement natively.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import FLOAT
from onnxscript import opset18 as opset


@torch.library.custom_op("tierdet::nms_keep", mutates_args=())
def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes [B, N, 4] xyxy, scores [B, N] -> keep mask [B, N] (float)."""
    from torchvision.ops import nms

    mask = torch.zeros_like(scores)
    for b in range(boxes.shape[0]):
        kept = nms(boxes[b], scores[b], iou_threshold)
        mask[b, kept] = 1.0
    return mask


@nms_keep.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return torch.empty_like(scores)


def nms_keep_onnx(boxes: FLOAT, scores: FLOAT, iou_threshold: float) -> Any:
    # onnxscript's stubs type each op's result as a union of every tensor type,
    # which no op's signature accepts: the values are checked by the exporter.
    op: Any = opset
    scores_bcn = op.Unsqueeze(scores, op.Constant(value_ints=[1]))
    max_per_class = op.Shape(scores, start=1, end=2)  # keep up to N: the mask decides
    iou = op.Constant(value_floats=[iou_threshold])
    selected = op.NonMaxSuppression(boxes, scores_bcn, max_per_class, iou)  # [M, 3]
    batch_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    zeros = op.Mul(scores, op.Constant(value_float=0.0))
    return op.ScatterND(zeros, batch_and_box, ones)


CUSTOM_TRANSLATIONS: dict[Any, Any] = {torch.ops.tierdet.nms_keep.default: nms_keep_onnx}
