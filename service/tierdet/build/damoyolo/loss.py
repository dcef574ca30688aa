"""Training losses for DAMO-YOLO's ZeroHead, written for tierdet.

Facts taken from reading tinyvision/damo-yolo (commit 319572e,
``damo/base_models/heads/zero_head.py``, ``core/ota_assigner.py``,
``losses/gfocal_loss.py``); the code here is our own:

* Class scores are trained with Quality Focal Loss (beta 2, weight 1.0):
  the target of a positive prediction is the IoU of its decoded box with
  its ground truth, on that class only; every other entry's target is 0.
  Normalised by the number of positives.
* Boxes: GIoU loss (weight 2.0) on decoded boxes and Distribution Focal Loss
  (weight 0.25) on each side's ``reg_max + 1`` logits, both weighted per
  positive by its (detached) highest class score and normalised by the sum
  of those weights (at least 1).
* DFL targets are side distances in stride units, clamped below ``reg_max``.
* Anchor points sit at ``(x, y) * stride``, no half-cell offset, as in
  :mod:`tierdet.build.damoyolo.head`.

The assigner is a plain SimOTA ("AlignOTA" in DAMO-YOLO):

1. candidates: points inside a ground-truth box or within 2.5 strides of
   its centre (per axis);
2. cost of (candidate, gt) = QFL-style class cost (BCE of the scores
   against the one-hot-times-IoU target, times |target - score|^2, summed
   over classes) + 3 * -log(IoU) + a large penalty unless the point is both
   inside the box and near its centre;
3. each gt takes its k cheapest candidates, k = int(sum of its 10 best
   IoUs), at least 1; a point claimed by several gts keeps the cheapest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
from torch import nn

from .head import ZeroHead, anchor_points, conv_bias, convs

QFL_BETA = 2.0
WEIGHT_QFL, WEIGHT_GIOU, WEIGHT_DFL = 1.0, 2.0, 0.25
CENTER_RADIUS = 2.5
CANDIDATE_TOPK = 10
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e5
PRIOR_PROB = 0.01  # initial class score, as the official head init


@dataclass
class HeadOutputs:
    """ZeroHead outputs before sigmoid/softmax, flattened over all levels."""

    cls_logits: torch.Tensor  # [B, N, C]
    reg_logits: torch.Tensor  # [B, N, 4, R + 1]
    points: torch.Tensor  # [N, 2] anchor points, input pixels
    strides: torch.Tensor  # [N]

    def distances(self, project: torch.Tensor) -> torch.Tensor:
        """Expected side distances in pixels [B, N, 4]."""
        return (self.reg_logits.softmax(-1) @ project) * self.strides[:, None]

    def boxes(self, project: torch.Tensor) -> torch.Tensor:
        """Decoded x1 y1 x2 y2 [B, N, 4], exactly as ZeroHead.forward decodes."""
        dist = self.distances(project)
        return torch.cat((self.points - dist[..., :2], self.points + dist[..., 2:]), -1)


def head_outputs(head: ZeroHead, features: Sequence[torch.Tensor]) -> HeadOutputs:
    """The same per-level computation as ZeroHead.forward, stopped before
    sigmoid and softmax (the losses want logits)."""
    cls_all, reg_all, points, strides = [], [], [], []
    for i, feature in enumerate(features):
        height, width = feature.shape[-2:]
        stride = head.strides[i]
        cls_all.append(head.gfl_cls[i](feature).flatten(2).transpose(1, 2))
        reg = head.scales[i](head.gfl_reg[i](feature)).flatten(2).transpose(1, 2)
        reg_all.append(reg.unflatten(-1, (4, head.reg_max + 1)))
        points.append(anchor_points(height, width, stride, feature.device))
        strides.append(torch.full((height * width,), float(stride), device=feature.device))
    return HeadOutputs(torch.cat(cls_all, 1), torch.cat(reg_all, 1), torch.cat(points),
                       torch.cat(strides))


@torch.no_grad()
def init_head_(head: ZeroHead) -> None:
    """Official head init: small weights, class bias at a 1% prior."""
    bias = -float(torch.log(torch.tensor((1 - PRIOR_PROB) / PRIOR_PROB)))
    for conv in (*convs(head.gfl_cls), *convs(head.gfl_reg)):
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv_bias(conv))
    for conv in convs(head.gfl_cls):
        conv_bias(conv).fill_(bias)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes [N, 4] x [M, 4] -> [N, M]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of aligned xyxy boxes [K, 4] -> [K]."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(-1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(-1)
    union = area_p + area_t - inter + 1e-9
    hull = (torch.maximum(pred[:, 2:], target[:, 2:])
            - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1) + 1e-9
    return 1 - (inter / union - (hull - union) / hull)


@dataclass
class Assignment:
    positives: torch.Tensor  # [P] indices into the N predictions
    gt_index: torch.Tensor  # [P] index of each positive's ground truth
    iou: torch.Tensor  # [P] IoU of its decoded box with that ground truth


@torch.no_grad()
def assign(scores: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor,
           strides: torch.Tensor, gt_boxes: torch.Tensor, gt_slots: torch.Tensor
           ) -> Assignment:
    """SimOTA for one image (see the module docstring). ``scores`` [N, C] are
    probabilities, ``boxes`` [N, 4] decoded predictions."""
    empty = Assignment(*(torch.zeros(0, dtype=t, device=scores.device)
                         for t in (torch.long, torch.long, scores.dtype)))
    if gt_boxes.numel() == 0:
        return empty
    px, py = points[:, 0:1], points[:, 1:2]  # [N, 1]
    inside = ((px > gt_boxes[:, 0]) & (py > gt_boxes[:, 1])
              & (px < gt_boxes[:, 2]) & (py < gt_boxes[:, 3]))  # [N, M]
    cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    reach = CENTER_RADIUS * strides[:, None]
    near = ((px - cx).abs() < reach) & ((py - cy).abs() < reach)
    candidates = (inside | near).any(1).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return empty
    ious = box_iou(boxes[candidates], gt_boxes)  # [K, M]
    probs = scores[candidates].clamp(1e-6, 1 - 1e-6)[:, None, :]  # [K, 1, C]
    target = F.one_hot(gt_slots, scores.shape[1]).to(probs.dtype)[None] * ious[..., None]
    cls_cost = (F.binary_cross_entropy(probs.expand_as(target), target, reduction="none")
                * (target - probs).abs().pow(2)).sum(-1)  # [K, M]
    central = (inside & near)[candidates]
    cost = cls_cost + IOU_COST_WEIGHT * -torch.log(ious + 1e-7) + OUTSIDE_COST * ~central
    topk = min(CANDIDATE_TOPK, ious.shape[0])
    dynamic_k = ious.topk(topk, dim=0).values.sum(0).int().clamp(min=1)  # [M]
    matching = torch.zeros_like(cost, dtype=torch.bool)
    for m in range(gt_boxes.shape[0]):
        k = int(min(int(dynamic_k[m]), cost.shape[0]))
        matching[cost[:, m].topk(k, largest=False).indices, m] = True
    # A point claimed twice keeps the ground truth it is cheapest for.
    contested = matching.sum(1) > 1
    if contested.any():
        best = cost[contested].argmin(1)
        matching[contested] = F.one_hot(best, cost.shape[1]).bool()
    chosen = matching.any(1)
    gt_index = matching[chosen].float().argmax(1)
    return Assignment(candidates[chosen], gt_index, ious[chosen, gt_index])


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed QFL: BCE against a soft target, scaled by |target - sigmoid|^beta."""
    scale = (target - logits.sigmoid()).abs().pow(QFL_BETA)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale).sum()


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-side DFL: logits [K, R + 1], continuous target in [0, R) -> [K]."""
    left = target.floor().long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, right, reduction="none") * w_right)


def damoyolo_loss(out: HeadOutputs, project: torch.Tensor,
                  targets: Sequence[tuple[torch.Tensor, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    """Losses for a batch. ``targets[b]`` = (boxes [M, 4] xyxy input pixels,
    slots [M]). Returns ``loss`` (the sum to back-propagate) and its parts."""
    boxes = out.boxes(project)
    scores = out.cls_logits.detach().sigmoid()
    reg_max = out.reg_logits.shape[-1] - 1
    qfl_target = torch.zeros_like(out.cls_logits)
    pos_b, pos_n, pos_gt = [], [], []
    for b, (gt_boxes, gt_slots) in enumerate(targets):
        a = assign(scores[b], boxes[b].detach(), out.points, out.strides, gt_boxes, gt_slots)
        qfl_target[b, a.positives, gt_slots[a.gt_index]] = a.iou
        pos_b.append(torch.full_like(a.positives, b))
        pos_n.append(a.positives)
        pos_gt.append(gt_boxes[a.gt_index])
    bi, ni, gt = torch.cat(pos_b), torch.cat(pos_n), torch.cat(pos_gt)
    num_pos = max(float(bi.numel()), 1.0)
    qfl = quality_focal_loss(out.cls_logits, qfl_target) / num_pos
    if bi.numel() == 0:
        zero = out.reg_logits.sum() * 0.0
        return {"loss": WEIGHT_QFL * qfl + zero, "qfl": qfl, "giou": zero, "dfl": zero}
    weight = scores[bi, ni].max(-1).values
    norm = max(float(weight.sum()), 1.0)
    giou = (giou_loss(boxes[bi, ni], gt) * weight).sum() / norm
    stride = out.strides[ni][:, None]
    point = out.points[ni]
    sides = torch.cat((point - gt[:, :2], gt[:, 2:] - point), 1) / stride  # l t r b
    sides = sides.clamp(0, reg_max - 0.01)
    dfl = distribution_focal_loss(out.reg_logits[bi, ni].reshape(-1, reg_max + 1),
                                  sides.reshape(-1))
    dfl = (dfl * weight.repeat_interleave(4)).sum() / (4 * norm)
    loss = WEIGHT_QFL * qfl + WEIGHT_GIOU * giou + WEIGHT_DFL * dfl
    # The weighted box losses grow while the scores they are weighted by
    # rise, so early on the total is no progress measure; the plain mean
    # 1 - IoU of the positives is (logged, never back-propagated).
    miss = 1 - qfl_target[bi, ni].max(-1).values  # the IoU each positive was assigned
    return {"loss": loss, "qfl": qfl.detach(), "giou": giou.detach(), "dfl": dfl.detach(),
            "1-iou": miss.mean()}
