"""Shared in-graph post-processing: top-k candidates, per-class NMS, top-K.

Every family hands over decoded boxes and per-class scores; this module
turns them into the service's fixed output ``[B, K, 6]`` rows of
(x1, y1, x2, y2, score, class). Rows past the last detection have score 0
and class -1, so the wire never carries raw anchors.
"""

from __future__ import annotations

import torch
from torch import nn

from tierdet.build.detection_head import LOGIT_FLOOR, PROBABILITY_FLOOR, SUPPRESSED
from tierdet.build.export.nms import nms_keep


class DetectionHead(nn.Module):
    def __init__(self, pre_nms_top_k: int, max_detections: int, iou_threshold: float,
                 scores_are_logits: bool, input_size: int | None = None) -> None:
        super().__init__()
        # Candidates are clipped to the input frame (None: not clipped). A box
        # past the frame means nothing to the caller, and an unbounded one (a
        # regression's exp() on an odd input reaches 1e14 or inf) leaves fp16's
        # range on TensorRT; inside the frame fp16 keeps 1 px up to 2048.
        self.input_size = input_size
        self.pre_nms_top_k = pre_nms_top_k
        self.max_detections = max_detections
        self.iou_threshold = iou_threshold
        self.scores_are_logits = scores_are_logits

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """boxes [B, N, 4] xyxy input pixels; scores [B, N, C] -> [B, K, 6]."""
        num_classes = scores.shape[2]
        # Rank every (anchor, class) pair, as effdet and DAMO-YOLO do. Ranking
        # and NMS run on the scores as given: for logits that avoids the ties
        # sigmoid makes near 1.0 in float32 (tied scores leave NMS order, and
        # so which box survives, to the backend); sigmoid is monotonic, so it
        # is applied to the final rows only.
        top_scores, anchor, cls = self._best_pairs(scores)
        return self._select(boxes, top_scores, anchor, cls, num_classes)

    def _best_pairs(self, scores: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``pre_nms_top_k`` best (anchor, class) pairs: scores, anchors, classes.

        In two steps where that is less work (D0: 49,104 anchors x 90 classes,
        one TopK over 4.4 M pairs took 17 ms of its ~120 ms on ONNX Runtime's
        CPU): the best pairs all lie among the k anchors whose own best pair is
        highest (an anchor outside them is beaten by k pairs, one from each),
        so the pairs of those k anchors are ranked instead. The same pairs;
        only the order of tied scores may differ."""
        batch, anchors, num_classes = scores.shape
        k = self.pre_nms_top_k
        if k >= anchors:
            top_scores, idx = scores.reshape(batch, -1).topk(k, dim=1)
            return top_scores, idx // num_classes, idx % num_classes
        _, near = scores.amax(dim=2).topk(k, dim=1)  # [B, k] anchors
        pairs = scores.gather(1, near.unsqueeze(2).expand(-1, -1, num_classes))
        top_scores, idx = pairs.reshape(batch, -1).topk(k, dim=1)
        return top_scores, near.gather(1, idx // num_classes), idx % num_classes

    def forward_best_class(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """As ``forward``, each box with its best class only (YOLOX's own
        evaluation): ranks N boxes instead of N x C pairs, the same candidates
        without scoring C - 1 pairs per box that could only lose."""
        best, classes = (t.squeeze(2) for t in scores.topk(1, dim=2))  # TopK: TensorRT's
        top_scores, anchor = best.topk(min(self.pre_nms_top_k, best.shape[1]), dim=1)
        return self._select(boxes, top_scores, anchor, classes.gather(1, anchor),
                            scores.shape[2])

    def _select(self, boxes: torch.Tensor, top_scores: torch.Tensor, anchor: torch.Tensor,
                cls: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The ranked candidates (score, anchor, class) -> NMS -> [B, K, 6]."""
        cand = boxes.gather(1, anchor.unsqueeze(2).expand(-1, -1, 4))
        if self.input_size is not None:
            cand = cand.clamp(0.0, float(self.input_size))
        floor = LOGIT_FLOOR if self.scores_are_logits else PROBABILITY_FLOOR
        keep = nms_keep(cand, top_scores, cls, num_classes, self.iou_threshold, floor)
        ranked = torch.where(keep > 0, top_scores, torch.full_like(top_scores, SUPPRESSED))
        final_scores, final_idx = ranked.topk(self.max_detections, dim=1)
        valid = final_scores > SUPPRESSED
        if self.scores_are_logits:
            final_scores = final_scores.sigmoid()
        # A probability of exactly 0 is no detection either (rows with score 0
        # are the padding of the fixed-size output).
        valid = valid & (final_scores > 0)
        out_boxes = cand.gather(1, final_idx.unsqueeze(2).expand(-1, -1, 4))
        out_cls = cls.gather(1, final_idx).to(cand.dtype)
        out_boxes = torch.where(valid.unsqueeze(2), out_boxes, torch.zeros_like(out_boxes))
        out_scores = torch.where(valid, final_scores, torch.zeros_like(final_scores))
        out_cls = torch.where(valid, out_cls, torch.full_like(out_cls, -1.0))
        return torch.cat([out_boxes, out_scores.unsqueeze(2), out_cls.unsqueeze(2)], dim=2)


class ExportWrapper(nn.Module):
    """uint8 NHWC RGB pixels -> normalise -> network -> detections [B, K, 6].

    ``network`` maps a float NCHW tensor to (boxes [B,N,4], scores [B,N,C]).
    """

    mean: torch.Tensor  # buffers (register_buffer below)
    inv_std: torch.Tensor

    def __init__(self, network: nn.Module, head: DetectionHead,
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.network = network
        self.head = head
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> the network's float NCHW input."""
        # Cast first: TensorRT takes a uint8 network input only straight into a Cast.
        x = images.float().permute(0, 3, 1, 2)
        return (x - self.mean) * self.inv_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        boxes, scores = self.network(self.normalise(images))
        return self.head(boxes, scores)
