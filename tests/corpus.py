"""Inputs the tests and the benchmarks share (no pytest here, so a benchmark can
import it with ``tests/`` on its path): real photographs, their encoding, and
the v1 bad-input corpus with the answer each case must get."""

from __future__ import annotations

import struct
import zlib

import numpy as np

# The byte limit the corpus's "too many bytes" case is sized against: a gateway
# that runs the corpus sets TIERDET_MAX_IMAGE_BYTES to it.
MAX_IMAGE_BYTES = 8 * 1024 * 1024


def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (RGB uint8)."""
    import skimage.data

    return {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
            "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image[..., ::-1] if image.ndim == 3 else image)
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge image (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64)


JPEG = encode(photos()["coffee"])
# (case, httpx.post keyword arguments, HTTP status, error code), for POST /v1/detect.
BAD_REQUESTS = [
    ("empty file", dict(files={"image": ("a.jpg", b"", "image/jpeg")}), 400, "empty_image"),
    ("truncated jpeg", dict(files={"image": ("a.jpg", JPEG[:200], "image/jpeg")}), 400,
     "unreadable_image"),
    ("header then garbage", dict(files={"image": ("a.jpg", JPEG[:20] + b"\x00" * 5000,
                                                  "image/jpeg")}), 400, "unreadable_image"),
    ("not an image", dict(files={"image": ("a.txt", b"hello world", "text/plain")}), 415,
     "unsupported_media_type"),
    ("wrong content type", dict(content=b"hello", headers={"content-type": "text/plain"}), 415,
     "unsupported_media_type"),
    ("too many bytes", dict(content=b"\xff\xd8\xff" + b"\x00" * (MAX_IMAGE_BYTES + 1024 * 1024),
                            headers={"content-type": "image/jpeg"}), 413, "image_too_large"),
    ("bomb header", dict(content=png_header_only(50_000, 50_000),
                         headers={"content-type": "image/png"}), 413, "too_many_pixels"),
    ("threshold above 1", dict(files={"image": ("a.jpg", JPEG, "image/jpeg")},
                               data={"score_threshold": "2"}), 422, "invalid_option"),
    ("zero detections", dict(files={"image": ("a.jpg", JPEG, "image/jpeg")},
                             data={"max_detections": "0"}), 422, "invalid_option"),
    ("threshold not a number", dict(files={"image": ("a.jpg", JPEG, "image/jpeg")},
                                    data={"score_threshold": "high"}), 422, "invalid_option"),
    ("unknown model", dict(files={"image": ("a.jpg", JPEG, "image/jpeg")},
                           data={"model": "yolo-9000"}), 422, "unknown_model"),
    ("path as model", dict(files={"image": ("a.jpg", JPEG, "image/jpeg")},
                           data={"model": "../../etc/passwd"}), 422, "invalid_option"),
    ("no image field", dict(files={"picture": ("a.jpg", JPEG, "image/jpeg")}), 400,
     "empty_image"),
    ("malformed json", dict(content=b"{not json", headers={"content-type": "application/json"}),
     400, "invalid_json"),
    ("json array", dict(json=[1, 2]), 400, "invalid_json"),
    ("bad base64", dict(json={"image": "@@@"}), 400, "invalid_base64"),
    ("unknown json field", dict(json={"image": "", "colour": "red"}), 422, "invalid_option"),
    ("option in query and form", dict(params={"max_detections": "2"},
                                      files={"image": ("a.jpg", JPEG, "image/jpeg")},
                                      data={"max_detections": "1"}), 422, "invalid_option"),
    ("option in query and json", dict(params={"score_threshold": "0.5"},
                                      json={"image": "", "score_threshold": 0.4}), 422,
     "invalid_option"),
]
