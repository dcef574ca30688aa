"""Parity of tierdet's DAMO-YOLO with the official implementation.

Golden outputs of the official code (tinyvision/damo-yolo @ 319572e, synthetic
but deterministic weights) live in ``$TIERDET_GOLDEN_DIR`` (default:
``<repo>/../shared/golden/damoyolo``, see its README.md). Every
``<stem>.manifest.json`` there is tested: weights rebuilt bit-exactly from the
recipe, then our model unfused, fused and exported to ONNX must reproduce the
golden scores/boxes within the folder's recommended tolerance.

The cheap tests at the bottom cover all seven variants without golden files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from tierdet.build.damoyolo import (
    OFFICIAL_NAMES,
    VARIANTS,
    DamoYolo,
    build_damoyolo,
    count_parameters,
    load_official_state_dict,
    num_anchors,
    variant_for_official_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(
    os.environ.get("TIERDET_GOLDEN_DIR") or REPO_ROOT.parent / "shared" / "golden" / "damoyolo"
)
STRIDES = (8, 16, 32)


def _golden_stems() -> list[Any]:
    stems = sorted(
        p.name.removesuffix(".manifest.json") for p in GOLDEN_DIR.glob("*.manifest.json")
    )
    if stems:
        return stems
    reason = (
        f"no DAMO-YOLO golden files (*.manifest.json) in {GOLDEN_DIR}; "
        "set TIERDET_GOLDEN_DIR to the folder holding them"
    )
    return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-golden")]


GOLDEN_STEMS = _golden_stems()


# ---------------------------------------------------------------- golden data


@dataclass(frozen=True)
class Golden:
    stem: str
    meta: dict[str, Any]
    manifest: list[list[Any]]
    images: np.ndarray  # uint8 [2, 3, S, S]
    scores: np.ndarray  # float32 [2, N, C]
    boxes: np.ndarray  # float32 [2, N, 4] x1y1x2y2

    @property
    def variant(self) -> str:
        return variant_for_official_name(self.stem)

    @property
    def scores_atol(self) -> float:
        return float(self.meta["recommended_tolerance"]["scores_atol"])

    @property
    def boxes_atol(self) -> float:
        return float(self.meta["recommended_tolerance"]["boxes_atol_px"])

    def input_tensor(self) -> torch.Tensor:
        # The official float input is exactly the uint8 image cast to float32.
        return torch.from_numpy(self.images.astype(np.float32))


@cache
def _recipe() -> ModuleType:
    """The golden folder's weights_recipe.py, imported from that folder."""
    path = GOLDEN_DIR / "weights_recipe.py"
    spec = importlib.util.spec_from_file_location("damoyolo_golden_weights_recipe", path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _golden(stem: str) -> Golden:
    meta = json.loads((GOLDEN_DIR / f"{stem}.meta.json").read_text())
    manifest = json.loads((GOLDEN_DIR / f"{stem}.manifest.json").read_text())
    with np.load(GOLDEN_DIR / f"{stem}.npz") as arrays:
        return Golden(stem, meta, manifest, arrays["input"], arrays["scores"], arrays["boxes"])


@cache
def _golden_state_dict(stem: str) -> dict[str, torch.Tensor]:
    recipe = _recipe()
    bn_stats = recipe.load_bn_stats(GOLDEN_DIR / f"{stem}.bnstats.npz")
    return recipe.make_state_dict(_golden(stem).manifest, bn_stats=bn_stats)


def _loaded_model(stem: str) -> DamoYolo:
    """A fresh unfused model holding the golden weights (loaded like a .pth)."""
    model = build_damoyolo(_golden(stem).variant)
    load_official_state_dict(model, {"model": _golden_state_dict(stem)})
    return model.eval()


def _run(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        scores, boxes = model(images)
    assert scores.dtype == torch.float32 and boxes.dtype == torch.float32
    return scores.numpy(), boxes.numpy()


@cache
def _unfused_outputs(stem: str) -> tuple[np.ndarray, np.ndarray]:
    return _run(_loaded_model(stem), _golden(stem).input_tensor())


def _assert_matches_golden(
    golden: Golden,
    scores: np.ndarray,
    boxes: np.ndarray,
    what: str,
    batch: slice = slice(None),
) -> None:
    ref_scores, ref_boxes = golden.scores[batch], golden.boxes[batch]
    assert scores.shape == ref_scores.shape, f"{what}: scores shape {scores.shape}"
    assert boxes.shape == ref_boxes.shape, f"{what}: boxes shape {boxes.shape}"
    d_scores = float(np.abs(scores - ref_scores).max())
    d_boxes = float(np.abs(boxes - ref_boxes).max())
    report = (
        f"{golden.stem} {what}: max|scores - golden| = {d_scores:.3g} (atol {golden.scores_atol}), "
        f"max|boxes - golden| = {d_boxes:.3g} px (atol {golden.boxes_atol})"
    )
    print(report)  # visible with `pytest -s`; the numbers are worth tracking
    assert d_scores <= golden.scores_atol and d_boxes <= golden.boxes_atol, report


# --------------------------------------------------------------- golden tests


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_weights_recipe_reproduces_golden_weights(stem: str) -> None:
    golden = _golden(stem)
    digest = _recipe().state_dict_sha256(_golden_state_dict(stem), golden.manifest)
    assert digest == golden.meta["weights_sha256"], (
        f"{stem}: rebuilt weights differ from the ones the golden outputs were made with "
        "(torch RNG changed?)"
    )


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_state_dict_layout_matches_official(stem: str) -> None:
    golden = _golden(stem)
    ours = build_damoyolo(golden.variant).state_dict()
    official = {key: tuple(shape) for key, shape, _ in golden.manifest}
    assert set(ours) == set(official), (
        f"missing: {sorted(set(official) - set(ours))[:5]}, "
        f"unexpected: {sorted(set(ours) - set(official))[:5]}"
    )
    wrong = {
        k: (tuple(v.shape), official[k]) for k, v in ours.items() if tuple(v.shape) != official[k]
    }
    assert not wrong, f"shape mismatches (ours, official): {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_unfused_matches_golden(stem: str) -> None:
    golden = _golden(stem)
    assert golden.meta["N"] == num_anchors(golden.meta["input_size"])
    _assert_matches_golden(golden, *_unfused_outputs(stem), "torch unfused")


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_fused_matches_golden(stem: str) -> None:
    golden = _golden(stem)
    model = _loaded_model(stem).fuse()
    _assert_matches_golden(golden, *_run(model, golden.input_tensor()), "torch fused")


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_onnx_export_matches_golden(stem: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    golden = _golden(stem)
    model = _loaded_model(stem).fuse()
    path = tmp_path / f"{stem}.onnx"
    torch.onnx.export(
        model,
        (golden.input_tensor(),),
        str(path),
        dynamo=True,
        opset_version=18,
        external_data=False,
        input_names=["images"],
        output_names=["scores", "boxes"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},),
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    assert isinstance(batch_dim, str), f"batch axis is not dynamic: {batch_dim!r}"

    images = golden.images.astype(np.float32)
    scores, boxes = session.run(["scores", "boxes"], {"images": images})
    _assert_matches_golden(golden, scores, boxes, "onnxruntime batch 2")
    # A different batch size through the same graph (dynamic axis really works).
    scores, boxes = session.run(["scores", "boxes"], {"images": images[1:]})
    _assert_matches_golden(golden, scores, boxes, "onnxruntime batch 1", slice(1, None))


def _anchor_grid(size: int) -> np.ndarray:
    """(N, 2) anchor points (x, y) written out independently of the model."""
    levels = []
    for stride in STRIDES:
        cells = size // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        levels.append(np.stack([xs.ravel(), ys.ravel()], axis=1) * stride)
    return np.concatenate(levels).astype(np.float32)


@pytest.mark.parametrize("stem", GOLDEN_STEMS)
def test_boxes_are_corner_xyxy(stem: str) -> None:
    golden = _golden(stem)
    _, boxes = _unfused_outputs(stem)
    anchors = _anchor_grid(golden.meta["input_size"])
    ax, ay = anchors[:, 0], anchors[:, 1]
    eps = 1e-3
    for name, arr in (("golden", golden.boxes), ("ours", boxes)):
        x1, y1, x2, y2 = np.moveaxis(arr, -1, 0)
        # Side distances are expectations over bins 0..reg_max, hence >= 0: a
        # corner box always has x2 >= x1, y2 >= y1 and contains its anchor.
        assert (x2 >= x1).all() and (y2 >= y1).all(), name
        assert ((x1 <= ax + eps) & (ax - eps <= x2)).all(), name
        assert ((y1 <= ay + eps) & (ay - eps <= y2)).all(), name
    # Reading our numbers as centre/size (the official TensorRT end2end mistake)
    # lands nowhere near the golden corners.
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    as_centre_size = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    d_boxes = float(np.abs(as_centre_size - golden.boxes).max())
    assert d_boxes > 100 * golden.boxes_atol, d_boxes


# ------------------------------------------------ all seven variants, cheaply

# Layout of the official model's state_dict per config, measured once with the
# official code (Detector(config).state_dict(), damo-yolo @ 319572e):
# (number of keys, parameters unfused, parameters after RepConv fusion,
#  sha256[:16] of "key:shape" lines in state_dict order).
OFFICIAL_LAYOUT: dict[str, tuple[int, int, int, str]] = {
    "damoyolo_tinynasL18_Ns": (526, 1405691, 1405691, "bb31e0974d12abe7"),
    "damoyolo_tinynasL18_Nm": (526, 2707219, 2707219, "68f6e4c70773018c"),
    "damoyolo_tinynasL20_Nl": (544, 5688579, 5688579, "bf0f98922fac7df0"),
    "damoyolo_tinynasL20_T": (586, 8875727, 8479631, "85e31f144560aaf6"),
    "damoyolo_tinynasL25_S": (640, 16935647, 16251631, "6a77ff01581415c8"),
    "damoyolo_tinynasL35_M": (844, 29241727, 28178175, "449ee02e3f03f6af"),
    "damoyolo_tinynasL45_L": (1114, 43861759, 42058111, "7409d4594341e694"),
}


def _layout_digest(state_dict: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def test_official_name_table_covers_all_variants() -> None:
    assert set(OFFICIAL_NAMES) == set(OFFICIAL_LAYOUT)
    assert {variant_for_official_name(name) for name in OFFICIAL_LAYOUT} == set(VARIANTS)
    assert len(VARIANTS) == 7


@pytest.mark.parametrize("stem", sorted(OFFICIAL_LAYOUT))
def test_variant_layout_and_parameter_count(stem: str) -> None:
    n_keys, n_params, n_params_fused, digest = OFFICIAL_LAYOUT[stem]
    model = build_damoyolo(variant_for_official_name(stem))
    state_dict = model.state_dict()
    assert len(state_dict) == n_keys
    assert _layout_digest(state_dict) == digest, "keys/shapes/order differ from the official model"
    assert count_parameters(model) == n_params
    assert count_parameters(model.fuse()) == n_params_fused


def _calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set BN running stats to the batch statistics of ``images`` so that
    randomly initialised weights give unsaturated, comparable outputs."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_forward_and_fuse(variant: str) -> None:
    size = 128  # reduced size, multiple of 32
    generator = torch.Generator().manual_seed(0)
    # Deterministic default init without touching the global RNG state.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_damoyolo(variant)
    images = torch.rand(2, 3, size, size, generator=generator) * 255
    _calibrate_batchnorm(model, images)

    scores, boxes = _run(model, images[:1])
    n = num_anchors(size)
    assert scores.shape == (1, n, 80) and boxes.shape == (1, n, 4)
    assert np.isfinite(scores).all() and np.isfinite(boxes).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all()

    fused_scores, fused_boxes = _run(model.fuse(), images[:1])
    assert np.abs(fused_scores - scores).max() <= 2e-3
    assert np.abs(fused_boxes - boxes).max() <= 0.3


def test_num_classes_anchor_count_and_strict_loading() -> None:
    assert num_anchors(416) == 3549 and num_anchors(640) == 8400
    assert num_anchors((320, 640)) == 40 * 80 + 20 * 40 + 10 * 20
    with pytest.raises(ValueError):
        num_anchors(100)

    model = build_damoyolo("ns", num_classes=3)
    scores, boxes = _run(model, torch.zeros(1, 3, 64, 64))
    n = num_anchors(64)
    assert scores.shape == (1, n, 3) and boxes.shape == (1, n, 4)

    state_dict = build_damoyolo("ns").state_dict()  # 80-class shapes
    with pytest.raises(RuntimeError):
        load_official_state_dict(
            build_damoyolo("ns"),
            {k: v for k, v in state_dict.items() if "scales.0" not in k},
        )
    with pytest.raises(RuntimeError):
        load_official_state_dict(build_damoyolo("ns"), {**state_dict, "head.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError):
        load_official_state_dict(model, state_dict)  # class count mismatch
    with pytest.raises(ValueError):
        load_official_state_dict(build_damoyolo("t").fuse(), build_damoyolo("t").state_dict())
