"""EfficientDet D0-D7: what we export equals what effdet itself computes.

Every model is checked twice, with deterministic random weights (seed 0):

* raw: the exported graph cut before the detection head
  (``export_onnx(raw=True)``: decoded boxes + class logits) against effdet's
  ``EfficientDet`` forward decoded by effdet's own ``decode_box_outputs``;
* after NMS: the served graph (``tierdet build``) against effdet's own
  ``DetBenchPredict`` with ``max_detection_points`` = the spec's
  ``pre_nms_top_k`` (3840, TensorRT's TopK limit).

D0 and D1 run at their native sizes in CI. D2-D7 do at native size under
``-m slow`` (minutes each on 2 cores). In CI, D2-D7 get the part that
differs between variants apart from the network itself: with effdet's
network replaced by fixed random outputs of the right shapes, our flatten,
anchors, decode and detection head at the native size equal effdet's decode
and DetBenchPredict (the ONNX translation of those shared pieces is covered
by D0/D1 and by the head test in test_zoo_export.py). Max differences print
with ``pytest -s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TEST_WEIGHTS
from tierdet.registry.specs import SPECS, ModelSpec

pytest.importorskip("effdet")  # build extra

EFFDET = [f"efficientdet-d{i}" for i in range(8)]
NATIVE_IN_CI = ("efficientdet-d0", "efficientdet-d1")

# Tolerances: |a - b| <= atol + rtol * scale. Logits: scale |b|. Boxes:
# scale = the box's largest |coordinate|, because a corner is centre -+ size/2
# and float32 rounding follows the size (random weights make boxes of up to
# thousands of px), not the corner's own value.
LOGITS_TOL = (1e-3, 1e-4)
BOXES_TOL = (2e-2, 1e-4)  # px
ROWS_ATOL = 2e-2  # after NMS: box px and score
# After NMS, scores closer than this may be ordered differently by ONNX Runtime
# and PyTorch (float32 rounding in the network), so a near-tie may resolve the
# other way: which of two overlapping boxes survives, or which candidate is the
# 100th. Random weights make many near-ties (scores spread over a narrow range).
TIE_EPS = 1e-3
MAX_TIE_FRACTION = 0.05


@dataclass(frozen=True)
class Diffs:
    boxes_px: float
    logits: float
    within_tolerance: bool


class FixedOutputs(torch.nn.Module):
    """Stands in for effdet's EfficientDet: answers given per-level outputs, so
    effdet's bench and our network wrapper post-process the very same numbers."""

    def __init__(self, config, cls_levels: list[torch.Tensor],
                 box_levels: list[torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self.cls_levels, self.box_levels = cls_levels, box_levels

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.cls_levels, self.box_levels


def _batch(size: int) -> np.ndarray:
    """uint8 [2, S, S, 3] synthetic photo-like images, as the random weights were
    calibrated on. Not photos: a deep random network amplifies float32 rounding
    on them (measured on scikit-image's astronaut: D6's ONNX logits differ from
    PyTorch's by 0.7 % of their range there, by 0.03 % on these images), and
    photos go through the whole stack in test_zoo_e2e.py anyway."""
    from tierdet.build.export.random_weights import calibration_images

    images = calibration_images(2, size, torch.Generator().manual_seed(7))
    return images.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _normalised(spec: ModelSpec, images: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std


@torch.no_grad()
def effdet_raw(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """effdet's forward, flattened as its _post_process does, decoded by effdet."""
    from effdet.anchors import Anchors, decode_box_outputs

    cls_levels, box_levels = model(x)
    batch, classes = cls_levels[0].shape[0], model.config.num_classes
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1, classes) for c in cls_levels], 1)
    codes = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in box_levels], 1)
    anchors = Anchors.from_config(model.config).boxes
    boxes = torch.stack([decode_box_outputs(c, anchors, output_xyxy=True) for c in codes])
    return boxes.numpy(), logits.numpy()


