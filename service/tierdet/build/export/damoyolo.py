"""DAMO-YOLO (our own implementation, tierdet.build.damoyolo), shaped for export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tierdet.build.damoyolo import DamoYolo, build_damoyolo, load_official_state_dict
from tierdet.build.damoyolo.head import conv_bias, convs
from tierdet.build.export.network import Network, on_pixels
from tierdet.registry.specs import ModelSpec

# Random weights: the largest head logit on calibration images. Feature
# scales and tails differ a lot between variants, so each head conv is scaled
# to this bound rather than by a fixed gain. Photos reach 2-6x the bound
# (measured on scikit-image's photos): 3 keeps top scores of Nl and S near,
# but rarely at, 1.0 and those of T and L above 0.5. Box-side logits must not
# be peaked (a one-hot softmax snaps every side to a whole bin, and boxes stop
# depending on the image); class logits must not saturate (scores of 1.0 tie,
# and ties make NMS order arbitrary).
RANDOM_LOGIT_MAX = 3.0
# The official head starts class logits at -4.6 (a 1% prior); -2 puts random
# scores around the gateway's default threshold instead.
RANDOM_CLASS_BIAS = -2.0


class DamoYoloNetwork(nn.Module):
    """DamoYolo with the exporter's output order: image -> (boxes, scores).

    boxes [B, N, 4] are x1, y1, x2, y2 in input pixels (corners: the official
    end2end export labels these centre/size, which is why its users see 0 mAP);
    scores [B, N, 80] are sigmoid probabilities.
    """

    def __init__(self, model: DamoYolo) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, boxes = self.model(x)
        return boxes, scores


def load_checkpoint(model: DamoYolo, checkpoint: Path) -> DamoYolo:
    """Official ``.pth`` (weights under ``model``) into an unfused model, strictly.

    weights_only: a checkpoint is data; refusing pickled code keeps a swapped
    file from running anything at build time.
    """
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return load_official_state_dict(model, content)


@torch.no_grad()
def _scale_head_(model: DamoYolo, seed: int, size: int) -> None:
    """Scale the random head so its logits stay within RANDOM_LOGIT_MAX per level."""
    from tierdet.build.export.random_weights import calibration_images

    generator = torch.Generator().manual_seed(seed + 1)
    features = model.neck(model.backbone(calibration_images(2, size, generator)))
    head = model.head
    for feature, cls_conv, reg_conv in zip(features, convs(head.gfl_cls), convs(head.gfl_reg),
                                           strict=True):
        for conv in (cls_conv, reg_conv):
            logits = nn.functional.conv2d(feature, conv.weight, None, conv.stride,
                                          conv.padding)
            conv.weight.mul_(RANDOM_LOGIT_MAX / logits.abs().max())
        # The biases are the only parameters randomize_ leaves alone: set them
        # so the weights depend on the seed alone.
        conv_bias(cls_conv).fill_(RANDOM_CLASS_BIAS)
        conv_bias(reg_conv).zero_()


def build_network(spec: ModelSpec, checkpoint: Path | None, seed: int,
                  input_size: int | None = None) -> Network:
    """DAMO-YOLO from a checkpoint, or seeded random weights; RepConvs fused."""
    network = DamoYoloNetwork(build_damoyolo(spec.arch, spec.labels.num_classes))
    if checkpoint is not None:
        load_checkpoint(network.model, checkpoint)
    else:
        from tierdet.build.export.random_weights import randomize_

        size = input_size or spec.input_size
        randomize_(network, seed, on_pixels(network, spec.preprocessing), size)
        _scale_head_(network.model, seed, size)
    # Fuse after BN calibration: each RepConv branch's statistics go into the fold.
    network.model.fuse()
    return Network(network.eval(), scores_are_logits=False)
