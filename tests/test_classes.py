"""The ``classes`` option on every surface of the real stack: it was added through
``tierdet.contract.options.DetectOptions`` alone, so it must work everywhere.

The test model has random weights: it finds boxes of many classes in a photo
at a score threshold of 0, which is what a filter needs to show it filters.
"""

from __future__ import annotations

import base64
import json

import grpc
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet import cli
from tierdet.client import AsyncGrpcClient, Client, GrpcClient, TierdetError
from tierdet.contract import wire
from tierdet.contract.options import DetectOptions
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc

PHOTO = encode(photos()["astronaut"])
OPTIONS = {"score_threshold": "0", "max_detections": "100", "tier": "accurate"}


@pytest.fixture(scope="module")
def classes_seen(client) -> dict[str, int]:
    """Class name -> boxes the model finds in the photo with no filter."""
    r = client.post("/v1/detect", files={"image": ("a.jpg", PHOTO)}, data=OPTIONS)
    assert r.status_code == 200, r.text
    seen: dict[str, int] = {}
    for d in r.json()["detections"]:
        seen[d["class_name"]] = seen.get(d["class_name"], 0) + 1
    assert len(seen) >= 3, seen  # enough classes for a filter to have work
    return seen


def _two(seen: dict[str, int]) -> list[str]:
    return sorted(sorted(seen, key=seen.__getitem__)[:2])


def test_http_form_query_and_json_filter_by_name_and_id(client, classes_seen):
    keep = _two(classes_seen)
    form = client.post("/v1/detect", files={"image": ("a.jpg", PHOTO)},
                       data={**OPTIONS, "classes": ",".join(keep)}).json()
    assert sorted({d["class_name"] for d in form["detections"]}) == keep
    assert len(form["detections"]) == sum(classes_seen[c] for c in keep)
    ids = sorted({d["class_id"] for d in form["detections"]})
    query = client.post("/v1/detect", params={"classes": ",".join(map(str, ids))},
                        files={"image": ("a.jpg", PHOTO)}, data=OPTIONS).json()
    as_json = client.post("/v1/detect", json={"image": base64.b64encode(PHOTO).decode(),
                                              "classes": ids, "score_threshold": 0,
                                              "tier": "accurate"}).json()
    assert query["detections"] == form["detections"] == as_json["detections"]


def test_the_limit_applies_after_the_filter(client, classes_seen):
    rare = _two(classes_seen)[0]
    r = client.post("/v1/detect", files={"image": ("a.jpg", PHOTO)},
                    data={**OPTIONS, "classes": rare, "max_detections": "1"}).json()
    assert [d["class_name"] for d in r["detections"]] == [rare]


@pytest.mark.parametrize("classes", ["unicorn", "person,unicorn", "12"])  # 12: no COCO class
def test_an_unknown_class_is_a_422_everywhere(client, busy_gateway, classes):
    r = client.post("/v1/detect", files={"image": ("a.jpg", PHOTO)}, data={"classes": classes})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"
    assert classes.split(",")[-1] in r.json()["error"]["message"]
    with grpc.insecure_channel(busy_gateway.grpc) as channel, \
            pytest.raises(grpc.RpcError) as info:
        pb_grpc.DetectorStub(channel).Detect(
            pb.DetectRequest(image=PHOTO, classes=classes.split(",")), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["tierdet-error-code"] == "invalid_option"


def test_batch_filters_every_image(busy_client, classes_seen):
    keep = _two(classes_seen)
    r = busy_client.post("/v1/detect/batch", files=[("images", ("a.jpg", PHOTO))] * 2,
                         data={**OPTIONS, "classes": ",".join(keep)})
    assert r.status_code == 200, r.text
    for item in r.json()["results"]:
        assert sorted({d["class_name"] for d in item["result"]["detections"]}) == keep


def test_grpc_detect_stream_and_the_clients(busy_gateway, classes_seen):
    keep = _two(classes_seen)
    common = {"score_threshold": 0.0, "tier": "accurate", "classes": keep}
    request = wire.options_to_message(DetectOptions(**common), PHOTO)
    with grpc.insecure_channel(busy_gateway.grpc) as channel:
        stub = pb_grpc.DetectorStub(channel)
        reply = stub.Detect(request, timeout=60)
        assert sorted({d.class_name for d in reply.detections}) == keep
        frames = [pb.DetectFrame(frame_id=i, request=request) for i in range(2)]
        for result in stub.DetectStream(iter(frames), timeout=60):
            assert sorted({d.class_name for d in result.response.detections}) == keep
    with Client(busy_gateway.http) as http, GrpcClient(busy_gateway.grpc) as g:
        assert sorted({d.class_name for d in http.detect(PHOTO, **common).detections}) == keep
        assert sorted({d.class_name for d in g.detect(PHOTO, **common).detections}) == keep
        with pytest.raises(TierdetError) as info:
            http.detect(PHOTO, classes=["unicorn"])
        assert info.value.code == "invalid_option" and info.value.status == 422

    async def stream() -> set[str]:
        async with AsyncGrpcClient(busy_gateway.grpc) as a:
            names = set()
            async for frame in a.detect_stream([PHOTO] * 2, timeout_s=60, **common):
                names |= {d.class_name for d in frame.result.detections}
            return names

    import asyncio

    assert sorted(asyncio.run(stream())) == keep


def test_the_cli_flag(gateway, tmp_path, capsys, classes_seen):
    keep = _two(classes_seen)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(PHOTO)
    assert cli.main(["detect", str(photo), "--url", gateway.http, "--tier", "accurate",
                     "--score-threshold", "0", "--classes", ",".join(keep), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["model"] == TEST_MODEL
    assert sorted({d["class_name"] for d in body["detections"]}) == keep
