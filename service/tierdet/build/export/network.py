"""What every family hands to the exporter: one module with one output contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tierdet.registry.specs import Preprocessing


@dataclass
class Network:
    """A family's network, normalised to float NCHW in -> (boxes, scores) out.

    boxes [B, N, 4] are x1, y1, x2, y2 in input pixels; scores [B, N, C] are
    class logits when ``scores_are_logits`` and probabilities otherwise.
    """

    module: nn.Module
    scores_are_logits: bool


def on_pixels(module: nn.Module, prep: Preprocessing) -> Callable[[torch.Tensor], object]:
    """``module`` as a function of 0..255 float NCHW pixels (the graph's own
    normalisation), for calibrating random weights on raw images."""
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return lambda x: module((x - mean) / std)
