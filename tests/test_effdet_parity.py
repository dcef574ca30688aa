"""EfficientDet D0-D7: what we export equals what effdet itself computes.

Every model is checked twice, with deterministic random weights (seed 0):

* raw: the exported graph cut before the detection head
  (``export_onnx(raw=True)``: decoded boxes + class logits) against effdet's
  ``EfficientDet`` forward decoded by effdet's own ``decode_box_outputs``;
* after NMS: the served graph (``tierdet build``) against effdet's own
  ``DetBenchPredict`` with ``max_detection_points`` = the spec's
  ``pre_nms_top_k`` (3840, TensorRT's TopK limit).

D0 and D1 run at their native sizes in CI. D2-D7 do at native size under
``-m slow`` (minutes each on 2 cores); in CI they run the same comparisons
in PyTorch at a reduced input (the weights do not depend on the input size;
anchors, decode and NMS are what differ between variants), while the ONNX
translation of the shared pieces is covered by D0/D1 and by the head test in
test_zoo_export.py. Max differences print with ``pytest -s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TEST_WEIGHTS, photos
from tierdet import imaging
from tierdet.specs import SPECS, ModelSpec

pytest.importorskip("effdet")  # build extra

EFFDET = [f"efficientdet-d{i}" for i in range(8)]
NATIVE_IN_CI = ("efficientdet-d0", "efficientdet-d1")
REDUCED_SIZE = 256  # smallest multiple of 128 (effdet's coarsest stride) worth running

# Tolerances: logits are compared absolutely, boxes in input pixels (D7's
# anchors reach 640 px, so float32 rounding alone is ~1e-4 px).
LOGITS_ATOL = 1e-3
BOXES_ATOL_PX = 2e-2
ROWS_ATOL = 2e-2  # after NMS: box px and score


@dataclass(frozen=True)
class Diffs:
    boxes_px: float
    logits: float


def _synthetic(seed: int, size: int) -> np.ndarray:
    """One photo-like synthetic image, uint8 HWC (random weights tie less on it)."""
    from tierdet.export.random_weights import calibration_images

    image = calibration_images(1, size, torch.Generator().manual_seed(seed))[0]
    return image.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _batch(spec: ModelSpec, size: int) -> np.ndarray:
    """uint8 [2, S, S, 3]: a real photo letterboxed as the gateway does, and a synthetic one."""
    prep = spec.preprocessing
    photo, _ = imaging.prepare(photos()["astronaut"], size, prep)
    return np.stack([photo, _synthetic(7, size)])


def _normalised(spec: ModelSpec, images: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std


@torch.no_grad()
def effdet_raw(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """effdet's forward, flattened as its _post_process does, decoded by effdet."""
    from effdet.anchors import Anchors, decode_box_outputs

    cls_levels, box_levels = model(x)
    batch, classes = x.shape[0], model.config.num_classes
    logits = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1, classes) for c in cls_levels], 1)
    codes = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in box_levels], 1)
    anchors = Anchors.from_config(model.config).boxes
    boxes = torch.stack([decode_box_outputs(c, anchors, output_xyxy=True) for c in codes])
    return boxes.numpy(), logits.numpy()


@torch.no_grad()
def effdet_predict(model: torch.nn.Module, x: torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """effdet's DetBenchPredict rows, in our convention (class slot, zeros past the end)."""
    from effdet import DetBenchPredict

    bench = DetBenchPredict(model).eval()
    bench.max_detection_points = spec.pre_nms_top_k
    ref = bench(x).numpy()
    ref[..., 5] -= 1  # effdet reports class slot + 1
    ref[ref[..., 4] <= 0] = 0
    return ref


def raw_diffs(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> Diffs:
    (boxes, logits), (ref_boxes, ref_logits) = got, want
    assert boxes.shape == ref_boxes.shape and logits.shape == ref_logits.shape
    return Diffs(float(np.abs(boxes - ref_boxes).max()), float(np.abs(logits - ref_logits).max()))


def rows_distance(got: np.ndarray, want: np.ndarray) -> float:
    """Max over detections of the distance to the nearest reference row, after
    checking both answer the same number of detections (order of ties is free)."""
    got, want = got[got[:, 4] > 0], want[want[:, 4] > 0]
    assert len(got) == len(want) > 0, (len(got), len(want))
    worst = 0.0
    for row in got:
        # The class slot is a column: a different class is a distance >= 1.
        worst = max(worst, float(np.abs(want - row).max(axis=1).min()))
    return worst


def _check_raw(name: str, diffs: Diffs) -> None:
    print(f"{name} raw: max|boxes - effdet| = {diffs.boxes_px:.3g} px, "
          f"max|logits - effdet| = {diffs.logits:.3g}")
    assert diffs.boxes_px <= BOXES_ATOL_PX and diffs.logits <= LOGITS_ATOL, diffs


def _check_rows(name: str, got: np.ndarray, want: np.ndarray) -> None:
    worst = max(rows_distance(g, w) for g, w in zip(got, want, strict=True))
    print(f"{name} after NMS: max row distance to DetBenchPredict = {worst:.3g}, "
          f"detections per image {[int((w[:, 4] > 0).sum()) for w in want]}")
    assert worst <= ROWS_ATOL, worst


def _native_parity(name: str, home: Path, tmp_path: Path) -> None:
    from tierdet.build import ensure_built
    from tierdet.export.onnx_export import RAW_OUTPUT_NAMES, export_onnx, load_network
    from tierdet.weights import WeightsSource

    spec = SPECS[name]
    source = WeightsSource.parse(TEST_WEIGHTS)
    (built,) = ensure_built([name], source, home, progress=False)
    network = load_network(spec, None, source.seed)
    images = _batch(spec, spec.input_size)
    x = _normalised(spec, images)

    raw_path = export_onnx(spec, network, tmp_path / f"{name}.raw.onnx", raw=True)
    session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    got = session.run(list(RAW_OUTPUT_NAMES), {"images": images})
    _check_raw(name, raw_diffs((got[0], got[1]), effdet_raw(network.module.model, x)))
    del session

    session = ort.InferenceSession(str(built.onnx), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"images": images})[0]
    _check_rows(name, rows, effdet_predict(network.module.model, x, spec))


@pytest.mark.parametrize("name", NATIVE_IN_CI)
def test_exported_graph_equals_effdet(name: str, home: Path, tmp_path: Path) -> None:
    _native_parity(name, home, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EFFDET if n not in NATIVE_IN_CI])
def test_exported_graph_equals_effdet_large(name: str, home: Path, tmp_path: Path) -> None:
    _native_parity(name, home, tmp_path)


@pytest.mark.parametrize("name", [n for n in EFFDET if n not in NATIVE_IN_CI])
def test_decode_and_nms_equal_effdet_at_reduced_size(name: str) -> None:
    """CI's cheap check of D2-D7: our network and head in PyTorch vs effdet."""
    from tierdet.export.onnx_export import load_network, wrap_for_export

    spec = SPECS[name]
    network = load_network(spec, None, 0, input_size=REDUCED_SIZE)
    images = _batch(spec, REDUCED_SIZE)
    x = _normalised(spec, images)
    with torch.no_grad():
        boxes, logits = network.module(x)
        rows = wrap_for_export(spec, network)(torch.from_numpy(images)).numpy()
    _check_raw(f"{name}@{REDUCED_SIZE}", raw_diffs((boxes.numpy(), logits.numpy()),
                                                  effdet_raw(network.module.model, x)))
    _check_rows(f"{name}@{REDUCED_SIZE}", rows, effdet_predict(network.module.model, x, spec))
