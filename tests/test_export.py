"""The exported graph equals the PyTorch model it came from, NMS included."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tierdet.registry.specs import SPECS

torchvision = pytest.importorskip("torchvision")  # build extra


def _inputs(seed: int, batch: int, size: int) -> np.ndarray:
    from tierdet.build.export.random_weights import calibration_images

    g = torch.Generator().manual_seed(seed)
    images = calibration_images(batch, size, g).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _match(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    """Detections [K, 6] equal up to the order of equal scores."""
    a, b = a[a[:, 4] > 0], b[b[:, 4] > 0]
    assert len(a) == len(b)
    for row in a:
        dist = np.abs(b - row).max(axis=1)
        assert dist.min() <= atol, (row, b[dist.argmin()])


@pytest.fixture(scope="module")
def d0_network():
    from tierdet.build.export.onnx_export import load_network

    return load_network(SPECS["efficientdet-d0"], None, seed=0)


def test_random_weights_are_deterministic_and_onnx_matches_torch(built_d0, d0_network):
    from tierdet.build.export.onnx_export import wrap_for_export

    spec = built_d0.spec
    session = ort.InferenceSession(str(built_d0.onnx), providers=["CPUExecutionProvider"])
    images = _inputs(1, 3, spec.input_size)
    got = session.run(None, {"images": images})[0]
    with torch.no_grad():
        want = wrap_for_export(spec, d0_network)(torch.from_numpy(images)).numpy()
    assert got.shape == (3, spec.max_detections, 6)
    assert (got[..., 4] > 0.05).any(), "random weights must give non-trivial scores"
    for g, w in zip(got, want, strict=True):
        _match(g, w, atol=2e-2)


def test_batch_axis_is_dynamic_and_items_are_independent(built_d0):
    session = ort.InferenceSession(str(built_d0.onnx), providers=["CPUExecutionProvider"])
    images = _inputs(2, 2, built_d0.spec.input_size)
    both = session.run(None, {"images": images})[0]
    for i in range(2):
        alone = session.run(None, {"images": images[i:i + 1]})[0][0]
        _match(alone, both[i], atol=1e-2)


def test_in_graph_nms_equals_effdet_detbenchpredict(built_d0, d0_network):
    """After NMS, our graph answers what effdet's own predictor answers."""
    from effdet import DetBenchPredict

    spec = built_d0.spec
    bench = DetBenchPredict(d0_network.module.model).eval()
    bench.max_detection_points = spec.pre_nms_top_k  # TensorRT's TopK limit, see specs
    images = _inputs(3, 2, spec.input_size)
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        ref = bench(x).numpy()
    ref[..., 5] -= 1  # effdet reports class slot + 1
    ref[ref[..., 4] <= 0] = 0
    session = ort.InferenceSession(str(built_d0.onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images})[0]
    for g, r in zip(got, ref, strict=True):
        _match(g, r, atol=2e-2)


def test_nms_op_matches_torchvision():
    """The custom op's ONNX translation keeps exactly what torchvision keeps: NMS
    within each class, over the candidates scoring above the threshold."""
    from tierdet.build.export.nms import CUSTOM_TRANSLATIONS, nms_keep

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 300, 2, generator=g) * 200
    wh = torch.rand(2, 300, 2, generator=g) * 60 + 1
    boxes = torch.cat([xy, xy + wh], dim=2)
    scores = torch.rand(2, 300, generator=g)
    classes = torch.randint(0, 3, (2, 300), generator=g)
    want = nms_keep(boxes, scores, classes, 3, 0.5, 0.2)

    class Keep(torch.nn.Module):
        def forward(self, b, s, c):
            return nms_keep(b, s, c, 3, 0.5, 0.2)

    program = torch.onnx.export(Keep().eval(), (boxes, scores, classes), dynamo=True,
                                custom_translation_table=CUSTOM_TRANSLATIONS)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in
                             zip(session.get_inputs(), (boxes, scores, classes), strict=True)})[0]
    assert want.sum() > 10 and (want.numpy() == got).all()
    # Nothing at or below the threshold is kept, and classes do not suppress each other:
    # the same boxes as one class keep fewer.
    assert not (want[scores <= 0.2] > 0).any()
    assert nms_keep(boxes, scores, torch.zeros_like(classes), 3, 0.5, 0.2).sum() < want.sum()


@pytest.mark.parametrize(("multi_label", "logits", "top_k"), [
    (True, True, 1000),  # every pair ranked: k >= anchors
    (True, False, 200),  # in two steps: k < anchors
    (False, False, 300),  # each box's best class
])
def test_the_onnx_head_answers_as_the_torch_head(multi_label, logits, top_k):
    """Cards are served with the head written in ONNX (tierdet.build.detection_head),
    the zoo with the one traced from torch: the same rows for the same candidates."""
    from onnx import TensorProto, helper
    from tierdet.build.detection_head import Head, Nodes
    from tierdet.build.export.postprocess import DetectionHead

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(2, 500, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(2, 500, 2, generator=g) * 80 + 1], dim=2)
    scores = torch.randn(2, 500, 5, generator=g) * 3
    if not logits:
        scores = scores.sigmoid()
    settings = {"pre_nms_top_k": top_k, "max_detections": 100, "iou_threshold": 0.5,
                "scores_are_logits": logits, "input_size": 320}
    torch_head = DetectionHead(**settings)
    want = (torch_head(boxes, scores) if multi_label
            else torch_head.forward_best_class(boxes, scores)).numpy()
    nodes = Nodes()
    Head(num_classes=5, multi_label=multi_label, **settings).detections(
        nodes, "boxes", "scores", anchors=500, out="rows")
    model = nodes.model([helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["b", 500, 4]),
                         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 500, 5])],
                        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", 100, 6])],
                        "head")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
    assert (want[..., 4] > 0).sum() > 50
    # The same candidates, kept and ordered alike; a sigmoid may differ in its last bit.
    np.testing.assert_array_equal(got[..., [0, 1, 2, 3, 5]], want[..., [0, 1, 2, 3, 5]])
    np.testing.assert_allclose(got[..., 4], want[..., 4], rtol=1e-6, atol=0)


def test_a_cached_build_is_reused_only_for_the_same_weights(zoo_built, tmp_path):
    import shutil

    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource

    # DAMO-YOLO-Ns: the rule is the same for every model, and its rebuild costs
    # about 11 s of CPU where EfficientDet-D0's costs 27.
    (cached,) = [m for m in zoo_built if m.spec.name == "damoyolo-ns"]
    (tmp_path / "onnx").mkdir()
    for path in (cached.onnx, cached.onnx.with_suffix(".json")):
        shutil.copy(path, tmp_path / "onnx" / path.name)
    same = WeightsSource.parse("random:0")
    other = WeightsSource.parse("random:1")
    assert cached.provenance["weights"] == same.describe()
    (reused,) = ensure_built(["damoyolo-ns"], same, tmp_path, progress=False)
    assert reused.provenance == cached.provenance  # no rebuild for the same weights
    (rebuilt,) = ensure_built(["damoyolo-ns"], other, tmp_path, progress=False)
    assert rebuilt.provenance["weights"] == other.describe()
    assert rebuilt.provenance["onnx_sha256"] != cached.provenance["onnx_sha256"]
