"""gRPC Detector, health and reflection on the real stack."""

from __future__ import annotations

import grpc
import pytest
from conftest import TEST_MODEL, encode, photos
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(gateway.grpc) as ch:
        yield ch


def test_detect_photo(channel):
    image = photos()["astronaut"]
    # A 60 s budget here and below (the call's 30 s deadline is then the budget):
    # what is tested is not routing, and the default tier's 500 ms can be missed
    # on a loaded 2-core CI machine (a correct DEADLINE_EXCEEDED).
    reply = pb_grpc.DetectorStub(channel).Detect(
        pb.DetectRequest(image=encode(image), score_threshold=0.05, max_detections=10,
                         sla_ms=60000),
        timeout=30)
    assert reply.model == TEST_MODEL
    assert (reply.width, reply.height) == (image.shape[1], image.shape[0])
    assert 0 < len(reply.detections) <= 10
    for d in reply.detections:
        assert 0 <= d.x1 < d.x2 <= reply.width and 0 <= d.y1 < d.y2 <= reply.height
    assert reply.timing.total_ms > 0


def test_http_and_grpc_answer_alike(channel, client):
    data = encode(photos()["coffee"])
    http = client.post("/v1/detect", files={"image": ("a.jpg", data, "image/jpeg")},
                       data={"score_threshold": "0.05", "sla_ms": "60000"}).json()
    grpc_reply = pb_grpc.DetectorStub(channel).Detect(
        pb.DetectRequest(image=data, score_threshold=0.05, sla_ms=60000), timeout=30)
    assert len(grpc_reply.detections) == len(http["detections"])
    assert sorted(round(d.score, 4) for d in grpc_reply.detections) == sorted(
        round(d["score"], 4) for d in http["detections"])


def test_list_models(channel):
    reply = pb_grpc.DetectorStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    (d0,) = [m for m in reply.models if m.name == TEST_MODEL]
    assert d0.ready and d0.family == "efficientdet" and d0.input_size == 512
    assert d0.weights.startswith("random")


@pytest.mark.parametrize("request_kwargs,status,code", [
    (dict(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty_image"),
    (dict(image=b"not an image at all"), grpc.StatusCode.INVALID_ARGUMENT,
     "unsupported_media_type"),
    (dict(image=b"\xff\xd8\xff\xe0" + b"\x00" * 100), grpc.StatusCode.INVALID_ARGUMENT,
     "unreadable_image"),
    (dict(image=b"x", model="nope"), grpc.StatusCode.INVALID_ARGUMENT, "unknown_model"),
    (dict(image=b"x", score_threshold=-1), grpc.StatusCode.INVALID_ARGUMENT, "invalid_option"),
])
def test_bad_requests_map_to_grpc_status(channel, request_kwargs, status, code):
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(**request_kwargs), timeout=10)
    assert info.value.code() == status
    assert dict(info.value.trailing_metadata())["tierdet-error-code"] == code


def test_health_service_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tierdet.v1.Detector"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_detector(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for s in reply.list_services_response.service}
    assert {"tierdet.v1.Detector", "grpc.health.v1.Health"} <= names
