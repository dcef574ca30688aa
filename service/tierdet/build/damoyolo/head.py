"""ZeroHead of DAMO-YOLO and its box decode.

Per pyramid level the head is just two convs on the neck feature: class logits
and box-side distributions. Each box side (left, top, right, bottom) is
predicted as a discrete distribution over ``reg_max + 1`` bins (GFL's
"distribution focal loss" form); its expectation, times the level stride, is
the distance from the anchor point to that side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from .config import HeadConfig


def convs(branch: nn.ModuleList) -> list[nn.Conv2d]:
    """A head branch's per-level convolutions, typed (a ModuleList yields Modules)."""
    return [cast(nn.Conv2d, conv) for conv in branch]


def conv_bias(conv: nn.Conv2d) -> torch.Tensor:
    """The bias of a head convolution (every one is built with a bias)."""
    assert conv.bias is not None
    return conv.bias


class Scale(nn.Module):
    """Learned scalar multiplier (one per level) on the regression logits."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DistributionIntegral(nn.Module):
    """Expectation of a softmax distribution over the bin values 0..reg_max.

    ``project`` is a buffer only because official checkpoints contain it
    (``head.integral.project``); it always holds 0, 1, ..., reg_max.
    """

    project: torch.Tensor  # a buffer: saved, moved with the module, never trained

    def __init__(self, reg_max: int) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., reg_max + 1) logits -> (...) expected bin value."""
        return torch.matmul(logits.softmax(dim=-1), self.project)


def anchor_points(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    """(H*W, 2) float32 anchor points (x, y) of one level, row-major (y, x).

    DAMO-YOLO puts them at the top-left corner of each cell (``x * stride``,
    no half-cell offset); the trained regression relies on that.
    """
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2) * stride


def num_anchors(input_size: int | tuple[int, int], strides: Sequence[int] = (8, 16, 32)) -> int:
    """Number of predictions N for a square size or an (H, W) input."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    coarsest = max(strides)
    if h % coarsest or w % coarsest:
        # The neck concatenates up/down-sampled maps; other sizes do not line up.
        raise ValueError(f"input size {(h, w)} must be a multiple of {coarsest}")
    return sum((h // s) * (w // s) for s in strides)


class ZeroHead(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.num_classes = cfg.num_classes
        self.reg_max = cfg.reg_max
        self.strides = tuple(cfg.strides)
        pad = cfg.kernel_size // 2
        bins = 4 * (cfg.reg_max + 1)
        self.integral = DistributionIntegral(cfg.reg_max)
        self.gfl_cls = nn.ModuleList(
            nn.Conv2d(c, cfg.num_classes, cfg.kernel_size, padding=pad) for c in cfg.in_channels
        )
        self.gfl_reg = nn.ModuleList(
            nn.Conv2d(c, bins, cfg.kernel_size, padding=pad) for c in cfg.in_channels
        )
        self.scales = nn.ModuleList(Scale() for _ in cfg.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Neck features -> (scores [B, N, C] after sigmoid, boxes [B, N, 4] x1y1x2y2)."""
        scores, distances, points = [], [], []
        for i, feature in enumerate(features):
            height, width = feature.shape[-2:]
            stride = self.strides[i]
            cls_logits = self.gfl_cls[i](feature)  # [B, C, H, W]
            scores.append(cls_logits.sigmoid().flatten(2).transpose(1, 2))
            reg_logits = self.scales[i](self.gfl_reg[i](feature))  # [B, 4*(R+1), H, W]
            # Channels are laid out side-major: side * (R + 1) + bin.
            reg_logits = reg_logits.flatten(2).transpose(1, 2)  # [B, HW, 4*(R+1)]
            reg_logits = reg_logits.unflatten(-1, (4, self.reg_max + 1))
            distances.append(self.integral(reg_logits) * stride)  # [B, HW, 4]
            points.append(anchor_points(height, width, stride, feature.device))
        dist = torch.cat(distances, dim=1)
        anchor = torch.cat(points, dim=0)  # [N, 2], broadcasts over the batch
        boxes = torch.cat((anchor - dist[..., :2], anchor + dist[..., 2:]), dim=-1)
        return torch.cat(scores, dim=1), boxes
