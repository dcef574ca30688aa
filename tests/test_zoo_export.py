"""DAMO-YOLO through the exporter, and the detection head every model shares.

* Official-form checkpoints (the golden weights saved as a ``.pth``) go
  through ``load_network`` (strict load, RepConv fusion) and ``export_onnx``
  and still reproduce the official outputs.
* Exported DAMO-YOLO boxes are corners x1, y1, x2, y2: every served detection
  is one of the official model's corner boxes (the official end2end export
  declares them centre/size, and its users get 0 mAP).
* Random DAMO-YOLO weights are deterministic, input-dependent and unsaturated.
* The shared detection head's ONNX translation equals its PyTorch form, for
  logits and probabilities and every IoU threshold in the registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TEST_WEIGHTS
from test_damoyolo_golden import GOLDEN_STEMS, _assert_matches_golden, _golden, _golden_state_dict
from tierdet.registry.specs import SPECS, ZOO, Family

pytest.importorskip("torchvision")  # build extra


def _spec_for_variant(variant: str):
    (spec,) = [s for s in ZOO.values() if s.family is Family.DAMOYOLO and s.arch == variant]
    return spec


def _nhwc(images_nchw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


def _synthetic(seed: int, batch: int, size: int) -> np.ndarray:
    from tierdet.build.export.random_weights import calibration_images

    images = calibration_images(batch, size, torch.Generator().manual_seed(seed))
    return images.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _save_official_form(stem: str, path: Path) -> Path:
    """The golden weights as the official trainer saves them: {"model": state_dict}."""
    torch.save({"model": _golden_state_dict(stem)}, path)
    return path


@pytest.fixture(scope="module")
def golden_graphs(tmp_path_factory):
    """Per golden stem: (spec, raw ONNX path, full ONNX path), exported from a .pth."""
    from tierdet.build.export.onnx_export import export_onnx, load_network

    made: dict[str, tuple] = {}

    def make(stem: str):
        if stem not in made:
            folder = tmp_path_factory.mktemp(stem)
            spec = _spec_for_variant(_golden(stem).variant)
            network = load_network(spec, _save_official_form(stem, folder / "ckpt.pth"), None)
            assert network.module.model.is_fused and not network.scores_are_logits
            made[stem] = (spec, export_onnx(spec, network, folder / "raw.onnx", raw=True),
                          export_onnx(spec, network, folder / "full.onnx"))
        return made[stem]

    return make


def _nano_in_ci(stems: list) -> list:
    """Nano golden variants in CI, the others under -m slow (two exports each).
    (Non-string entries are the golden module's skip marker: kept as they are.)"""
    return [s if not isinstance(s, str) or "_N" in s
            else pytest.param(s, marks=pytest.mark.slow) for s in stems]


@pytest.mark.parametrize("stem", _nano_in_ci(GOLDEN_STEMS))
def test_official_checkpoint_through_the_exporter_matches_golden(stem, golden_graphs):
    golden = _golden(stem)
    _, raw_path, _ = golden_graphs(stem)
    session = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    # uint8 NHWC in, normalisation inside the graph (identity for DAMO-YOLO).
    boxes, scores = session.run(["boxes", "scores"], {"images": _nhwc(golden.images)})
    _assert_matches_golden(golden, scores, boxes, "tierdet export (raw graph)")


@pytest.mark.parametrize("stem", _nano_in_ci(GOLDEN_STEMS))
def test_served_boxes_are_the_official_corner_boxes(stem, golden_graphs):
    """Each detection of the served graph is an official (anchor, class) output:
    its box equals that anchor's official x1,y1,x2,y2 (clipped to the input frame,
    as the served graph clips candidates) and its score that class's."""
    golden = _golden(stem)
    spec, _, full_path = golden_graphs(stem)
    session = ort.InferenceSession(str(full_path), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"images": _nhwc(golden.images)})[0]
    box_tol, score_tol = golden.boxes_atol, golden.scores_atol
    closest_centre_size = np.inf
    for b, image_rows in enumerate(rows):
        valid = image_rows[image_rows[:, 4] > 0]
        assert len(valid) == spec.max_detections
        official = np.clip(golden.boxes[b], 0, spec.input_size)
        for x1, y1, x2, y2, score, cls in valid:
            box_err = np.abs(official - [x1, y1, x2, y2]).max(axis=1)
            score_err = np.abs(golden.scores[b, :, int(cls)] - score)
            assert ((box_err <= box_tol) & (score_err <= score_tol)).any(), (b, x1, y1, x2, y2)
        # The same rows read as centre/size (the official end2end mistake)
        # match no official box: every detection would be lost.
        cx, cy, w, h = valid[:, :4].T
        as_cs = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        nearest = np.abs(official[None] - as_cs[:, None]).max(axis=2).min(axis=1)
        closest_centre_size = min(closest_centre_size, float(nearest.min()))
    assert closest_centre_size > 10 * box_tol, closest_centre_size


@pytest.fixture(scope="module")
def built_ns(home):
    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource

    (model,) = ensure_built(["damoyolo-ns"], WeightsSource.parse(TEST_WEIGHTS), home,
                            progress=False)
    return model


