"""TinyNAS backbones of DAMO-YOLO: ResConv chains (T/S), CSP-wrapped ResConv
(M/L) and MobileNetV3-style chains (Nano).

Each backbone returns the three feature maps at strides 8, 16 and 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import BackboneConfig, BlockType, NasStage
from .layers import (
    Focus,
    MobileV3Block,
    RepConv,
    SPPBottleneck,
    batch_norm,
    conv2d,
    make_activation,
)

# Activation of the CSP wrappers' own convs (downsampler, split/fuse 1x1s): the
# official wrapper never receives the backbone's activation and keeps its ReLU
# default, while the blocks inside use the backbone activation.
CSP_WRAPPER_ACT = "relu"


class NasConvBN(nn.Module):
    """Conv + BN as TinyNAS names them (``conv1``, ``bn1``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv2d(in_ch, out_ch, kernel, stride)
        self.bn1 = batch_norm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class NasConvBNAct(nn.Module):
    """TinyNAS conv + BN + activation (keys ``conv.conv1``, ``conv.bn1``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv = NasConvBN(in_ch, out_ch, kernel, stride)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class ResConvBlock(nn.Module):
    """conv1 (1x1 for k1kx, 3x3 for kxkx) -> act -> conv2 (3x3, carries the
    stride) -> + shortcut (stride-1 blocks only) -> act."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        btn_ch: int,
        stride: int,
        act: str,
        block_type: BlockType,
        reparam: bool,
    ) -> None:
        super().__init__()
        self.conv1 = NasConvBN(in_ch, btn_ch, 1 if block_type == "k1kx" else 3)
        self.conv2: nn.Module = (
            RepConv(btn_ch, out_ch, stride, act="identity")
            if reparam
            else NasConvBN(btn_ch, out_ch, 3, stride)
        )
        self.act = make_activation(act)
        self.use_shortcut = stride != 2
        self.residual_proj = (
            NasConvBN(in_ch, out_ch, 1) if self.use_shortcut and in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        if self.use_shortcut:
            y = y + (x if self.residual_proj is None else self.residual_proj(x))
        return self.act(y)


class BlockChain(nn.Module):
    """Blocks run one after the other, stored as ``block_list``."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.block_list = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


def _stem(cfg: BackboneConfig) -> nn.Module:
    if cfg.use_focus:
        return Focus(3, cfg.stem_ch, 3, cfg.act)
    # Without Focus the stem must downsample itself (the nano backbones force
    # a stride-2 conv on the RGB input, whatever the structure file says).
    return NasConvBNAct(3, cfg.stem_ch, 3, 2, cfg.act)


def _res_stage(stage: NasStage, cfg: BackboneConfig, with_spp: bool) -> BlockChain:
    blocks: list[nn.Module] = []
    for i in range(stage.depth):
        first = i == 0
        blocks.append(
            ResConvBlock(
                stage.in_ch if first else stage.out_ch,
                stage.out_ch,
                stage.btn_ch,
                stage.stride if first else 1,
                cfg.act,
                cfg.block_type,
                cfg.reparam,
            )
        )
        if first and with_spp:
            blocks.append(SPPBottleneck(stage.out_ch, stage.out_ch))
    return BlockChain(blocks)


def _mob_stage(stage: NasStage, position: int, cfg: BackboneConfig, with_spp: bool) -> BlockChain:
    # Expansion grows with depth: 3.5 for the first stage after the stem
    # (position 1), +0.5 per later stage.
    expansion = 3.5 + 0.5 * (position - 1)
    blocks: list[nn.Module] = []
    for i in range(stage.depth):
        first = i == 0
        blocks.append(
            MobileV3Block(
                stage.in_ch if first else stage.out_ch,
                stage.out_ch,
                expansion,
                stage.stride if first else 1,
                cfg.act,
                se_slot=True,
            )
        )
        if first and with_spp:
            blocks.append(SPPBottleneck(stage.out_ch, stage.out_ch))
    return BlockChain(blocks)


class TinyNasChain(nn.Module):
    """Res (T/S) and Mob (Nano) backbones: stem followed by the NAS stages."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.family not in ("res", "mob"):
            raise ValueError(f"TinyNasChain does not build family {cfg.family!r}")
        self.out_indices = tuple(cfg.out_indices)
        modules: list[nn.Module] = [_stem(cfg)]
        last = len(cfg.stages) - 1
        for i, stage in enumerate(cfg.stages):
            spp = cfg.with_spp and i == last
            if cfg.family == "res":
                modules.append(_res_stage(stage, cfg, spp))
            else:
                modules.append(_mob_stage(stage, i + 1, cfg, spp))
        self.block_list = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, module in enumerate(self.block_list):
            x = module(x)
            if i in self.out_indices:
                outputs.append(x)
        return outputs


class CspGroup(nn.Module):
    """One CSP stage of the M/L backbones.

    A stride-2 3x3 conv downsamples; its output is split by two 1x1 convs into
    a shortcut half and a half that runs through the ResConv blocks; the halves
    are concatenated (blocks first) and fused by a 1x1 conv. The strided first
    block of each NAS stage is replaced by the downsampler, so a stride-2 stage
    contributes depth - 1 blocks.
    """

    def __init__(
        self,
        stages: Sequence[NasStage],
        act: str,
        block_type: BlockType,
        reparam: bool,
        with_spp: bool,
    ) -> None:
        super().__init__()
        in_ch, out_ch = stages[0].in_ch, stages[-1].out_ch
        hidden = stages[0].out_ch // 2
        blocks = []
        for stage in stages:
            count = stage.depth - 1 if stage.stride == 2 else stage.depth
            for i in range(count):
                # Blocks work at half width; a stride-1 stage's first block
                # takes half of that stage's declared input width.
                block_in = stage.in_ch // 2 if stage.stride == 1 and i == 0 else stage.out_ch // 2
                blocks.append(
                    ResConvBlock(
                        block_in,
                        stage.out_ch // 2,
                        stage.btn_ch,
                        1,
                        act,
                        block_type,
                        reparam,
                    )
                )
        self.convstem = nn.ModuleList(blocks)
        self.downsampler = NasConvBNAct(in_ch, 2 * hidden, 3, 2, CSP_WRAPPER_ACT)
        self.spp = SPPBottleneck(2 * hidden, 2 * hidden) if with_spp else None
        self.has_blocks = len(blocks) > 0
        if self.has_blocks:
            self.conv_start = NasConvBNAct(2 * hidden, hidden, 1, 1, CSP_WRAPPER_ACT)
            self.conv_shortcut = NasConvBNAct(2 * hidden, out_ch // 2, 1, 1, CSP_WRAPPER_ACT)
            self.conv_fuse = NasConvBNAct(out_ch, out_ch, 1, 1, CSP_WRAPPER_ACT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsampler(x)
        if self.spp is not None:
            x = self.spp(x)
        if not self.has_blocks:
            return x
        shortcut = self.conv_shortcut(x)
        x = self.conv_start(x)
        for block in self.convstem:
            x = block(x)
        return self.conv_fuse(torch.cat((x, shortcut), dim=1))


class TinyNasCsp(nn.Module):
    """CSP backbone (M/L): Focus stem followed by the CSP groups."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.family != "csp":
            raise ValueError(f"TinyNasCsp does not build family {cfg.family!r}")
        self.out_indices = tuple(cfg.out_indices)
        modules: list[nn.Module] = [_stem(cfg)]
        last = len(cfg.csp_groups) - 1
        for g, group in enumerate(cfg.csp_groups):
            modules.append(
                CspGroup(
                    [cfg.stages[i] for i in group],
                    cfg.act,
                    cfg.block_type,
                    cfg.reparam,
                    cfg.with_spp and g == last,
                )
            )
        self.csp_stage = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, module in enumerate(self.csp_stage):
            x = module(x)
            if i in self.out_indices:
                outputs.append(x)
        return outputs


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.family == "csp":
        return TinyNasCsp(cfg)
    return TinyNasChain(cfg)
