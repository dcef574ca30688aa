"""COCO AP evaluation: sanity of the metric, the results file, and `tierdet eval`
end to end through the real stack (gateway + Triton) and the bare ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tierdet.cli import main
from tierdet.registry.accuracy import APResult, EvalRecord, EvalReport
from tierdet.registry.specs import SPECS
from tierdet.serving import imaging
from tierdet.training.datasets.coco import CocoSplit
from tierdet.training.datasets.synthetic import SHAPES, SynthConfig, generate
from tierdet.training.evaluation import (
    coco_ap,
    ground_truth_as_detections,
    image_samples,
    onnx_runner,
    predict_gateway,
    predict_rows,
    rows_to_coco,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six val images at 128 px: small enough for every CI run."""
    root = tmp_path_factory.mktemp("shapes")
    return generate(root, {"val": 6}, SynthConfig(size=128), seed=11)


def test_ground_truth_as_predictions_scores_ap_one(tiny: Path):
    gt = CocoSplit(tiny, "val").coco
    result = coco_ap(gt, ground_truth_as_detections(gt))
    assert result.ap == result.ap50 == result.ap75 == 1.0


def test_shifted_boxes_score_lower(tiny: Path):
    gt = CocoSplit(tiny, "val").coco
    shifted = ground_truth_as_detections(gt)
    for det in shifted:
        x, y, w, h = det["bbox"]
        det["bbox"] = [x + 0.2 * w, y, w, h]  # IoU 0.67: counts at .50, not at .75
    result = coco_ap(gt, shifted)
    assert result.ap50 == 1.0 and result.ap75 == 0.0 and 0 < result.ap < 0.5


def test_no_detections_score_zero(tiny: Path):
    assert coco_ap(CocoSplit(tiny, "val").coco, []).ap == 0.0


def test_rows_map_back_through_the_letterbox():
    image = np.zeros((100, 200, 3), np.uint8)  # landscape: padded at the bottom
    _, geometry = imaging.letterbox(image, 64, (0, 0, 0))
    rows = np.array([[16, 8, 48, 24, 0.9, 2], [0, 0, 10, 10, 0.0005, 0],
                     [0, 0, 10, 10, 0.8, 6]], np.float32)  # kept, below 0.001, no slot 6
    (det,) = rows_to_coco(rows, geometry, SHAPES, image_id=7)
    assert det["image_id"] == 7 and det["category_id"] == 3  # slot 2 -> triangle (id 3)
    np.testing.assert_allclose(det["bbox"], [50, 25, 100, 50], rtol=1e-6)
    assert det["score"] == pytest.approx(0.9)


def test_report_round_trips(tmp_path: Path):
    record = EvalRecord.of(APResult(0.5, 0.8, 0.6, -1.0, 0.4, 0.7), model="m", tier="fast",
                           source="gateway", dataset="shapes-v2-seed0:x", split="val",
                           images=3)
    path = EvalReport([record]).save(tmp_path / "r.json")
    loaded = EvalReport.load(path)
    assert loaded.records == [record]
    assert loaded.records[0].result.ap_small == -1.0
    assert json.loads(path.read_text())["schema_version"] == 1


def test_eval_end_to_end_through_the_gateway(gateway, built_d0, tiny: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]):
    # built_d0 has random COCO weights: AP is about 0 here. What is checked
    # is the plumbing, and that the serving path returns what the bare
    # model computes.
    out = tmp_path / "results.json"
    assert main(["eval", "--dataset", str(tiny), "--url", gateway.http,
                 "--model", "efficientdet-d0", "--onnx", str(built_d0.onnx),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gateway" in printed and "onnx" in printed
    records = EvalReport.load(out).records
    assert [r.source for r in records] == ["gateway", "onnx"]
    for r in records:
        assert r.model == "efficientdet-d0" and r.images == 6 and r.split == "val"
        assert 0.0 <= r.ap <= 1.0 and r.evaluated_at
    assert records[0].models == {"efficientdet-d0": 6}


def test_gateway_answers_match_the_bare_model(gateway, built_d0, tiny: Path):
    samples = image_samples(CocoSplit(tiny, "val"))
    served = predict_gateway(gateway.http, samples, model="efficientdet-d0").detections
    bare = predict_rows(onnx_runner(built_d0.onnx), samples, SPECS["efficientdet-d0"])
    # Triton may batch concurrent requests; the last bits of a score near the
    # 0.001 cut can then differ, and a row with it.
    assert served and abs(len(served) - len(bare)) <= 0.02 * len(bare)

    def best(dets: list[dict], image_id: int) -> dict:
        return max((d for d in dets if d["image_id"] == image_id), key=lambda d: d["score"])

    for sample in samples:
        a, b = best(served, sample.image_id), best(bare, sample.image_id)
        assert a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.5)