@torch.no_grad()
def effdet_predict(model: torch.nn.Module, x: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """effdet's DetBenchPredict rows, in our convention (class slot, zeros past the end).
    Boxes are clipped to the input frame before NMS, as tierdet's graph clips its
    candidates (effdet does so when told the image's size, at scale 1 here)."""
    from effdet import DetBenchPredict

    bench = DetBenchPredict(model).eval()  # reads model.config and calls model(x)
    bench.max_detection_points = spec.pre_nms_top_k
    frame = {"img_scale": torch.ones(x.shape[0]),
             "img_size": torch.tensor([[spec.input_size] * 2] * x.shape[0], dtype=torch.float32)}
    ref = bench(x, img_info=frame).numpy()
    ref[..., 5] -= 1  # effdet reports class slot + 1
    ref[ref[..., 4] <= 0] = 0
    return ref


def _within(diff: np.ndarray, scale: np.ndarray, tol: tuple[float, float]) -> bool:
    atol, rtol = tol
    return bool((np.abs(diff) <= atol + rtol * scale).all())


def raw_diffs(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> Diffs:
    (boxes, logits), (ref_boxes, ref_logits) = got, want
    assert boxes.shape == ref_boxes.shape and logits.shape == ref_logits.shape
    assert np.isfinite(ref_boxes).all() and np.isfinite(ref_logits).all()
    box_scale = np.abs(ref_boxes).max(axis=-1, keepdims=True)
    ok = (_within(boxes - ref_boxes, box_scale, BOXES_TOL)
          and _within(logits - ref_logits, np.abs(ref_logits), LOGITS_TOL))
    return Diffs(float(np.abs(boxes - ref_boxes).max()),
                 float(np.abs(logits - ref_logits).max()), ok)


def rows_distance(got: np.ndarray, want: np.ndarray) -> tuple[float, int]:
    """(max distance of a matched row to its reference, rows that differ by a
    near-tie). Both must answer as many detections; every row matches a
    reference row within ROWS_ATOL (class and score included), except rows of
    near-ties: those pair with a differing reference row whose score is
    within TIE_EPS."""
    got, want = got[got[:, 4] > 0], want[want[:, 4] > 0]
    assert len(got) == len(want) > 0, (len(got), len(want))
    dist = np.abs(got[:, None, :] - want[None, :, :]).max(axis=2)  # [got, want]
    got_free = dist.min(axis=1) > ROWS_ATOL
    want_free = dist.min(axis=0) > ROWS_ATOL
    loose_got, loose_want = np.sort(got[got_free, 4]), np.sort(want[want_free, 4])
    assert len(loose_got) == len(loose_want), (got[got_free], want[want_free])
    assert (np.abs(loose_got - loose_want) <= TIE_EPS).all(), (got[got_free], want[want_free])
    assert len(loose_got) <= MAX_TIE_FRACTION * len(got), len(loose_got)
    matched = dist[~got_free].min(axis=1)
    return float(matched.max()) if len(matched) else 0.0, len(loose_got)


def _check_raw(name: str, diffs: Diffs) -> None:
    print(f"{name} raw: max|boxes - effdet| = {diffs.boxes_px:.3g} px, "
          f"max|logits - effdet| = {diffs.logits:.3g}")
    assert diffs.within_tolerance, diffs


def _check_rows(name: str, got: np.ndarray, want: np.ndarray) -> None:
    results = [rows_distance(g, w) for g, w in zip(got, want, strict=True)]
    print(f"{name} after NMS: max row distance to DetBenchPredict = "
          f"{max(r[0] for r in results):.3g}, rows differing by a near-tie "
          f"{[r[1] for r in results]}, detections per image "
          f"{[int((w[:, 4] > 0).sum()) for w in want]}")


def _native_parity(name: str, home: Path, tmp_path: Path) -> None:
    from tierdet.build.export.onnx_export import RAW_OUTPUT_NAMES, export_onnx, load_network
    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource

    spec = SPECS[name]
    source = WeightsSource.parse(TEST_WEIGHTS)
    (built,) = ensure_built([name], source, home, progress=False)
    network = load_network(spec, None, source.seed)
    images = _batch(spec.input_size)
    x = _normalised(spec, images)

    model = network.module.model
    with torch.no_grad():
        levels = model(x)  # one forward of effdet's network serves both references
    reference = FixedOutputs(model.config, *levels)

    raw_path = export_onnx(spec, network, tmp_path / f"{name}.raw.onnx", raw=True)
    session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    got = session.run(list(RAW_OUTPUT_NAMES), {"images": images})
    _check_raw(name, raw_diffs((got[0], got[1]), effdet_raw(reference, x)))
    del session

    session = ort.InferenceSession(str(built.onnx), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"images": images})[0]
    _check_rows(name, rows, effdet_predict(reference, x, spec))


@pytest.mark.parametrize("name", NATIVE_IN_CI)
def test_exported_graph_equals_effdet(name: str, home: Path, tmp_path: Path) -> None:
    _native_parity(name, home, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EFFDET if n not in NATIVE_IN_CI])
def test_exported_graph_equals_effdet_large(name: str, home: Path, tmp_path: Path) -> None:
    _native_parity(name, home, tmp_path)


def _random_levels(config, batch: int, seed: int) -> tuple[list, list]:
    """Random head outputs of effdet's shapes at the native size: per level
    [B, anchors*C, H, W] class logits and [B, anchors*4, H, W] box codes."""
    g = torch.Generator().manual_seed(seed)
    anchors = config.num_scales * len(config.aspect_ratios)
    size = config.image_size[0]
    cls_levels, box_levels = [], []
    for level in range(config.min_level, config.max_level + 1):
        cells = size // 2**level
        shape = (batch, anchors, cells, cells)
        cls_levels.append(torch.randn(*shape[:2], config.num_classes, *shape[2:],
                                      generator=g).flatten(1, 2) * 1.5 - 3.0)
        box_levels.append(torch.randn(*shape[:2], 4, *shape[2:], generator=g).flatten(1, 2)
                          * 0.2)
    return cls_levels, box_levels


@pytest.mark.parametrize("name", [n for n in EFFDET if n not in NATIVE_IN_CI])
def test_decode_and_nms_equal_effdet_on_native_anchors(name: str) -> None:
    """CI's cheap check of D2-D7: everything but the network, at native size."""
    from effdet import get_efficientdet_config
    from tierdet.build.export.efficientdet import EfficientDetNetwork
    from tierdet.build.export.network import Network
    from tierdet.build.export.onnx_export import wrap_for_export

    spec = SPECS[name]
    config = get_efficientdet_config(spec.arch)
    assert tuple(config.image_size) == (spec.input_size, spec.input_size)
    reference = FixedOutputs(config, *_random_levels(config, 1, seed=int(name[-1])))
    x = torch.zeros(1, 3, spec.input_size, spec.input_size)  # ignored by FixedOutputs
    network = Network(EfficientDetNetwork(reference), scores_are_logits=True)
    with torch.no_grad():
        boxes, logits = network.module(x)
        rows = wrap_for_export(spec, network).head(boxes, logits).numpy()
    _check_raw(f"{name} (random head outputs)",
               raw_diffs((boxes.numpy(), logits.numpy()), effdet_raw(reference, x)))
    _check_rows(f"{name} (random head outputs)", rows, effdet_predict(reference, x, spec))
