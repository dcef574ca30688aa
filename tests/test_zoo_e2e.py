"""Both families end to end: one real tritonserver hosting four models, the gateway
in front, a real photo through ``/v1/detect?model=<name>`` for each.

The gateway must prepare each model's input its own way (EfficientDet:
letterbox; DAMO-YOLO: stretch), so the photos here are not square: the two
ways then give different tensors, and the answer is compared with ONNX
Runtime run on the tensor the spec prescribes, and checked to differ from
the one the other way would give.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import onnxruntime as ort
import oracle
import pytest
from conftest import ZOO, encode, photos
from tierdet.devstack.stack import GatewayProcess
from tierdet.devstack.triton import LocalTriton
from tierdet.registry.specs import SPECS

PHOTOS = ("rocket", "chelsea")  # 427x640 and 300x451: letterbox != stretch
THRESHOLD = 0.05


@pytest.fixture(scope="module")
def zoo_client(zoo_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """The session's four-model stack (conftest: zoo_built, zoo_triton, zoo_gateway)."""
    with httpx.Client(base_url=zoo_gateway.http, timeout=60.0) as client:
        yield client


def test_all_four_models_are_served(zoo_client: httpx.Client) -> None:
    models = {m["name"]: m for m in zoo_client.get("/v1/models").json()["models"]}
    for name in ZOO:
        assert models[name]["ready"], name
        assert models[name]["weights"].startswith("random (seed 0)")
        assert models[name]["published_coco_ap"] == SPECS[name].published_ap


@pytest.mark.parametrize("name", ZOO)
def test_photo_through_the_gateway_equals_onnxruntime(name: str, zoo_client: httpx.Client,
                                                      zoo_triton: LocalTriton) -> None:
    spec = SPECS[name]
    other = "letterbox" if spec.preprocessing.resize == "stretch" else "stretch"
    session = ort.InferenceSession(str(zoo_triton.repository / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for photo in PHOTOS:
        data = encode(photos()[photo])
        decoded = oracle.decode(data)
        r = zoo_client.post("/v1/detect", files={"image": ("x.jpg", data, "image/jpeg")},
                            data={"model": name, "score_threshold": str(THRESHOLD)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == name
        height, width = decoded.shape[:2]
        assert (body["width"], body["height"]) == (width, height)
        got = body["detections"]
        assert got, f"{name} on {photo}: no detection above {THRESHOLD}"
        for d in got:
            assert 0 <= d["x1"] < d["x2"] <= width and 0 <= d["y1"] < d["y2"] <= height, d
            assert THRESHOLD <= d["score"] <= 1 and d["class_name"]
        assert oracle.same(got, oracle.detections(session, decoded, spec, THRESHOLD)), photo
        # The check can tell the two resizes apart, so the gateway used the right one.
        assert not oracle.same(got, oracle.detections(session, decoded, spec, THRESHOLD,
                                                      other)), photo
