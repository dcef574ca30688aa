"""tierdet.client against the real stack: HTTP and gRPC, sync and async, retries, errors,
and the examples of the README and the docs run as written. On the busy gateway: streams and batches
load it concurrently (see conftest)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TEST_MODEL, encode, photos
from docs_support import DOCS, README, blocks, section
from tierdet.client import (
    NO_RETRY,
    AsyncClient,
    AsyncGrpcClient,
    Client,
    Frame,
    GrpcClient,
    RetryPolicy,
    TierdetError,
    _http,
)
from tierdet.devstack.stack import free_port
from waiting import wait_until

# Served by the registry but not by the test stack: a real 503 with Retry-After.
NOT_READY = "efficientdet-d1"
FAST_RETRY = RetryPolicy(max_retries=2, max_wait_s=0.1, max_total_wait_s=5.0)
# The long budget wherever routing is not the point: CI machines are busy and a
# 500 ms default tier may rightly shed or time out there.
SLACK = "accurate"


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return encode(photos()["astronaut"])


def _pairs(result) -> list[tuple[int, float]]:
    return [(d.class_id, round(d.score, 4)) for d in result.detections]


def test_http_client_detect_matches_the_raw_api(busy_gateway, busy_client, astronaut,
                                                tmp_path):
    raw = busy_client.post("/v1/detect", files={"image": ("a.jpg", astronaut)},
                      data={"score_threshold": "0.05", "max_detections": "7",
                            "tier": SLACK}).json()
    path = tmp_path / "photo.jpg"
    path.write_bytes(astronaut)
    with Client(busy_gateway.http) as c:
        for image in (astronaut, str(path), path):  # bytes, str path, Path
            result = c.detect(image, score_threshold=0.05, max_detections=7, tier=SLACK)
            assert result.model == TEST_MODEL == raw["model"]
            assert (result.width, result.height) == (raw["width"], raw["height"])
            assert [(d.class_id, round(d.score, 4)) for d in result.detections] == [
                (d["class_id"], round(d["score"], 4)) for d in raw["detections"]]
            assert result.detections[0].box == (result.detections[0].x1, result.detections[0].y1,
                                                result.detections[0].x2, result.detections[0].y2)
            assert result.routing.tier == SLACK and result.timing.total_ms > 0


def test_http_client_render_batch_models_and_tiers(busy_gateway, astronaut):
    with Client(busy_gateway.http) as c:
        assert c.render(astronaut, max_detections=3, tier=SLACK).startswith(b"\xff\xd8\xff")
        assert c.render(astronaut, fmt="png", tier="accurate").startswith(b"\x89PNG")
        items = c.detect_batch([astronaut, b"junk"], score_threshold=0.05, max_detections=2,
                               tier=SLACK)
        assert [i.ok for i in items] == [True, False]
        assert len(items[0].result.detections) == 2 and items[0].filename == "image-0"
        assert items[1].error.code == "unsupported_media_type"
        (d0,) = [m for m in c.models() if m.name == TEST_MODEL]
        assert d0.ready and d0.weights.startswith("random") and d0.published_coco_ap == 34.2
        tiers = {t.name: t for t in c.tiers()}
        assert tiers["realtime"].budget_ms == 150 and tiers["balanced"].default


@pytest.mark.parametrize("kwargs,image,code,status", [
    ({}, b"not an image", "unsupported_media_type", 415),
    ({"tier": "nope"}, None, "unknown_tier", 422),
    ({"model": "nope"}, None, "unknown_model", 422),
    ({"classes": ["unicorn"]}, None, "invalid_option", 422),
])
def test_http_client_errors_carry_the_stable_code(busy_gateway, astronaut, kwargs, image, code,
                                                  status):
    with Client(busy_gateway.http) as c, pytest.raises(TierdetError) as info:
        c.detect(image or astronaut, **kwargs)
    assert (info.value.code, info.value.status, info.value.attempts) == (code, status, 1)
    assert info.value.retry_after_s is None


@pytest.mark.parametrize("kwargs", [{"score_threshold": 3.0}, {"colour": "red"},
                                    {"max_detections": 0}])
def test_a_bad_option_is_refused_before_anything_is_sent(kwargs):
    """The options are the contract's: the client checks them itself, with the
    code the gateway would answer, so a typo costs no request (no server here)."""
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as c, pytest.raises(TierdetError) as info:
        c.detect(b"\xff\xd8\xff", **kwargs)
    assert (info.value.code, info.value.attempts) == ("invalid_option", 0)
    assert next(iter(kwargs)) in info.value.message


def test_503_with_retry_after_is_retried_within_bounds(busy_gateway, astronaut, monkeypatch):
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=sleep))
    with Client(busy_gateway.http, retry=FAST_RETRY) as c, pytest.raises(TierdetError) as info:
        c.detect(astronaut, model=NOT_READY)
    err = info.value
    assert (err.code, err.status, err.retry_after_s) == ("model_not_ready", 503, 2.0)
    assert err.attempts == 3  # the first try and two retries
    assert waits == [0.1, 0.1]  # the policy's cap, not the server's 2 s

    with Client(busy_gateway.http, retry=NO_RETRY) as c, pytest.raises(TierdetError) as info:
        c.detect(astronaut, model=NOT_READY)
    assert info.value.attempts == 1
    # The total wait is bounded too, whatever the retry count allows.
    total = RetryPolicy(max_retries=50, max_wait_s=0.1, max_total_wait_s=0.35)
    with Client(busy_gateway.http, retry=total) as c, pytest.raises(TierdetError) as info:
        c.detect(astronaut, model=NOT_READY)
    assert info.value.attempts == 4


def test_no_server_is_a_connection_failed_error():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout_s=2) as c, pytest.raises(TierdetError) as info:
        c.models()
    assert info.value.code == "connection_failed" and info.value.status is None

    async def main() -> None:
        async with AsyncClient(url, timeout_s=2) as c:
            await c.models()

    with pytest.raises(TierdetError) as info:
        asyncio.run(main())
    assert info.value.code == "connection_failed"
    with GrpcClient(f"127.0.0.1:{free_port()}", timeout_s=2) as g, \
            pytest.raises(TierdetError) as info:
        g.models()
    assert info.value.code == "connection_failed"


def test_sync_client_survives_the_server_dropping_its_idle_connection(busy_gateway, astronaut):
    with Client(busy_gateway.http) as c:
        first = c.detect(astronaut, max_detections=1, tier=SLACK)
        # The gateway (uvicorn) closes a kept-alive connection after 5 s idle.
        time.sleep(5.5)
        assert c.detect(astronaut, max_detections=1, tier=SLACK).detections == first.detections


def test_async_http_client(busy_gateway, astronaut):
    async def main() -> None:
        async with AsyncClient(busy_gateway.http, retry=FAST_RETRY) as c:
            results = await asyncio.gather(*(c.detect(astronaut, score_threshold=0.05,
                                                      tier=SLACK) for _ in range(3)))
            assert len({tuple(_pairs(r)) for r in results}) == 1
            png = await c.render(astronaut, fmt="png", max_detections=2, tier=SLACK)
            assert png.startswith(b"\x89PNG")
            items = await c.detect_batch([astronaut, astronaut], max_detections=1, tier=SLACK)
            assert all(i.ok for i in items)
            assert any(m.name == TEST_MODEL for m in await c.models())
            assert any(t.default for t in await c.tiers())
            with pytest.raises(TierdetError) as info:
                await c.detect(astronaut, model=NOT_READY)
            assert info.value.code == "model_not_ready" and info.value.attempts == 3

    asyncio.run(asyncio.wait_for(main(), 120))


def test_grpc_client_agrees_with_http_and_retries(busy_gateway, astronaut):
    with Client(busy_gateway.http) as h, GrpcClient(busy_gateway.grpc, retry=FAST_RETRY) as g:
        via_http = h.detect(astronaut, score_threshold=0.05, tier=SLACK)
        via_grpc = g.detect(astronaut, score_threshold=0.05, tier=SLACK)
        assert _pairs(via_grpc) == _pairs(via_http) and via_grpc.routing.tier == SLACK
        assert g.detect(astronaut, model=TEST_MODEL).routing.tier is None  # pinned: no tier
        assert any(m.name == TEST_MODEL and m.ready for m in g.models())
        with pytest.raises(TierdetError) as info:  # in a tier no host misses: about the image
            g.detect(b"junk", tier=SLACK)
        assert (info.value.code, info.value.grpc_code) == (
            "unsupported_media_type", "INVALID_ARGUMENT")
        with pytest.raises(TierdetError) as info:
            g.detect(astronaut, model=NOT_READY)
        err = info.value
        assert (err.code, err.grpc_code, err.retry_after_s, err.attempts) == (
            "model_not_ready", "UNAVAILABLE", 2.0, 3)


def test_grpc_client_streams_frames_with_per_frame_options(busy_gateway, astronaut, busy_client):
    frames = [astronaut, Frame(b"junk", frame_id=41), Frame(astronaut, tier="realtime",
                                                              sla_ms=3000),
              Frame(astronaut, sla_ms=0.001)]
    with GrpcClient(busy_gateway.grpc) as g:
        results = list(g.detect_stream(frames, score_threshold=0.05, timeout_s=60, tier=SLACK))
        assert [r.frame_id for r in results] == [0, 41, 2, 3]
        assert [r.ok for r in results] == [True, False, True, False]
        assert results[1].error.code == "unsupported_media_type"
        # Per-frame options win over the stream's: this frame's tier and budget.
        assert results[2].result.routing.tier == "realtime"
        assert results[2].result.routing.budget_ms == 3000
        assert results[3].error.code == "sla_unattainable" and results[3].error.retry_after_s
        assert _pairs(results[0].result) == _pairs(results[2].result)

        # Stopping early ends the call on the server too.
        stream = g.detect_stream(iter(lambda: astronaut, None), timeout_s=60, tier=SLACK)
        assert next(stream).ok
        stream.close()
    wait_until(lambda: _gauge(busy_client, "tierdet_streams_open") == 0,
               "the closed stream to end on the server")
    assert _gauge(busy_client, "tierdet_stream_frames_held") == 0


def _gauge(api, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", api.get("/metrics").text, re.M).group(1))


def test_async_grpc_client_streams_from_an_async_source(busy_gateway, astronaut):
    async def frames():
        for i in range(5):
            await asyncio.sleep(0)
            yield Frame(astronaut, frame_id=100 + i, max_detections=2, tier=SLACK)

    async def main() -> None:
        async with AsyncGrpcClient(busy_gateway.grpc) as g:
            got = [r async for r in g.detect_stream(frames(), timeout_s=60)]
            assert [r.frame_id for r in got] == [100, 101, 102, 103, 104]
            assert all(r.ok and len(r.result.detections) <= 2 for r in got)
            single = await g.detect(astronaut, max_detections=2, tier=SLACK)
            assert _pairs(single) == _pairs(got[0].result)
            assert any(m.name == TEST_MODEL for m in await g.models())
            with pytest.raises(TierdetError) as info:
                await g.detect(astronaut, tier="nope")
            assert info.value.code == "unknown_tier"

    asyncio.run(asyncio.wait_for(main(), 120))


def shown_examples() -> dict[str, str]:
    """The client's examples as written: the client page's and the README's, and the
    stream example of the gRPC page."""
    (page,) = blocks(section(DOCS / "api" / "client.md", "# Python client"), "python")
    (readme,) = [b for b in blocks(section(README, "## Use it"), "python")
                 if "tierdet.client" in b]
    (stream,) = blocks(section(DOCS / "api" / "grpc.md", "## Video: DetectStream"), "python")
    return {"client page": page, "README": readme, "stream": stream}


def test_the_shown_examples_run_against_the_live_gateway(busy_gateway, tmp_path: Path):
    (tmp_path / "photo.jpg").write_bytes(encode(photos()["astronaut"]))
    outputs: dict[str, str] = {}
    for where, code in shown_examples().items():
        # Point the examples at the test gateway; everything else runs verbatim.
        code = code.replace("http://127.0.0.1:8080", busy_gateway.http)
        code = code.replace('"127.0.0.1:50051"', f'"{busy_gateway.grpc}"')
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, (where, run.stderr)
        outputs[where] = run.stdout
        if where != "stream":
            assert re.match(rf"{TEST_MODEL}: \d+ objects in \d+ ms", run.stdout), where
            assert "refused: unsupported_media_type" in run.stdout, where
            boxed = tmp_path / "boxed.jpg"
            assert boxed.read_bytes().startswith(b"\xff\xd8\xff"), where
            boxed.unlink()  # the next example must write its own
    stream_out = outputs["stream"]
    assert [line.split()[0] for line in stream_out.splitlines()] == [str(i) for i in range(8)]
