"""Typed architecture descriptions of DAMO-YOLO (backbone, neck, head).

The values of the seven official variants live in ``model.VARIANTS``; this
module only defines the shapes of those descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BackboneFamily = Literal["res", "csp", "mob"]
BlockType = Literal["k1kx", "kxkx"]


@dataclass(frozen=True)
class NasStage:
    """One ``SuperResConvK1KX``/``SuperResConvKXKX`` entry of a TinyNAS
    structure file (``damo/base_models/backbones/nas_backbones/*.txt``).

    All official structures use kernel 3 for these stages, so it is not stored.
    """

    in_ch: int
    out_ch: int
    btn_ch: int  # bottleneck width ('btn')
    stride: int  # stride of the first block ('s')
    depth: int  # number of blocks ('L')


@dataclass(frozen=True)
class BackboneConfig:
    """A TinyNAS backbone.

    ``family``:
      * ``res`` (T, S): chains of ResConv blocks;
      * ``csp`` (M, L): the same blocks wrapped in CSP stages;
      * ``mob`` (Nano): MobileNetV3-style inverted bottlenecks.

    ``out_indices`` index the backbone's top-level modules (stem = 0); for the
    CSP family the top-level modules are the stem and the CSP groups.
    """

    family: BackboneFamily
    structure_file: str  # official structure file these numbers come from
    stem_ch: int
    stages: tuple[NasStage, ...]
    out_indices: tuple[int, int, int]
    act: str
    # Focus stem (space-to-depth + 3x3 conv) if True, else a 3x3 stride-2 conv.
    use_focus: bool
    block_type: BlockType = "k1kx"
    reparam: bool = True  # RepConv as the second conv of ResConv blocks
    with_spp: bool = True  # SPP after the first block of the last stage
    # CSP family only: which NAS stages (indices into ``stages``) form each CSP
    # group; the official code merges the 3rd and 4th stage into one group.
    csp_groups: tuple[tuple[int, ...], ...] = ((0,), (1,), (2, 3), (4,))


@dataclass(frozen=True)
class NeckConfig:
    """GiraffeNeckV2 (RepGFPN)."""

    in_channels: tuple[int, int, int]  # backbone outputs, strides 8/16/32
    out_channels: tuple[int, int, int]
    depth: float
    hidden_ratio: float
    act: str
    depthwise: bool = False  # nano variants: depthwise downsamplers + MobileV3 blocks

    @property
    def blocks_per_stage(self) -> int:
        # Python's round() (banker's rounding) as in the official code:
        # depth 1.5 -> round(4.5) == 4 blocks, not 5.
        return round(3 * self.depth)


@dataclass(frozen=True)
class HeadConfig:
    """ZeroHead: one cls and one reg conv per level, DFL box decode."""

    in_channels: tuple[int, int, int]
    reg_max: int  # bins per box side = reg_max + 1
    kernel_size: int = 3
    num_classes: int = 80
    strides: tuple[int, int, int] = (8, 16, 32)


@dataclass(frozen=True)
class DamoYoloConfig:
    name: str  # our variant key, e.g. "s"
    official_name: str  # official config stem, e.g. "damoyolo_tinynasL25_S"
    input_size: int  # square training/eval size of the official config
    backbone: BackboneConfig
    neck: NeckConfig
    head: HeadConfig
