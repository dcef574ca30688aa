"""GiraffeNeckV2 (RepGFPN): the efficient generalised-FPN neck of DAMO-YOLO.

Inputs are the backbone features (strides 8, 16, 32); nodes are named as in
the official code (x3 ... x7) because those names are also the checkpoint keys
(``merge_3``, ``bu_conv13`` ...).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import interpolate

from .config import NeckConfig
from .layers import ConvBNAct, DepthwiseSeparableConv, MobileV3Block, RepConv

# Expansion of the MobileV3 blocks used inside the depthwise (nano) neck.
NECK_MOBILE_EXPANSION = 3.0


class ReverseBlock(nn.Module):
    """Residual block: RepConv 3x3 (to the hidden width) runs first, then a
    plain 3x3 ConvBNAct back to the block width, then the residual add.

    (Attribute names are swapped relative to execution order - ``conv2`` runs
    before ``conv1`` - because that is how the checkpoints name them.)
    """

    def __init__(self, channels: int, hidden_ratio: float, act: str) -> None:
        super().__init__()
        hidden = int(channels * hidden_ratio)
        self.conv1 = ConvBNAct(hidden, channels, 3, act=act)
        self.conv2 = RepConv(channels, hidden, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(self.conv2(x))


class DepthwiseReverseBlock(nn.Module):
    """Nano variant of ReverseBlock: one MobileV3 block (it has its own shortcut)."""

    def __init__(self, channels: int, act: str) -> None:
        super().__init__()
        self.conv = MobileV3Block(channels, channels, NECK_MOBILE_EXPANSION, 1, act, se_slot=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CSPStage(nn.Module):
    """Fusion node: two 1x1 convs split the input; one half goes through
    ``blocks`` residual blocks; the first half and every block output are
    concatenated and mixed by a final 1x1 conv."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, cfg: NeckConfig) -> None:
        super().__init__()
        first = out_ch // 2
        mid = out_ch - first
        self.conv1 = ConvBNAct(in_ch, first, 1, act=cfg.act)
        self.conv2 = ConvBNAct(in_ch, mid, 1, act=cfg.act)
        self.convs = nn.Sequential(
            *(
                DepthwiseReverseBlock(mid, cfg.act)
                if cfg.depthwise
                else ReverseBlock(mid, cfg.hidden_ratio, cfg.act)
                for _ in range(blocks)
            )
        )
        self.conv3 = ConvBNAct(first + mid * blocks, out_ch, 1, act=cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.conv1(x)]
        y = self.conv2(x)
        for block in self.convs:
            y = block(y)
            parts.append(y)
        return self.conv3(torch.cat(parts, dim=1))


def _downsample(channels: int, cfg: NeckConfig) -> nn.Module:
    """Stride-2 3x3 conv that keeps the channel count."""
    if cfg.depthwise:
        return DepthwiseSeparableConv(channels, channels, 3, 2, cfg.act)
    return ConvBNAct(channels, channels, 3, 2, act=cfg.act)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return interpolate(x, scale_factor=2.0, mode="nearest")


class GiraffeNeckV2(nn.Module):
    def __init__(self, cfg: NeckConfig) -> None:
        super().__init__()
        c8, c16, c32 = cfg.in_channels  # backbone widths
        o8, o16, o32 = cfg.out_channels  # neck output widths
        n = cfg.blocks_per_stage
        # Attribute order follows the official state_dict order.
        self.bu_conv13 = _downsample(c16, cfg)
        self.merge_3 = CSPStage(c16 + c32, c32, n, cfg)
        self.bu_conv24 = _downsample(c8, cfg)
        self.merge_4 = CSPStage(c8 + c16 + c32, c16, n, cfg)
        self.merge_5 = CSPStage(c16 + c8, o8, n, cfg)
        self.bu_conv57 = _downsample(o8, cfg)
        self.merge_7 = CSPStage(o8 + c16, o16, n, cfg)
        self.bu_conv46 = _downsample(c16, cfg)
        self.bu_conv76 = _downsample(o16, cfg)
        self.merge_6 = CSPStage(c16 + o16 + c32, o32, n, cfg)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        p8, p16, p32 = features
        # Top-down pass, stride 32 first; the stride-32 node also gets a
        # downsampled copy of the stride-16 input.
        x3 = self.merge_3(torch.cat([p32, self.bu_conv13(p16)], dim=1))
        x4 = self.merge_4(torch.cat([p16, self.bu_conv24(p8), _upsample(x3)], dim=1))
        x5 = self.merge_5(torch.cat([p8, _upsample(x4)], dim=1))
        # Bottom-up pass back to stride 32.
        x7 = self.merge_7(torch.cat([x4, self.bu_conv57(x5)], dim=1))
        x6 = self.merge_6(torch.cat([x3, self.bu_conv46(x4), self.bu_conv76(x7)], dim=1))
        return x5, x7, x6
