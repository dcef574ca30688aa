"""POST /v1/detect/batch on the real stack: answered per image, bounded per call.

On the busy gateway: batches run images concurrently (see conftest)."""

from __future__ import annotations

import base64
import http.client
from urllib.parse import urlsplit

import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet.serving.settings import Settings

LIMITS = Settings.from_env()  # what the test gateways run with


def _single(api, data: bytes) -> list[dict]:
    r = api.post("/v1/detect", files={"image": ("x", data)},
                    data={"score_threshold": "0.05", "tier": "accurate"})
    assert r.status_code == 200, r.text
    return r.json()["detections"]


def test_multipart_batch_is_answered_per_image_with_partial_failures(busy_client):
    astronaut, coffee = encode(photos()["astronaut"]), encode(photos()["coffee"], ".png")
    too_big = b"\xff\xd8\xff" + bytes(8 * 1024 * 1024 + 1)  # over the gateway's 8 MiB limit
    files = [("images", ("astronaut.jpg", astronaut, "image/jpeg")),
             ("images", ("broken.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg")),
             ("images", ("coffee.png", coffee, "image/png")),
             ("images", ("huge.jpg", too_big, "image/jpeg"))]
    r = busy_client.post("/v1/detect/batch", files=files,
                    data={"score_threshold": "0.05", "tier": "accurate"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["succeeded"], body["failed"]) == (2, 2)
    results = body["results"]
    assert [i["index"] for i in results] == [0, 1, 2, 3]
    assert [i["filename"] for i in results] == ["astronaut.jpg", "broken.jpg", "coffee.png",
                                                "huge.jpg"]
    assert results[1]["error"]["code"] == "unreadable_image" and results[1]["result"] is None
    assert results[3]["error"]["code"] == "image_too_large"
    for item, data in ((results[0], astronaut), (results[2], coffee)):
        assert item["error"] is None and item["result"]["model"] == TEST_MODEL
        assert item["result"]["detections"] == _single(busy_client, data)


def test_json_batch_reports_bad_base64_per_image(busy_client):
    chelsea = encode(photos()["chelsea"])
    r = busy_client.post("/v1/detect/batch", json={
        "images": [base64.b64encode(chelsea).decode(), "***not base64***"],
        "score_threshold": 0.05, "max_detections": 3, "tier": "accurate"})
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert len(first["result"]["detections"]) == 3 and first["filename"] is None
    assert second["error"]["code"] == "invalid_base64"


def test_options_apply_to_every_image_and_query_options_work(busy_client):
    data = encode(photos()["rocket"])
    r = busy_client.post("/v1/detect/batch?tier=accurate",
                    files=[("images", ("a.jpg", data)), ("images", ("b.jpg", data))],
                    data={"max_detections": "2", "score_threshold": "0.05"})
    assert r.status_code == 200, r.text
    for item in r.json()["results"]:
        assert item["result"]["routing"]["tier"] == "accurate"
        assert len(item["result"]["detections"]) == 2


@pytest.mark.parametrize("extra", [1, 2, 30])
def test_more_images_than_the_bound_are_refused_before_any_work(busy_client, extra):
    files = [("images", (f"{i}.jpg", b"x", "image/jpeg"))
             for i in range(LIMITS.batch_max_images + extra)]
    r = busy_client.post("/v1/detect/batch", files=files)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_option"
    assert str(LIMITS.batch_max_images) in r.json()["error"]["message"]
    r = busy_client.post("/v1/detect/batch",
                    json={"images": ["eA=="] * (LIMITS.batch_max_images + extra)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"


@pytest.mark.parametrize("kwargs,status,code", [
    (dict(files=[("image", ("a.jpg", b"x"))]), 400, "empty_image"),
    (dict(json={"images": []}), 400, "empty_image"),
    (dict(files=[("images", ("a.jpg", b"x"))], data={"score_threshold": "5"}), 422,
     "invalid_option"),
    (dict(json={"images": ["eA=="], "sla_ms": -1}), 422, "invalid_option"),
    (dict(json={"images": "eA=="}), 422, "invalid_option"),
    (dict(json=["eA=="]), 400, "invalid_json"),
    (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "invalid_json"),
    (dict(content=b"x", headers={"content-type": "image/jpeg"}), 415, "unsupported_media_type"),
    (dict(data={"images": "not a file"}, files=[("other", ("a.jpg", b"x"))]), 400,
     "empty_image"),
])
def test_whole_call_refusals(busy_client, kwargs, status, code):
    r = busy_client.post("/v1/detect/batch", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_an_oversized_body_is_refused_from_its_declared_length(busy_gateway):
    """Refused on the header alone: the client has not sent a byte of the body."""
    url = urlsplit(busy_gateway.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/detect/batch")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(50 * 1024**3))
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413
        assert b"image_too_large" in reply.read()
    finally:
        conn.close()
