"""Spec + weights -> one ONNX file: uint8 pixels in, [B, K, 6] detections out."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tierdet.export.nms import CUSTOM_TRANSLATIONS
from tierdet.export.postprocess import DetectionHead, ExportWrapper
from tierdet.specs import Family, ModelSpec

INPUT_NAME = "images"
OUTPUT_NAME = "detections"
OPSET = 18  # the dynamo exporter's native opset; 17 fails on EfficientDet's Pad


@dataclass
class Network:
    """A family's network, normalised to (boxes xyxy, scores) on float input."""

    module: nn.Module
    scores_are_logits: bool


def load_network(spec: ModelSpec, checkpoint: Path | None, seed: int | None) -> Network:
    """Build ``spec``'s network from a checkpoint, or seeded random weights."""
    if spec.family is Family.EFFICIENTDET:
        from tierdet.export.efficientdet import EfficientDetNetwork, create_efficientdet

        network = EfficientDetNetwork(create_efficientdet(spec, checkpoint))
        damp = {"model.box_net.predict": 0.05, "model.class_net.predict": 0.1}
        logits = True
    else:
        raise NotImplementedError(f"family {spec.family.value} has no exporter yet")
    if checkpoint is None:
        from tierdet.export.random_weights import randomize_

        mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
        randomize_(network, seed or 0, lambda x: network((x - mean) / std),
                   spec.input_size, damp=damp)
        if spec.family is Family.EFFICIENTDET:
            # effdet starts class logits at -4.6 (a 1% prior); -2 puts random
            # scores around the gateway's default threshold instead.
            network.model.class_net.predict.conv_pw.bias.data.fill_(-2.0)
    return Network(network.eval(), logits)


def wrap_for_export(spec: ModelSpec, network: Network) -> ExportWrapper:
    head = DetectionHead(pre_nms_top_k=spec.pre_nms_top_k, max_detections=spec.max_detections,
                         iou_threshold=spec.nms_iou, scores_are_logits=network.scores_are_logits)
    return ExportWrapper(network.module, head, spec.preprocessing.mean,
                         spec.preprocessing.std).eval()


def export_onnx(spec: ModelSpec, network: Network, path: Path,
                metadata: dict[str, str] | None = None) -> Path:
    """Write ``spec``'s full graph (normalise ... NMS) to ``path``."""
    import onnx

    wrapper = wrap_for_export(spec, network)
    example = torch.zeros(2, spec.input_size, spec.input_size, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(tmp),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
            opset_version=OPSET, dynamo=True, external_data=False,
            custom_translation_table=CUSTOM_TRANSLATIONS, verbose=False,
        )
    model = onnx.load(str(tmp))
    onnx.helper.set_model_props(model, {"tierdet.model": spec.name, **(metadata or {})})
    onnx.save(model, str(tmp))
    tmp.replace(path)  # atomic: a half-written model is never picked up
    return path
