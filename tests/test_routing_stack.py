"""Budgets, tiers and shedding through the real gateway and Triton."""

from __future__ import annotations

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving.triton import queue_report

JPEG = encode(photos()["chelsea"])


def _post(client, **fields):
    return client.post("/v1/detect", files={"image": ("a.jpg", JPEG, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def test_response_reports_budget_prediction_and_actual(client):
    body = _post(client).json()
    routing = body["routing"]
    assert routing["tier"] == "balanced" and routing["budget_ms"] == 500
    assert routing["predicted_ms"] > 0 and not routing["degraded"]
    assert routing["actual_ms"] == body["timing"]["total_ms"]


def test_tier_and_budget_fields(client):
    assert _post(client, tier="accurate").json()["routing"]["budget_ms"] == 3000
    r = _post(client, sla_ms=2500).json()["routing"]
    assert (r["tier"], r["budget_ms"]) == (None, 2500)
    r = _post(client, model=TEST_MODEL).json()["routing"]
    assert r["tier"] is None and r["budget_ms"] == 10_000  # pinned, no budget


def _arrived_at_triton(triton) -> int:
    return queue_report(httpx.get(triton.metrics_url, timeout=10).text).arrived.get(TEST_MODEL, 0)


def test_impossible_budget_is_refused_at_once_with_retry_after(client, triton):
    before = _arrived_at_triton(triton)
    r = _post(client, sla_ms=1)
    assert r.status_code == 503 and r.json()["error"]["code"] == "sla_unattainable"
    assert int(r.headers["retry-after"]) >= 1
    assert _arrived_at_triton(triton) == before  # never queued behind inference


def test_unknown_tier_and_bad_budget(client):
    r = _post(client, tier="platinum")
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tier"
    for bad in (-5, 0, "soon", 10**9):
        r = _post(client, sla_ms=bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option", bad


def test_shed_requests_are_counted(client):
    _post(client, sla_ms=1)
    text = client.get("/metrics").text
    assert 'outcome="shed"' in text and 'result="missed"' in text


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway.grpc) as ch:
        yield pb_grpc.DetectorStub(ch)


def test_grpc_budget_fields(stub):
    reply = stub.Detect(pb.DetectRequest(image=JPEG, tier="accurate"), timeout=30)
    assert reply.routing.tier == "accurate" and reply.routing.budget_ms == 3000
    reply = stub.Detect(pb.DetectRequest(image=JPEG, sla_ms=2000), timeout=30)
    assert reply.routing.budget_ms == 2000 and reply.routing.actual_ms > 0


def test_grpc_call_deadline_is_a_budget(stub):
    reply = stub.Detect(pb.DetectRequest(image=JPEG, sla_ms=5000), timeout=2.0)
    # grpc-timeout travels with limited precision, rounded up: allow 5 %.
    assert reply.routing.budget_ms <= 2100
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(pb.DetectRequest(image=JPEG), timeout=0.02)
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 grpc.StatusCode.DEADLINE_EXCEEDED)


def test_grpc_impossible_budget_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(pb.DetectRequest(image=JPEG, sla_ms=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())["tierdet-error-code"] == "sla_unattainable"


def test_profile_command_measures_through_triton(triton, tmp_path):
    import subprocess
    import sys

    from tierdet.registry.profile import LatencyProfile

    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, "-m", "tierdet.cli", "profile", "--models", TEST_MODEL,
         "--triton-url", triton.grpc_url, "--batches", "1,2", "--runs", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    profile = LatencyProfile.load(out)
    ms = profile.models[TEST_MODEL].batch_ms
    assert set(ms) == {1, 2} and 0 < ms[1] < ms[2] * 1.5