def test_damoyolo_graph_equals_torch_and_batches(built_ns):
    """The built (random seed 0) graph vs the PyTorch pipeline it came from."""
    from tierdet.build.export.onnx_export import load_network, wrap_for_export
    from tierdet.build.weights import WeightsSource

    spec = built_ns.spec
    network = load_network(spec, None, WeightsSource.parse(TEST_WEIGHTS).seed)
    images = _synthetic(3, 3, spec.input_size)
    session = ort.InferenceSession(str(built_ns.onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images})[0]
    with torch.no_grad():
        want = wrap_for_export(spec, network)(torch.from_numpy(images)).numpy()
    assert got.shape == want.shape == (3, spec.max_detections, 6)
    for i in range(3):
        valid = got[i][got[i][:, 4] > 0]
        assert len(valid) == (want[i][:, 4] > 0).sum() > 0
        for row in valid:  # equal up to the order of tied scores
            assert np.abs(want[i] - row).max(axis=1).min() <= 1e-2, row
        alone = session.run(None, {"images": images[i:i + 1]})[0][0]
        assert np.abs(alone - got[i]).max() <= 1e-2


def test_damoyolo_boxes_are_corners_in_the_served_graph(built_ns):
    """Without golden files: served rows are corner boxes of the raw network
    (clipped to the input frame, as the graph clips its candidates)."""
    from tierdet.build.export.onnx_export import load_network

    spec = built_ns.spec
    network = load_network(spec, None, 0)  # TEST_WEIGHTS' seed
    images = _synthetic(4, 1, spec.input_size)
    with torch.no_grad():
        boxes, _ = network.module(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    raw = np.clip(boxes[0].numpy(), 0, spec.input_size)
    session = ort.InferenceSession(str(built_ns.onnx), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"images": images})[0][0]
    for row in rows[rows[:, 4] > 0]:
        assert row[2] > row[0] and row[3] > row[1]
        assert np.abs(raw - row[:4]).max(axis=1).min() <= 5e-2  # px, ORT vs torch rounding


@pytest.mark.parametrize("variant", ["ns", "t"])
def test_random_damoyolo_weights_are_useful(variant):
    """Deterministic per seed, input-dependent, scores neither flat nor saturated."""
    from tierdet.build.export.onnx_export import load_network

    spec = _spec_for_variant(variant)
    images = torch.from_numpy(_synthetic(5, 2, spec.input_size)).permute(0, 3, 1, 2).float()
    outputs = []
    for seed in (0, 0, 1):
        with torch.no_grad():
            boxes, scores = load_network(spec, None, seed).module(images)
        outputs.append((boxes.numpy(), scores.numpy()))
    (b0, s0), (b0_again, s0_again), (_, s1) = outputs
    assert np.array_equal(b0, b0_again) and np.array_equal(s0, s0_again)
    assert np.abs(s0 - s1).max() > 0.05  # the seed matters
    assert np.abs(s0[0] - s0[1]).mean() > 0.01 and np.abs(b0[0] - b0[1]).mean() > 1.0
    assert 0.3 < s0.max() < 0.999 and np.median(s0) > 0.01
    widths = b0[..., 2] - b0[..., 0]
    assert (widths > 0).all() and widths.std() > 5.0  # boxes have not snapped to bins


def test_damoyolo_checkpoints_load_strictly(tmp_path):
    from tierdet.build.damoyolo import build_damoyolo
    from tierdet.build.export.onnx_export import load_network

    spec = SPECS["damoyolo-ns"]
    state = build_damoyolo("ns").state_dict()
    state.pop(next(iter(state)))
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_network(spec, tmp_path / "partial.pth", None)
    torch.save({"model": build_damoyolo("ns").state_dict(), "meta": object()},
               tmp_path / "pickled.pth")
    with pytest.raises(Exception, match=r"Weights only load failed"):  # no arbitrary unpickling
        load_network(spec, tmp_path / "pickled.pth", None)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probabilities"])
@pytest.mark.parametrize("iou", sorted({s.nms_iou for s in SPECS.values()}))
def test_detection_head_onnx_equals_torch(logits: bool, iou: float) -> None:
    """The head alone (top-k, class-aware NMS, top-K), exported and run by ORT."""
    from tierdet.build.export.nms import CUSTOM_TRANSLATIONS
    from tierdet.build.export.postprocess import DetectionHead

    g = torch.Generator().manual_seed(int(iou * 100) + logits)
    xy = torch.rand(2, 600, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(2, 600, 2, generator=g) * 80 + 1], dim=2)
    scores = torch.randn(2, 600, 7, generator=g) * 2 - 1
    if not logits:
        scores = scores.sigmoid()
    head = DetectionHead(pre_nms_top_k=1000, max_detections=100, iou_threshold=iou,
                         scores_are_logits=logits).eval()
    with torch.no_grad():
        want = head(boxes, scores).numpy()
        program = torch.onnx.export(head, (boxes, scores), dynamo=True,
                                    custom_translation_table=CUSTOM_TRANSLATIONS,
                                    dynamic_shapes=({0: torch.export.Dim("b")},
                                                    {0: torch.export.Dim("b")}))
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (boxes.numpy(), scores.numpy()), strict=True)))[0]
    assert (want[..., 4] > 0).sum() == (got[..., 4] > 0).sum() > 50

    def canonical(rows: np.ndarray) -> np.ndarray:
        # Scores equal to float32 rounding (ORT's sigmoid vs torch's) may come
        # in either order: sort on rounded scores, then on the box.
        score = -np.round(rows[:, 4], 5)
        return rows[np.lexsort((rows[:, 1], rows[:, 0], rows[:, 5], score))]

    for g_rows, w_rows in zip(got, want, strict=True):
        np.testing.assert_allclose(canonical(g_rows), canonical(w_rows), atol=1e-5)
