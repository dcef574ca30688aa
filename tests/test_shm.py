"""Pixels to Triton through system shared memory, on the real stack.

The test gateway and tritonserver share this host, so the gateway's tensors
must go through registered shared-memory regions; a gateway with the setting
off sends them over gRPC, and both answer the same.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import TEST_MODEL, encode, photos, regions_of
from tierdet.devstack.stack import GatewayProcess
from tierdet.serving.shm import UnmappableError
from tierdet.serving.triton import TritonClient

PHOTOS = {name: encode(image) for name, image in photos().items()}


def _answers(base: str) -> dict[str, list[dict]]:
    with httpx.Client(base_url=base, timeout=30.0) as c:
        out = {}
        for name, jpeg in PHOTOS.items():
            # Pinned: a budget of 10 s, so a cold Triton's first calls do not
            # miss a tier's budget (the transport is what is tested here).
            r = c.post("/v1/detect", files={"image": ("a.jpg", jpeg, "image/jpeg")},
                       data={"score_threshold": "0.05", "model": TEST_MODEL})
            assert r.status_code == 200, r.text
            out[name] = r.json()["detections"]
        return out


@pytest.fixture(scope="module")
def wire_gateway(triton, tmp_path_factory):
    gw = GatewayProcess.start(triton.endpoint, tmp_path_factory.mktemp("wire") / "gw.log",
                              triton_shared_memory="false")
    try:
        yield gw
    finally:
        gw.stop()


def test_pixels_go_through_shared_memory_and_answer_as_over_the_wire(triton, gateway,
                                                                     wire_gateway):
    through_shm, over_wire = _answers(gateway.http), _answers(wire_gateway.http)
    assert regions_of(triton.grpc_url, gateway), "the gateway registered no region"
    assert regions_of(triton.grpc_url, wire_gateway) == []
    assert through_shm == over_wire
    assert any(through_shm.values())  # the comparison saw detections


def test_regions_are_reused_not_created_per_request(triton, gateway, client):
    _answers(gateway.http)
    # As many as this session-wide gateway's busiest moment needed so far: one
    # at a time from here on, so sequential requests add none.
    regions = sorted(regions_of(triton.grpc_url, gateway))
    for _ in range(3):
        _answers(gateway.http)
    assert sorted(regions_of(triton.grpc_url, gateway)) == regions


def test_a_region_triton_cannot_map_is_refused_as_unmappable(triton):
    """What a Triton on another host answers: the key is not in its /dev/shm."""
    async def register() -> None:
        client = TritonClient(triton.grpc_url, shared_memory=False,
                              api_key=triton.server.api_key)
        try:
            await client._register("tierdet_test_absent", "/tierdet-no-such-region", 1 << 20)
        finally:
            await client.close()

    with pytest.raises(UnmappableError):
        asyncio.run(register())
