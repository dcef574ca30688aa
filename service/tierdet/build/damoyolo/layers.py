"""Building blocks shared by the DAMO-YOLO backbone, neck and head.

Attribute names of modules that hold weights follow the layout of the official
checkpoints (``conv``/``bn``, ``rbr_dense``/``rbr_1x1``, ``depthwise``/``dwnorm``
...), so an official ``state_dict`` loads with strict key matching and no
renaming. Everything else (structure, forward code) is our own.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.functional import max_pool2d, pad

# The official detector overrides every BatchNorm2d eps to 1e-3 after building
# the model; the checkpoints were trained (and their running stats measured)
# with it, and 1e-5 changes the outputs far beyond float noise.
BN_EPS = 1e-3

ACTIVATIONS = ("relu", "silu", "identity")


def make_activation(name: str) -> nn.Module:
    """Map a config activation name to a fresh module (never in-place, export-safe)."""
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}, expected one of {ACTIVATIONS}")


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


def round_channels(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` like the official
    ``make_divisible``: nearest multiple (ties up), at least ``divisor``, and
    bumped by one step when rounding lost more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv2d:
    """'Same' padded conv (odd kernels); bias off by default because a BN follows."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=bias)


class ConvBN(nn.Module):
    """Conv (no bias) followed by BatchNorm; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = conv2d(in_ch, out_ch, kernel, stride)
        self.bn = batch_norm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ConvBNAct(ConvBN):
    """Conv -> BatchNorm -> activation."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, act: str = "silu"
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def fold_bn(conv_weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight, bias) of the single conv equal to ``bn(conv(x))``.

    Computed in float64 so that the fused model stays as close as possible to
    the unfused one; the caller casts back.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    gain = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv_weight.double() * gain.reshape(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * gain
    return weight, bias


class RepConv(nn.Module):
    """RepVGG-style 3x3 conv: a 3x3 ConvBN and a 1x1 ConvBN summed, then the
    activation (no identity branch in DAMO-YOLO).

    Checkpoints store the training form (``rbr_dense``, ``rbr_1x1``); ``fuse()``
    folds both branches into one biased 3x3 conv ``rbr_reparam`` (the official
    deploy name) for inference/export.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.rbr_dense = ConvBN(in_ch, out_ch, 3, stride)
        self.rbr_1x1 = ConvBN(in_ch, out_ch, 1, stride)
        self.rbr_reparam: nn.Conv2d | None = None
        self.act = make_activation(act)

    @property
    def is_fused(self) -> bool:
        return self.rbr_reparam is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x))

    @torch.no_grad()
    def fuse(self) -> None:
        if self.rbr_reparam is not None:
            return
        dense_w, dense_b = fold_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        point_w, point_b = fold_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        # A 1x1 kernel is a 3x3 kernel with zeros around the centre (both
        # branches share stride and the 3x3 one has padding 1).
        weight = dense_w + pad(point_w, [1, 1, 1, 1])
        bias = dense_b + point_b
        ref = self.rbr_dense.conv
        stride = (ref.stride[0], ref.stride[1])
        fused = nn.Conv2d(ref.in_channels, ref.out_channels, 3, stride, 1, bias=True).to(
            device=ref.weight.device, dtype=ref.weight.dtype
        )
        fused.weight.copy_(weight.to(ref.weight.dtype))
        assert fused.bias is not None  # made with bias=True
        fused.bias.copy_(bias.to(ref.weight.dtype))
        self.rbr_reparam = fused
        del self.rbr_dense
        del self.rbr_1x1


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """Focus rearrangement (B, C, H, W) -> (B, 4C, H/2, W/2).

    Channel block order is top-left, bottom-left, top-right, bottom-right: the
    official order, which the stem weights depend on.
    """
    return torch.cat(
        (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]),
        dim=1,
    )


class Focus(nn.Module):
    """Stride-2 stem: space-to-depth, then a stride-1 ConvBNAct."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, act: str) -> None:
        super().__init__()
        self.conv = ConvBNAct(4 * in_ch, out_ch, kernel, 1, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(space_to_depth(x))


class SPPBottleneck(nn.Module):
    """YOLOv3-style spatial pyramid pooling (max pools 5/9/13, stride 1).

    Always SiLU in DAMO-YOLO, whatever the backbone activation is.
    """

    POOL_SIZES = (5, 9, 13)

    def __init__(self, in_ch: int, out_ch: int, act: str = "silu") -> None:
        super().__init__()
        hidden = in_ch // 2
        self.conv1 = ConvBNAct(in_ch, hidden, 1, act=act)
        self.conv2 = ConvBNAct(hidden * (len(self.POOL_SIZES) + 1), out_ch, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        pooled = [max_pool2d(x, k, stride=1, padding=k // 2) for k in self.POOL_SIZES]
        return self.conv2(torch.cat([x, *pooled], dim=1))


class DepthwiseSeparableConv(nn.Module):
    """Depthwise kxk (carries the stride) -> BN -> act -> pointwise 1x1 -> BN -> act.

    Used for the down-sampling convs of the depthwise (nano) neck.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, act: str) -> None:
        super().__init__()
        # Registration order matches the official state_dict order.
        self.depthwise = conv2d(in_ch, in_ch, kernel, stride, groups=in_ch)
        self.pointwise = conv2d(in_ch, out_ch, 1)
        self.dwnorm = batch_norm(in_ch)
        self.pwnorm = batch_norm(out_ch)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwnorm(self.depthwise(x)))
        return self.act(self.pwnorm(self.pointwise(x)))


class MobileV3Block(nn.Module):
    """Inverted bottleneck: 1x1 expand -> BN -> act -> dw 5x5 -> BN -> act ->
    1x1 project -> BN, plus identity shortcut when shape allows.

    The weights live in one ``nn.Sequential`` named ``conv`` whose indices are
    part of the checkpoint keys. ``se_slot`` adds the (always disabled) SE
    placeholder that the backbone version has between the depthwise BN and its
    activation, which shifts the later indices by one.
    """

    DW_KERNEL = 5

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        expansion: float,
        stride: int,
        act: str,
        se_slot: bool,
    ) -> None:
        super().__init__()
        mid = round_channels(math.ceil(out_ch * expansion))
        layers: list[nn.Module] = [
            conv2d(in_ch, mid, 1),
            batch_norm(mid),
            make_activation(act),
            conv2d(mid, mid, self.DW_KERNEL, stride, groups=mid),
            batch_norm(mid),
        ]
        if se_slot:
            layers.append(nn.Identity())
        layers += [make_activation(act), conv2d(mid, out_ch, 1), batch_norm(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_shortcut else y


def fuse_repconvs(module: nn.Module) -> int:
    """Fuse every RepConv inside ``module`` in place; returns how many were fused."""
    pending = [m for m in module.modules() if isinstance(m, RepConv) and not m.is_fused]
    for repconv in pending:
        repconv.fuse()
    return len(pending)
