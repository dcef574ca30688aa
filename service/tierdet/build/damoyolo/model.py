"""DAMO-YOLO detector: variants, builder, official checkpoint loading.

Forward contract of :class:`DamoYolo`:

* input: float32 NCHW, RGB, values 0..255 (no mean/std). The official
  preprocessing stretches the image to the square input size (no letterbox).
* output: ``(scores, boxes)``; scores float32 [B, N, num_classes] after
  sigmoid; boxes float32 [B, N, 4] as x1, y1, x2, y2 in input pixels
  (corners, NOT centre/size; not clipped). N = anchors of strides 8, 16, 32
  in that order, row-major inside a level (see :func:`num_anchors`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from .backbone import build_backbone
from .config import (
    BackboneConfig,
    DamoYoloConfig,
    HeadConfig,
    NasStage,
    NeckConfig,
)
from .head import ZeroHead, num_anchors
from .layers import RepConv, fuse_repconvs
from .neck import GiraffeNeckV2

__all__ = [
    "OFFICIAL_NAMES",
    "VARIANTS",
    "DamoYolo",
    "build_damoyolo",
    "count_parameters",
    "load_official_state_dict",
    "num_anchors",
    "variant_for_official_name",
]


class DamoYolo(nn.Module):
    def __init__(self, cfg: DamoYoloConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.neck = GiraffeNeckV2(cfg.neck)
        self.head = ZeroHead(cfg.head)
        self.is_fused = False  # set by fuse(); nano variants have no RepConv at all

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.neck(self.backbone(images)))

    def fuse(self) -> DamoYolo:
        """Switch every RepConv to its single-conv deploy form (in place).

        Outputs stay equal up to float rounding. A fused model can no longer
        load official (training-form) checkpoints.
        """
        fuse_repconvs(self)
        self.is_fused = True
        return self


def _stages(*rows: tuple[int, int, int, int, int]) -> tuple[NasStage, ...]:
    """Rows of (in, out, btn, stride, L) as written in the structure files."""
    return tuple(NasStage(*row) for row in rows)


def _nano(
    name: str,
    official: str,
    structure: str,
    stem_ch: int,
    stages: tuple[NasStage, ...],
    widths: tuple[int, int, int],
) -> DamoYoloConfig:
    """Nano variants share everything except the backbone structure and widths."""
    return DamoYoloConfig(
        name=name,
        official_name=official,
        input_size=416,
        backbone=BackboneConfig(
            family="mob",
            structure_file=structure,
            stem_ch=stem_ch,
            stages=stages,
            out_indices=(2, 4, 5),
            act="silu",
            use_focus=False,
            reparam=False,
        ),
        neck=NeckConfig(widths, widths, depth=0.5, hidden_ratio=0.5, act="silu", depthwise=True),
        head=HeadConfig(widths, reg_max=7, kernel_size=1),
    )


# Architecture facts from tinyvision/damo-yolo configs/*.py and
# damo/base_models/backbones/nas_backbones/*.txt (commit 319572e).
VARIANTS: dict[str, DamoYoloConfig] = {
    "ns": _nano(
        "ns",
        "damoyolo_tinynasL18_Ns",
        "tinynas_nano_small.txt",
        16,
        _stages(
            (16, 24, 24, 2, 1),
            (24, 40, 64, 2, 2),
            (40, 64, 40, 2, 2),
            (64, 80, 152, 1, 2),
            (80, 160, 192, 2, 2),
        ),
        (40, 80, 160),
    ),
    "nm": _nano(
        "nm",
        "damoyolo_tinynasL18_Nm",
        "tinynas_nano_middle.txt",
        16,
        _stages(
            (16, 40, 24, 2, 2),
            (40, 64, 64, 2, 2),
            (64, 112, 40, 2, 2),
            (112, 128, 152, 1, 2),
            (128, 256, 192, 2, 1),
        ),
        (64, 128, 256),
    ),
    "nl": _nano(
        "nl",
        "damoyolo_tinynasL20_Nl",
        "tinynas_nano_large.txt",
        24,
        _stages(
            (24, 48, 24, 2, 1),
            (48, 80, 64, 2, 2),
            (80, 160, 40, 2, 2),
            (160, 160, 152, 1, 3),
            (160, 320, 192, 2, 2),
        ),
        (80, 160, 320),
    ),
    "t": DamoYoloConfig(
        name="t",
        official_name="damoyolo_tinynasL20_T",
        input_size=640,
        backbone=BackboneConfig(
            family="res",
            structure_file="tinynas_L20_k1kx.txt",
            stem_ch=24,
            stages=_stages(
                (24, 64, 24, 2, 2),
                (64, 96, 64, 2, 2),
                (96, 192, 96, 2, 2),
                (192, 192, 152, 1, 2),
                (192, 384, 192, 2, 1),
            ),
            out_indices=(2, 4, 5),
            act="relu",
            use_focus=True,
        ),
        neck=NeckConfig((96, 192, 384), (64, 128, 256), depth=1.0, hidden_ratio=1.0, act="relu"),
        head=HeadConfig((64, 128, 256), reg_max=16),
    ),
    "s": DamoYoloConfig(
        name="s",
        official_name="damoyolo_tinynasL25_S",
        input_size=640,
        backbone=BackboneConfig(
            family="res",
            structure_file="tinynas_L25_k1kx.txt",
            stem_ch=32,
            stages=_stages(
                (32, 128, 24, 2, 1),
                (128, 128, 88, 2, 5),
                (128, 256, 128, 2, 3),
                (256, 256, 120, 1, 2),
                (256, 512, 144, 2, 1),
            ),
            out_indices=(2, 4, 5),
            act="relu",
            use_focus=True,
        ),
        neck=NeckConfig((128, 256, 512), (128, 256, 512), depth=1.0, hidden_ratio=0.75, act="relu"),
        head=HeadConfig((128, 256, 512), reg_max=16),
    ),
    "m": DamoYoloConfig(
        name="m",
        official_name="damoyolo_tinynasL35_M",
        input_size=640,
        backbone=BackboneConfig(
            family="csp",
            structure_file="tinynas_L35_kxkx.txt",
            stem_ch=32,
            stages=_stages(
                (32, 128, 64, 2, 2),
                (128, 128, 64, 2, 4),
                (128, 256, 256, 2, 4),
                (256, 256, 256, 1, 4),
                (256, 512, 256, 2, 3),
            ),
            out_indices=(2, 3, 4),
            act="silu",
            use_focus=True,
            block_type="kxkx",
        ),
        neck=NeckConfig((128, 256, 512), (128, 256, 512), depth=1.5, hidden_ratio=1.0, act="silu"),
        head=HeadConfig((128, 256, 512), reg_max=16),
    ),
    "l": DamoYoloConfig(
        name="l",
        official_name="damoyolo_tinynasL45_L",
        input_size=640,
        backbone=BackboneConfig(
            family="csp",
            structure_file="tinynas_L45_kxkx.txt",
            stem_ch=32,
            stages=_stages(
                (32, 128, 96, 2, 3),
                (128, 128, 96, 2, 5),
                (128, 256, 384, 2, 5),
                (256, 256, 384, 1, 5),
                (256, 512, 384, 2, 4),
            ),
            out_indices=(2, 3, 4),
            act="silu",
            use_focus=True,
            block_type="kxkx",
        ),
        neck=NeckConfig((128, 256, 512), (128, 256, 512), depth=2.0, hidden_ratio=1.0, act="silu"),
        head=HeadConfig((128, 256, 512), reg_max=16),
    ),
}

# Official config stem (configs/<stem>.py, also the golden file stem) -> variant.
OFFICIAL_NAMES: dict[str, str] = {cfg.official_name: key for key, cfg in VARIANTS.items()}


def variant_for_official_name(official_name: str) -> str:
    try:
        return OFFICIAL_NAMES[official_name]
    except KeyError:
        known = ", ".join(sorted(OFFICIAL_NAMES))
        raise KeyError(f"unknown DAMO-YOLO config {official_name!r}; known: {known}") from None


def build_damoyolo(variant: str, num_classes: int = 80) -> DamoYolo:
    """Build an unfused (checkpoint-form) model for a variant key of VARIANTS."""
    try:
        cfg = VARIANTS[variant]
    except KeyError:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}") from None
    if num_classes != cfg.head.num_classes:
        cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, num_classes=num_classes))
    model = DamoYolo(cfg)
    model.eval()
    return model


def load_official_state_dict(model: DamoYolo, state_dict: Mapping[str, torch.Tensor]) -> DamoYolo:
    """Load an official DAMO-YOLO checkpoint into an unfused model, strictly.

    Accepts the loaded ``.pth`` content (a dict with the weights under
    ``"model"``, as the official trainer saves it) or the bare state_dict. Our
    module names mirror the official ones, so keys are used as they are; any
    missing, unexpected or mis-shaped tensor raises.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    if any(isinstance(m, RepConv) and m.is_fused for m in model.modules()):
        raise ValueError(
            "load official checkpoints before model.fuse(): they hold unfused RepConvs"
        )
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())
