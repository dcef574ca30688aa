"""Deterministic random weights that still give input-dependent outputs.

A freshly initialised detector answers every image alike (EfficientDet's
heads start near zero), which makes parity and serving tests meaningless.
So every conv is redrawn with He-normal weights from a seeded generator,
chosen output layers are damped (see ``randomize_``),
and BatchNorm statistics are calibrated on smooth random images, which
keeps activations in range without any real data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn


def smooth_noise(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Blurry random RGB images in 0..255, float NCHW: blobs, not pixel noise."""
    coarse = torch.rand(batch, 3, 12, 12, generator=generator) * 255.0
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                     align_corners=False)


def calibration_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Photo-like statistics without photos: smooth backgrounds, sharp-edged
    rectangles of random colour, and fine grain. Calibrating on blobs alone
    lets activations explode on the edges and texture of real images."""
    images = smooth_noise(batch, size, generator)
    for b in range(batch):
        for _ in range(12):
            x0, y0 = (torch.rand(2, generator=generator) * size * 0.9).long().tolist()
            w, h = (torch.rand(2, generator=generator) * size * 0.4 + 4).long().tolist()
            colour = torch.rand(3, 1, 1, generator=generator) * 255.0
            images[b, :, y0:y0 + h, x0:x0 + w] = colour
    grain = torch.randn(images.shape, generator=generator) * 12.0
    return (images + grain).clamp(0.0, 255.0)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int, forward: Callable[[torch.Tensor], object],
               input_size: int, damp: Mapping[str, float] | None = None,
               calibration_batches: int = 4) -> None:
    """Redraw ``model``'s weights in place; ``forward`` takes 0..255 images.

    ``damp`` maps module-name prefixes to a gain for their conv weights:
    box regressors need small outputs (exp() of them), class predictors
    moderate ones (saturated scores tie, and ties make NMS order arbitrary).
    """
    generator = torch.Generator().manual_seed(seed)
    damp = damp or {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            for prefix, gain in damp.items():
                if name.startswith(prefix):
                    module.weight.mul_(gain)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.eval()
    for bn in norms:
        bn.train()
    for _ in range(calibration_batches):
        forward(calibration_images(2, input_size, generator))
    model.eval()
