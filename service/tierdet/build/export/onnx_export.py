"""Spec + weights -> one ONNX file: uint8 pixels in, [B, K, 6] detections out."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from tierdet.build.export.network import Network
from tierdet.build.export.nms import CUSTOM_TRANSLATIONS, drop_default_reduction
from tierdet.build.export.postprocess import DetectionHead, ExportWrapper
from tierdet.registry.specs import Family, ModelSpec
from tierdet.registry.tensors import INPUT_NAME, MODEL_METADATA_KEY, OUTPUT_NAME, RAW_OUTPUT_NAMES

OPSET = 18  # the dynamo exporter's native opset; 17 fails on EfficientDet's Pad

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "RAW_OUTPUT_NAMES", "Network", "export_onnx",
           "load_network", "wrap_for_export"]


def load_network(spec: ModelSpec, checkpoint: Path | None, seed: int | None,
                 input_size: int | None = None) -> Network:
    """Build ``spec``'s network from a checkpoint, or seeded random weights.

    ``input_size`` (default: the spec's) lets tests build a network for a
    smaller input; the weights do not depend on it.
    """
    if spec.family is Family.EFFICIENTDET:
        from tierdet.build.export.efficientdet import build_network
    elif spec.family is Family.DAMOYOLO:
        from tierdet.build.export.damoyolo import build_network
    else:
        raise NotImplementedError(f"family {spec.family.value} has no exporter")
    return build_network(spec, checkpoint, seed or 0, input_size)


def wrap_for_export(spec: ModelSpec, network: Network,
                    input_size: int | None = None) -> ExportWrapper:
    head = DetectionHead(pre_nms_top_k=spec.pre_nms_top_k, max_detections=spec.max_detections,
                         iou_threshold=spec.nms_iou, scores_are_logits=network.scores_are_logits,
                         input_size=input_size or spec.input_size)
    return ExportWrapper(network.module, head, spec.preprocessing.mean,
                         spec.preprocessing.std).eval()


class RawWrapper(nn.Module):
    """uint8 NHWC pixels -> normalise -> network: (boxes, scores) before NMS.

    The same front half as :class:`ExportWrapper`, so a raw graph checks the
    network's export apart from the detection head's.
    """

    def __init__(self, export_wrapper: ExportWrapper) -> None:
        super().__init__()
        self.inner = export_wrapper

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.network(self.inner.normalise(images))


def export_onnx(spec: ModelSpec, network: Network, path: Path,
                metadata: dict[str, str] | None = None, raw: bool = False,
                input_size: int | None = None) -> Path:
    """Write ``spec``'s full graph (normalise ... NMS) to ``path``.

    ``raw=True`` stops before the detection head: outputs ``boxes`` [B,N,4]
    and ``scores`` [B,N,C] (logits for EfficientDet), never served, for
    parity tests. ``input_size`` must match the one the network was built for.
    """
    import onnx

    wrapper = wrap_for_export(spec, network, input_size)
    module: nn.Module = wrapper
    outputs = [OUTPUT_NAME]
    if raw:
        module, outputs = RawWrapper(wrapper).eval(), list(RAW_OUTPUT_NAMES)
    size = input_size or spec.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(tmp),
            input_names=[INPUT_NAME], output_names=outputs,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=1024)}},
            opset_version=OPSET, dynamo=True, external_data=False,
            custom_translation_table=CUSTOM_TRANSLATIONS, verbose=False,
        )
    model = onnx.load(str(tmp))
    drop_default_reduction(model)
    onnx.helper.set_model_props(model, {MODEL_METADATA_KEY: spec.name, **(metadata or {})})
    onnx.save(model, str(tmp))
    tmp.replace(path)  # atomic: a half-written model is never picked up
    return path
