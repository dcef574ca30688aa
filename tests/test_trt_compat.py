"""Every graph tierdet builds is one TensorRT 10's ONNX parser takes and fp16 can
carry (tierdet.build.trt_compat); graphs made with each known defect are caught."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tierdet.build import trt_compat

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-128"


def _frames(size: int) -> list[tuple[str, np.ndarray]]:
    """Three real photographs (stretched to the input), white, black and noise."""
    names = sorted(i["file_name"] for i in
                   json.loads((COCO / "instances.json").read_text())["images"])[:3]
    photos = [(n, cv2.resize(cv2.imread(str(COCO / "images" / n))[..., ::-1], (size, size)))
              for n in names]
    rng = np.random.default_rng(0)
    odd = [("all-white", np.full((size, size, 3), 255, np.uint8)),
           ("all-black", np.zeros((size, size, 3), np.uint8)),
           ("noise", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))]
    return [(label, np.ascontiguousarray(image)[None]) for label, image in photos + odd]


def _built(zoo_built, cards_built) -> list:
    return [*zoo_built, *cards_built]


def test_every_built_graph_passes_the_parser_rules(zoo_built, cards_built):
    for model in _built(zoo_built, cards_built):
        problems = trt_compat.parser_problems(onnx.load(str(model.onnx)))
        assert problems == [], (model.spec.name, problems)


def test_every_built_graph_keeps_the_nms_path_in_fp16_range(zoo_built, cards_built):
    """On real photographs and on frames no camera sends (random weights too:
    their regressions are what blow up on odd inputs)."""
    for model in _built(zoo_built, cards_built):
        hazards = trt_compat.fp16_hazards(model.onnx, _frames(model.spec.input_size))
        assert hazards == [], (model.spec.name, hazards)


# --- graphs carrying each defect ----------------------------------------------------------


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value))


def _graph(defect: str | None = None) -> onnx.ModelProto:
    """uint8 pixels -> (a zero from them) + two boxes -> NMS -> keep mask [1, 2], the
    shape of tierdet's NMS, with one ``defect`` (None: none)."""
    offset = {"class offset": 45_700.0, "past fp16": 70_000.0}.get(defect or "", 0.0)
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11 + offset]]], np.float32)
    cast_first = defect != "transpose before cast"
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT) if cast_first else
        helper.make_node("Transpose", ["images"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2]) if cast_first else
        helper.make_node("Cast", ["t"], ["x"], to=TensorProto.FLOAT),
        _const("axes", np.array([1, 2, 3], np.int64)),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
        _const("zero", np.array(0.0, np.float32)),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        _const("shape", np.array([1, 1, 1], np.int64)),
        helper.make_node("Reshape", ["nothing", "shape"], ["nothing3"]),
        _const("boxes0", boxes),
        helper.make_node("Add", ["boxes0", "nothing3"], ["boxes"]),
        _const("scores", np.array([[[0.9, 0.8]]], np.float32)),
        _const("max", np.array([2], np.int64)),
        _const("iou", np.array([0.5], np.float32)),
        _const("threshold", np.array([0.0], np.float32)),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou"]
                         + ([] if defect == "no score threshold" else ["threshold"]), ["sel"]),
        _const("cols", np.array([0, 2], np.int64)),
        helper.make_node("Gather", ["sel", "cols"], ["where"], axis=1),
        _const("mask0", np.zeros((1, 2), np.float32)),
        helper.make_node("Shape", ["sel"], ["n"], start=0, end=1),
        _const("one", np.array(1.0, np.float32)),
        helper.make_node("Expand", ["one", "n"], ["ones"]),
        helper.make_node("ScatterND", ["mask0", "where", "ones"], ["keep"],
                         **({"reduction": "none"} if defect == "scatter reduction" else {})),
    ]
    graph = helper.make_graph(
        nodes, "defect", [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                                        [1, 8, 8, 3])],
        [helper.make_tensor_value_info("keep", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _hazards(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return trt_compat.fp16_hazards(path, [("black", np.zeros((1, 8, 8, 3), np.uint8))])


def test_the_defect_free_graph_passes_both_checks(tmp_path):
    assert trt_compat.parser_problems(_graph()) == []
    assert _hazards(_graph(), tmp_path) == []


@pytest.mark.parametrize("defect,said", [
    ("scatter reduction", "reduction attribute"),
    ("transpose before cast", "uint8 input images feeds ['Transpose']"),
    ("no score threshold", "no score_threshold input"),
])
def test_a_graph_the_parser_refuses_is_reported(defect, said):
    (problem,) = trt_compat.parser_problems(_graph(defect))
    assert said in problem


@pytest.mark.parametrize("defect,said", [
    ("class offset", "fp16's spacing is 32 px"),  # D0's offsets: ~45,700 px
    ("past fp16", "past fp16's 65504"),  # D2 and up
])
def test_boxes_fp16_cannot_carry_are_reported(defect, said, tmp_path):
    assert trt_compat.parser_problems(_graph(defect)) == []
    (hazard,) = _hazards(_graph(defect), tmp_path)
    assert said in hazard and "boxes" in hazard


def test_an_operator_nobody_checked_is_reported():
    model = _graph()
    model.graph.node[3].op_type = "ReduceL2"  # the ReduceMean
    assert any("ReduceL2" in p and "not among" in p for p in trt_compat.parser_problems(model))


@pytest.mark.slow
def test_every_zoo_model_at_its_native_size_passes_both_checks(home):
    """All 15 zoo models (random weights, seed 0): run once and reported; the
    four CI builds are checked above in every run."""
    from conftest import TEST_WEIGHTS
    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource
    from tierdet.registry.specs import SPECS, Family

    zoo = [n for n, s in SPECS.items() if s.family in (Family.EFFICIENTDET, Family.DAMOYOLO)
           and s.published_ap is not None]
    assert len(zoo) == 15, zoo
    for model in ensure_built(zoo, WeightsSource.parse(TEST_WEIGHTS), home, progress=False):
        assert trt_compat.parser_problems(onnx.load(str(model.onnx))) == [], model.spec.name
        hazards = trt_compat.fp16_hazards(model.onnx, _frames(model.spec.input_size))
        assert hazards == [], (model.spec.name, hazards)
