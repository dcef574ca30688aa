"""DAMO-YOLO (our own implementation, tierdet.models.damoyolo), shaped for export."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tierdet.export.network import Network, on_pixels
from tierdet.models.damoyolo import DamoYolo, build_damoyolo, load_official_state_dict
from tierdet.specs import ModelSpec

# Random weights: gains on the head's output convs. The box-side
# distributions need small logits (a peaked softmax snaps every side to a
# whole bin, and boxes stop depending on the image); the class logits need
# moderate ones (saturated sigmoids tie, and ties make NMS order arbitrary).
RANDOM_DAMP = {"model.head.gfl_reg": 0.3, "model.head.gfl_cls": 0.3}
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


def build_network(spec: ModelSpec, checkpoint: Path | None, seed: int,
                  input_size: int | None = None) -> Network:
    """DAMO-YOLO from a checkpoint, or seeded random weights; RepConvs fused."""
    network = DamoYoloNetwork(build_damoyolo(spec.arch, spec.labels.num_classes))
    if checkpoint is not None:
        load_checkpoint(network.model, checkpoint)
    else:
        from tierdet.export.random_weights import randomize_

        randomize_(network, seed, on_pixels(network, spec.preprocessing),
                   input_size or spec.input_size, damp=RANDOM_DAMP)
        head = network.model.head
        # The head's biases are the only parameters randomize_ leaves alone;
        # set them so the weights depend on the seed alone.
        for cls_conv, reg_conv in zip(head.gfl_cls, head.gfl_reg, strict=True):
            cls_conv.bias.data.fill_(RANDOM_CLASS_BIAS)
            reg_conv.bias.data.zero_()
    # Fuse after BN calibration: each RepConv branch's statistics go into the fold.
    network.model.fuse()
    return Network(network.eval(), scores_are_logits=False)
