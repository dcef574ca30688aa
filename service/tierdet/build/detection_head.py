"""The detection head, written as ONNX nodes with onnx alone (no torch): decoded
boxes and per-class scores in, the service's ``[B, K, 6]`` rows out.

    boxes [B, N, 4] xyxy input pixels, scores [B, N, C]
      -> the ``pre_nms_top_k`` best candidates: every (box, class) pair
         (multi-label), or each box with its best class
      -> clipped to the input frame
      -> per-class NMS (one ``NonMaxSuppression`` node)
      -> the ``max_detections`` best kept, as (x1, y1, x2, y2, score, class);
         rows past the last detection are score 0, class -1

A card's build writes its graph's ends with it in well under a second, where
tracing torch modules took seconds and a torch import (a card added while
serving shares the gateway's cores with admitted requests). The graph keeps
the rules TensorRT's ONNX parser sets (``tierdet.build.trt_compat`` checks
them): constant K, axes and slices; classes separated by the NMS node itself,
not by shifting each class's boxes (shifts reach tens of thousands of pixels,
where fp16 rounds to 32 px); an explicit score threshold (without one ONNX
Runtime applies none and TensorRT 0, which would drop every negative logit);
no ``reduction`` attribute on ScatterND.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OPSET = 18
IR_VERSION = 10  # what ONNX Runtime and TensorRT 10's parser both read
# NMS considers only candidates scoring above these (the zoo's torch head too, in
# tierdet.build.export.postprocess). Below them a candidate could not be returned
# anyway: a logit under -104 has a float32 sigmoid of exactly 0, and a score of 0 is
# the output's padding; and a candidate only suppresses lower ones.
LOGIT_FLOOR = -104.0
PROBABILITY_FLOOR = 0.0
# Rank of a suppressed candidate: below any kept score, and finite in fp16 (TensorRT's
# --fp16 may run these layers in half precision; -inf or -1e30 would leave its range).
SUPPRESSED = -60000.0


class Nodes:
    """An ONNX graph written node by node: ``op`` adds a node and returns the
    name of its output (a list of names for several); ``const`` adds a tensor."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | None = None,
           **attributes: Any) -> Any:
        from onnx import helper

        names = [out] if out else [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attributes))
        return names[0] if outputs == 1 else names

    def model(self, inputs: list[Any], outputs: list[Any], name: str) -> Any:
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                 ir_version=IR_VERSION, producer_name="tierdet")


