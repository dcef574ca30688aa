"""EfficientDet networks from the ``effdet`` package, shaped for export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tierdet.specs import ModelSpec


class EfficientDetNetwork(nn.Module):
    """effdet's EfficientDet with its anchor decode: image -> (boxes, logits).

    boxes [B, N, 4] are xyxy in input pixels (effdet's decode), logits
    [B, N, C] are raw class logits; N = anchors over all levels in effdet's
    order (level, y, x, anchor).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from effdet.anchors import Anchors

        self.model = model
        self.num_classes = model.config.num_classes
        anchors = Anchors.from_config(model.config).boxes  # [N, 4] yxyx
        self.register_buffer("anchors", anchors.float(), persistent=False)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened network outputs: (box codes [B,N,4], class logits [B,N,C])."""
        cls_levels, box_levels = self.model(x)
        batch = x.shape[0]
        logits = torch.cat(
            [c.permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes) for c in cls_levels], 1)
        codes = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in box_levels], 1)
        return codes, logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, logits = self.raw(x)
        return decode_boxes(codes, self.anchors), logits


def decode_boxes(codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """effdet's box coding (ty, tx, th, tw relative to yxyx anchors) -> xyxy."""
    ya = (anchors[:, 0] + anchors[:, 2]) / 2
    xa = (anchors[:, 1] + anchors[:, 3]) / 2
    ha = anchors[:, 2] - anchors[:, 0]
    wa = anchors[:, 3] - anchors[:, 1]
    ty, tx, th, tw = codes.unbind(dim=2)
    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    yc = ty * ha + ya
    xc = tx * wa + xa
    return torch.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], dim=2)


def create_efficientdet(spec: ModelSpec, checkpoint: Path | None) -> nn.Module:
    """The bare effdet model; freshly initialised when ``checkpoint`` is None."""
    from effdet import create_model

    # pretrained_backbone=False: offline, effdet would otherwise hang on a hub
    # download for the ImageNet backbone.
    kwargs = {"pretrained_backbone": False, "num_classes": spec.labels.num_classes}
    if checkpoint is not None:
        kwargs["checkpoint_path"] = str(checkpoint)
    model = create_model(spec.arch, bench_task="", **kwargs)
    return model.eval()
