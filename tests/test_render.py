"""Drawing detections (tierdet.serving.render) and /v1/detect?render=true on the real stack."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import encode, photos
from tierdet.contract.results import Detection
from tierdet.serving import render


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image[..., ::-1]


def test_boxes_are_drawn_in_the_class_colour_and_the_original_is_untouched():
    image = np.full((200, 300, 3), 255, np.uint8)
    det = Detection(50.0, 60.0, 250.0, 180.0, 0.87, 18, "dog")
    out = render.draw(image, [det])
    assert (image == 255).all()  # a copy was drawn on
    assert tuple(out[120, 50]) == render.color_for(18)  # left edge, mid-height
    assert tuple(out[180, 150]) == render.color_for(18)  # bottom edge
    assert (out[120, 150] == 255).all()  # inside the box: untouched
    # The label sits just above the box, from its left edge: a block of the
    # class colour with the text in it.
    # (Rows above 58: the box's own top edge, 2 px wide, covers rows 59-61.)
    ys, xs = np.nonzero((out[:58] == render.color_for(18)).all(axis=2))
    assert ys.max() == 57 and xs.min() == 50 and 10 <= 60 - ys.min() <= 25
    assert 40 <= xs.max() - xs.min() <= 120


def test_a_box_at_the_top_gets_its_label_inside_and_nothing_crashes_at_the_edges():
    image = np.zeros((40, 40, 3), np.uint8)
    dets = [Detection(0.0, 0.0, 40.0, 40.0, 0.5, 1, "person"),
            Detection(35.0, 35.0, 40.0, 40.0, 0.9, 3, "a rather long class name")]
    out = render.draw(image, dets)
    assert out.shape == image.shape
    # The first box touches the top: its label block is drawn inside it, at its
    # top-left (text pixels break the block, so not every pixel has the colour).
    assert (out[2:8, 2:20] == render.color_for(1)).all(axis=2).mean() > 0.4
    # The second's label is wider than the room right of its box: it is moved
    # left into the image, above the box (rows above y=35), from x=0.
    ys, xs = np.nonzero((out[:35] == render.color_for(3)).all(axis=2))
    assert xs.min() == 0 and ys.max() == 34 and len(ys) > 200


@pytest.mark.parametrize("accept,fmt", [
    (None, "jpeg"), ("", "jpeg"), ("*/*", "jpeg"), ("image/png", "png"),
    ("image/jpeg", "jpeg"), ("image/png;q=0.5, image/jpeg;q=0.9", "jpeg"),
    ("image/jpeg;q=0.2, image/png", "png"), ("image/png;q=0, */*", "jpeg"),
    ("text/html, image/png;q=0.8", "png"), ("application/json", "jpeg"),
])
def test_accept_negotiation(accept, fmt):
    assert render.negotiate(accept) == fmt


def test_encode_round_trips():
    image = photos()["coffee"]
    assert (_decode(render.encode(image, "png")) == image).all()
    jpeg = render.encode(image, "jpeg")
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert np.abs(_decode(jpeg).astype(int) - image).mean() < 4


@pytest.mark.parametrize("accept,magic,media", [
    ("image/png", b"\x89PNG", "image/png"),
    ("image/jpeg", b"\xff\xd8\xff", "image/jpeg"),
    (None, b"\xff\xd8\xff", "image/jpeg"),
])
def test_render_true_answers_with_the_annotated_image(client, accept, magic, media):
    image = photos()["astronaut"]
    headers = {"accept": accept} if accept else {}
    r = client.post("/v1/detect?render=true",
                    files={"image": ("a.png", encode(image, ".png"), "image/png")},
                    data={"score_threshold": "0.05", "max_detections": "5", "tier": "accurate"},
                    headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == media and r.content.startswith(magic)
    assert r.headers["vary"] == "Accept"
    assert int(r.headers["x-tierdet-detections"]) == 5
    drawn = _decode(r.content)
    assert drawn.shape == image.shape
    # Same pixels as drawing the JSON answer ourselves (PNG is lossless).
    body = client.post("/v1/detect", files={"image": ("a.png", encode(image, ".png"))},
                       data={"score_threshold": "0.05", "max_detections": "5",
                             "tier": "accurate"}).json()
    want = render.draw(image, [Detection(**d) for d in body["detections"]])
    if media == "image/png":
        assert (drawn == want).all()
    changed = np.abs(drawn.astype(int) - image).sum(axis=2) > 60
    assert changed.mean() > 0.002  # boxes and labels really are there


def test_render_works_with_raw_bodies_and_query_options(client):
    r = client.post("/v1/detect?render=1&score_threshold=0.05&max_detections=3&tier=accurate",
                    content=encode(photos()["coffee"]),
                    headers={"content-type": "image/jpeg", "accept": "image/png"})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert r.headers["x-tierdet-detections"] == "3"


def test_render_errors_stay_json(client):
    r = client.post("/v1/detect?render=true", content=b"nope",
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/detect?render=maybe", content=encode(photos()["coffee"]),
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option"


def test_render_false_keeps_the_json_answer(client):
    r = client.post("/v1/detect?render=false&tier=accurate", content=encode(photos()["coffee"]),
                    headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["model"]
