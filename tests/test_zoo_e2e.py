"""Both families end to end: one real tritonserver hosting four models, the gateway
in front, a real photo through ``/v1/detect?model=<name>`` for each.

The gateway must prepare each model's input its own way (EfficientDet:
letterbox; DAMO-YOLO: stretch), so the photos here are not square: the two
ways then give different tensors, and the answer is compared with ONNX
Runtime run on the tensor the spec prescribes, and checked to differ from
the one the other way would give.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import ZOO, encode, photos
from tierdet import imaging, validation
from tierdet.detector import Detection, detections_from_rows
from tierdet.localstack import GatewayProcess
from tierdet.specs import SPECS, ModelSpec
from tierdet.triton_server import LocalTriton

PHOTOS = ("rocket", "chelsea")  # 427x640 and 300x451: letterbox != stretch
THRESHOLD = 0.05


@pytest.fixture(scope="module")
def zoo_client(zoo_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """The session's four-model stack (conftest: zoo_built, zoo_triton, zoo_gateway)."""
    with httpx.Client(base_url=zoo_gateway.http, timeout=60.0) as client:
        yield client


def _onnx_rows(session: ort.InferenceSession, image: np.ndarray, spec: ModelSpec,
               resize: str) -> list[Detection]:
    """What the served ONNX answers when the photo is resized ``resize``-wise."""
    prep = dataclasses.replace(spec.preprocessing, resize=resize)
    tensor, geometry = imaging.prepare(image, spec.input_size, prep)
    rows = session.run(None, {"images": tensor[None]})[0][0]
    return detections_from_rows(rows, spec, geometry, THRESHOLD, spec.max_detections)


def _same(got: list[dict], want: list[Detection]) -> bool:
    """Equal up to the order of tied scores."""
    return len(got) == len(want) and all(
        any(abs(g["score"] - w.score) < 1e-4 and g["class_id"] == w.class_id
            and max(abs(g["x1"] - w.x1), abs(g["y1"] - w.y1), abs(g["x2"] - w.x2),
                    abs(g["y2"] - w.y2)) < 0.05 for w in want) for g in got)


def test_all_four_models_are_served(zoo_client: httpx.Client) -> None:
    models = {m["name"]: m for m in zoo_client.get("/v1/models").json()["models"]}
    for name in ZOO:
        assert models[name]["ready"], name
        assert models[name]["weights"].startswith("random (seed 0)")
        assert models[name]["published_coco_ap"] == SPECS[name].coco_ap


@pytest.mark.parametrize("name", ZOO)
def test_photo_through_the_gateway_equals_onnxruntime(name: str, zoo_client: httpx.Client,
                                                      zoo_triton: LocalTriton) -> None:
    spec = SPECS[name]
    other = "letterbox" if spec.preprocessing.resize == "stretch" else "stretch"
    session = ort.InferenceSession(str(zoo_triton.repository / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for photo in PHOTOS:
        data = encode(photos()[photo])
        decoded = validation.decode_image(data, 1 << 30, 1 << 30)
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
        assert _same(got, _onnx_rows(session, decoded, spec, spec.preprocessing.resize)), photo
        # The check can tell the two resizes apart, so the gateway used the right one.
        assert not _same(got, _onnx_rows(session, decoded, spec, other)), photo
