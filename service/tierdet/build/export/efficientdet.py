"""EfficientDet networks from the ``effdet`` package, shaped for export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tierdet.build.export.network import Network, on_pixels
from tierdet.registry.specs import ModelSpec

# Random weights: gains on the output convs. Box codes feed exp(), so they
# must stay small; class logits moderate (saturated scores tie, and ties make
# NMS order arbitrary).
RANDOM_DAMP = {"model.box_net.predict": 0.05, "model.class_net.predict": 0.1}
# effdet starts class logits at -4.6 (a 1% prior); -2 puts random scores
# around the gateway's default threshold instead.
RANDOM_CLASS_BIAS = -2.0


class EfficientDetNetwork(nn.Module):
    """effdet's EfficientDet with its anchor decode: image -> (boxes, logits).

    boxes [B, N, 4] are xyxy in input pixels (effdet's decode), logits
    [B, N, C] are raw class logits; N = anchors over all levels in effdet's
    order (level, y, x, anchor).
    """

    anchors: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, model: Any) -> None:  # effdet's EfficientDet (untyped)
        super().__init__()
        from effdet.anchors import Anchors

        self.model = model
        self.num_classes: int = model.config.num_classes
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


def create_efficientdet(spec: ModelSpec, checkpoint: Path | None,
                        input_size: int | None = None) -> nn.Module:
    """The bare effdet model; freshly initialised when ``checkpoint`` is None.

    ``input_size`` other than the spec's changes only the anchors (the
    weights do not depend on it): reduced-cost tests use it.
    """
    from effdet import create_model

    # pretrained_backbone=False: offline, effdet would otherwise hang on a hub
    # download for the ImageNet backbone.
    size = input_size or spec.input_size
    kwargs = {"pretrained_backbone": False, "num_classes": spec.labels.num_classes,
              "image_size": (size, size)}
    if checkpoint is not None:
        kwargs["checkpoint_path"] = str(checkpoint)
    model = create_model(spec.arch, bench_task="", **kwargs)
    return model.eval()


def build_network(spec: ModelSpec, checkpoint: Path | None, seed: int,
                  input_size: int | None = None) -> Network:
    """EfficientDet from a checkpoint, or seeded random weights."""
    size = input_size or spec.input_size
    network = EfficientDetNetwork(create_efficientdet(spec, checkpoint, size))
    if checkpoint is None:
        from tierdet.build.export.random_weights import randomize_

        randomize_(network, seed, on_pixels(network, spec.preprocessing), size,
                   damp=RANDOM_DAMP)
        network.model.class_net.predict.conv_pw.bias.data.fill_(RANDOM_CLASS_BIAS)
    return Network(network.eval(), scores_are_logits=True)