@dataclass(frozen=True)
class Head:
    """What the head keeps: its settings from the model's card or spec."""

    num_classes: int
    pre_nms_top_k: int
    max_detections: int
    iou_threshold: float
    scores_are_logits: bool
    multi_label: bool = True
    input_size: int | None = None  # candidates clipped to [0, size]; None: not clipped

    def detections(self, g: Nodes, boxes: str, scores: str, anchors: int,
                   out: str | None = None) -> str:
        """boxes [B, N, 4], scores [B, N, C] (N = ``anchors``) -> [B, K, 6]."""
        if self.multi_label:
            top, anchor, cls = self._best_pairs(g, scores, anchors)
        else:
            top, anchor, cls = self._best_boxes(g, scores, anchors)
        return self._select(g, boxes, top, anchor, cls, out)

    def _best_pairs(self, g: Nodes, scores: str, anchors: int) -> tuple[str, str, str]:
        """The best (anchor, class) pairs. In two steps where that is less work (D0:
        49,104 anchors x 90 classes): the best k pairs all lie among the k anchors
        whose own best pair is highest (one outside them is beaten by k pairs, one
        from each), so only those anchors' pairs are ranked."""
        c = self.num_classes
        k = min(self.pre_nms_top_k, anchors * c)
        if k >= anchors:
            top, idx = g.op("TopK", g.op("Reshape", scores, g.ints(0, -1)), g.ints(k),
                            axis=1, outputs=2)
            return top, g.op("Div", idx, g.ints(c)), g.op("Mod", idx, g.ints(c))
        _, near = g.op("TopK", g.op("ReduceMax", scores, g.ints(2), keepdims=0), g.ints(k),
                       axis=1, outputs=2)
        pairs = g.op("GatherElements", scores, _rows(g, near, c), axis=1)
        top, idx = g.op("TopK", g.op("Reshape", pairs, g.ints(0, -1)), g.ints(k), axis=1,
                        outputs=2)
        anchor = g.op("GatherElements", near, g.op("Div", idx, g.ints(c)), axis=1)
        return top, anchor, g.op("Mod", idx, g.ints(c))

    def _best_boxes(self, g: Nodes, scores: str, anchors: int) -> tuple[str, str, str]:
        """Each box with its best class (YOLOX's own evaluation): N candidates, not
        N x C pairs of which C - 1 per box could only lose."""
        best, classes = (g.op("Squeeze", t, g.ints(2))
                         for t in g.op("TopK", scores, g.ints(1), axis=2, outputs=2))
        top, anchor = g.op("TopK", best, g.ints(min(self.pre_nms_top_k, anchors)), axis=1,
                           outputs=2)
        return top, anchor, g.op("GatherElements", classes, anchor, axis=1)

    def _select(self, g: Nodes, boxes: str, top: str, anchor: str, cls: str,
                out: str | None) -> str:
        """Ranked candidates (score, anchor, class) -> NMS -> [B, K, 6]."""
        cand = g.op("GatherElements", boxes, _rows(g, anchor, 4), axis=1)
        if self.input_size is not None:
            cand = g.op("Clip", cand, g.const(0.0), g.const(float(self.input_size)))
        floor = LOGIT_FLOOR if self.scores_are_logits else PROBABILITY_FLOOR
        keep = nms_keep(g, cand, top, cls, self.num_classes, self.iou_threshold, floor)
        ranked = g.op("Where", g.op("Greater", keep, g.const(0.0)), top, g.const(SUPPRESSED))
        final, final_idx = g.op("TopK", ranked, g.ints(self.max_detections), axis=1,
                                outputs=2)
        valid = g.op("Greater", final, g.const(SUPPRESSED))
        if self.scores_are_logits:
            final = g.op("Sigmoid", final)
        # A probability of exactly 0 is no detection either (score 0 is the padding).
        valid = g.op("And", valid, g.op("Greater", final, g.const(0.0)))
        out_boxes = g.op("GatherElements", cand, _rows(g, final_idx, 4), axis=1)
        out_cls = g.op("Cast", g.op("GatherElements", cls, final_idx, axis=1), to=1)  # FLOAT
        column = g.ints(2)
        out_boxes = g.op("Where", g.op("Unsqueeze", valid, column), out_boxes, g.const(0.0))
        out_scores = g.op("Where", valid, final, g.const(0.0))
        out_cls = g.op("Where", valid, out_cls, g.const(-1.0))
        return g.op("Concat", out_boxes, g.op("Unsqueeze", out_scores, column),
                    g.op("Unsqueeze", out_cls, column), axis=2, out=out)


def _rows(g: Nodes, index: str, width: int) -> str:
    """Indices [B, k] -> [B, k, width], to gather whole rows with GatherElements."""
    return g.op("Expand", g.op("Unsqueeze", index, g.ints(2)), g.ints(1, 1, width))


def nms_keep(g: Nodes, boxes: str, scores: str, classes: str, num_classes: int,
             iou_threshold: float, score_threshold: float) -> str:
    """boxes [B, N, 4], scores [B, N], classes [B, N] -> keep mask [B, N] (1.0 kept):
    NMS within each class, over candidates scoring above ``score_threshold``."""
    # [B, C, N]: a candidate's score in its own class, the threshold (never selected:
    # NMS keeps only scores above it) in every other.
    own = g.op("Equal", g.op("Unsqueeze", classes, g.ints(1)),
               g.op("Unsqueeze", g.ints(*range(num_classes)), g.ints(0, 2)))
    floor = g.const(score_threshold)
    per_class = g.op("Where", own, g.op("Unsqueeze", scores, g.ints(1)), floor)
    up_to_n = g.op("Shape", scores, start=1, end=2)  # keep up to N: the mask decides
    selected = g.op("NonMaxSuppression", boxes, per_class, up_to_n,
                    g.const([iou_threshold]), g.const([score_threshold]))  # [M, 3]
    batch_and_box = g.op("Gather", selected, g.ints(0, 2), axis=1)
    ones = g.op("Expand", g.const(1.0), g.op("Shape", selected, start=0, end=1))
    zeros = g.op("Mul", scores, g.const(0.0))
    return g.op("ScatterND", zeros, batch_and_box, ones)
