"""Decoding inside the memory bound (issue 27, finding 1): every limit is
applied from the header, and what decoding takes is what serving/memory.py
counts for one image.

The peaks are measured, not computed: ``peak_probe.py`` decodes each image in a
fresh interpreter and reads the kernel's resident-set peak (VmHWM) around it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving import decoding, memory
from tierdet.serving.headers import read_header

LIMIT_PIXELS = 40_000_000
PROBE_PIXELS = 2_000_000  # the twin's limit: images of every kind at this size
PROBE = Path(__file__).with_name("peak_probe.py")
SERVICE = Path(__file__).resolve().parents[1] / "service"


def decode(data: bytes, limit: int = LIMIT_PIXELS) -> decoding.Decoded:
    return decoding.decode(data, 64 * 1024 * 1024, limit)


def refusal(data: bytes, limit: int = LIMIT_PIXELS) -> ErrorCode:
    with pytest.raises(ApiError) as info:
        decode(data, limit)
    return info.value.code


def pil(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _sof_at(data: bytes) -> int:
    return next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)


def junk_jpeg(width: int, height: int) -> bytes:
    """A real small JPEG declaring ``width`` x ``height``, with bytes that are no
    marker before its frame header (libjpeg skips them and decodes on)."""
    small = pil(np.zeros((8, 8, 3), np.uint8), "JPEG")
    sof = _sof_at(small)
    patched = small[:sof + 5] + struct.pack(">HH", height, width) + small[sof + 9:]
    return patched[:sof] + b"\x00junk" * 8 + patched[sof:]


def tiff_declaring(width: int, height: int, array: np.ndarray) -> bytes:
    """A TIFF of ``array`` whose first directory declares ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".tiff", array)[1].tobytes())
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd:ifd + 2])
    for k in range(count):
        at = ifd + 2 + 12 * k
        tag, kind = struct.unpack("<HH", data[at:at + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[at + 8:at + 12] = (struct.pack("<HH", value, 0) if kind == 3
                                    else struct.pack("<I", value))
    return bytes(data)


# -- the attacks of finding 1 -----------------------------------------------

def test_a_tiny_jpeg_with_junk_before_its_frame_declares_its_size():
    bomb = junk_jpeg(12_000, 12_000)
    assert len(bomb) < 1000
    assert cv2.imdecode(np.frombuffer(junk_jpeg(16, 16), np.uint8), cv2.IMREAD_COLOR
                        ).shape == (16, 16, 3)  # libjpeg does read past the junk
    header = read_header(bomb, "jpeg")
    assert header is not None and (header.width, header.height) == (12_000, 12_000)
    assert refusal(bomb) is ErrorCode.TOO_MANY_PIXELS


def test_a_tiff_is_refused_from_its_directory():
    bomb = tiff_declaring(12_000, 12_000, np.zeros((16, 16, 3), np.uint8))
    header = read_header(bomb, "tiff")
    assert header is not None and (header.width, header.height) == (12_000, 12_000)
    assert refusal(bomb) is ErrorCode.TOO_MANY_PIXELS


def test_floating_point_samples_are_refused_before_decoding():
    small = np.random.default_rng(0).random((16, 16, 3))
    assert refusal(tiff_declaring(7_000, 5_700, small)) is ErrorCode.UNSUPPORTED_MEDIA_TYPE
    assert refusal(cv2.imencode(".tiff", small)[1].tobytes()) is (
        ErrorCode.UNSUPPORTED_MEDIA_TYPE)


def test_sixteen_bits_without_alpha_decode_straight_to_eight():
    deep = np.full((20, 30, 3), 40000, np.uint16)
    for ext in (".png", ".tiff"):
        pixels = decode(cv2.imencode(ext, deep)[1].tobytes()).pixels
        assert pixels.dtype == np.uint8 and (pixels == 40000 >> 8).all()


def test_a_header_that_cannot_be_read_is_never_decoded():
    cut = pil(np.zeros((8, 8, 3), np.uint8), "JPEG")[:_sof_at(
        pil(np.zeros((8, 8, 3), np.uint8), "JPEG"))]  # everything before the frame header
    assert read_header(cut, "jpeg") is None
    assert refusal(cut) is ErrorCode.UNREADABLE_IMAGE
    assert refusal(b"II*\x00\x08\x00\x00\x00\x00\x00") is ErrorCode.UNREADABLE_IMAGE


def test_an_image_whose_decoding_would_pass_the_slot_is_refused_with_its_limit():
    """16-bit RGBA is decoded at its depth (its alpha is composited): 8 bytes a
    pixel and the RGB copy, more than a slot holds at the pixel limit."""
    rgba16 = cv2.imencode(".png", np.zeros((1000, 1000, 4), np.uint16))[1].tobytes()
    with pytest.raises(ApiError) as info:
        decode(rgba16, limit=1_000_000)
    assert info.value.code is ErrorCode.TOO_MANY_PIXELS and "limit is" in info.value.message
    assert decode(rgba16, limit=2_000_000).pixels.shape == (1000, 1000, 3)


def test_opencv_takes_the_gateways_pixel_limit_before_it_loads():
    """OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when loaded: the gateway's
    entry points set it from TIERDET_MAX_IMAGE_PIXELS before anything imports cv2."""
    code = ("import tierdet.cli, tierdet.frontends.workers, cv2, numpy as np\n"
            "from tierdet.frontends import server\n"
            "def decodes(side):\n"
            "    data = cv2.imencode('.png', np.zeros((side, side, 3), np.uint8))[1]\n"
            "    try:\n"
            "        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None\n"
            "    except cv2.error:\n"
            "        return False\n"
            "print(decodes(30), decodes(40))\n")
    env = {**os.environ, "PYTHONPATH": str(SERVICE), "TIERDET_MAX_IMAGE_PIXELS": "1000"}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.split() == ["True", "False"]  # 900 pixels decode, 1600 do not


# -- the memory model, measured ---------------------------------------------

def _worst_images(side: int) -> dict[str, bytes]:
    """Of each accepted format and depth, the kind that takes the most memory."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)[None, :].repeat(side, 0)
    rgb, deep = np.dstack([ramp, ramp.T, 255 - ramp]), ramp.astype(np.uint16) * 257
    rgb16 = np.dstack([deep, deep.T, deep])

    def cv(ext: str, image: np.ndarray, *params: int) -> bytes:
        return cv2.imencode(ext, image, list(params))[1].tobytes()

    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG", progressive=True)
    return {
        "jpeg baseline 4:4:4": pil(rgb, "JPEG", subsampling=0),
        "jpeg progressive 4:4:4": pil(rgb, "JPEG", subsampling=0, progressive=True),
        "jpeg progressive cmyk": cmyk.getvalue(),
        "png 8-bit rgba": cv(".png", np.dstack([rgb, ramp])),
        "png 16-bit rgb": cv(".png", rgb16),
        "png 16-bit rgba": cv(".png", np.dstack([rgb16, deep])),
        "png 16-bit gray": cv(".png", deep),
        "webp lossless rgba": cv(".webp", np.dstack([rgb, ramp]), cv2.IMWRITE_WEBP_QUALITY, 101),
        "webp lossy": cv(".webp", rgb),
        "tiff 8-bit one strip": pil(rgb, "TIFF"),
        "tiff 16-bit rgb": cv(".tiff", rgb16),
        "bmp 32-bit": cv(".bmp", np.dstack([rgb, ramp])),
    }


def probe(paths: list[Path], limit: int) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(SERVICE), "TIERDET_MAX_IMAGE_PIXELS": str(limit)}
    out = subprocess.run([sys.executable, str(PROBE), str(limit), *map(str, paths)],
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    return {row["file"]: row for row in map(json.loads, out.stdout.splitlines())}


def test_every_accepted_image_decodes_within_what_memory_counts_for_it(tmp_path):
    """At the pixel limit, each image is either refused from its header (having
    taken nothing) or decoded within ``peak_bytes``, itself within a slot."""
    side = int((0.95 * PROBE_PIXELS) ** 0.5)  # a JPEG's blocks round its size up
    paths = []
    for name, data in _worst_images(side).items():
        paths.append(tmp_path / name.replace(" ", "_").replace(":", ""))
        paths[-1].write_bytes(data)
    slot = memory.image_bytes(PROBE_PIXELS)
    seen = probe(paths, PROBE_PIXELS)
    assert len(seen) == len(paths)
    for row in seen.values():
        if row["code"] is not None:
            assert row["code"] == "too_many_pixels" and row["estimate"] > slot, row
            assert row["peak"] < 1024 * 1024, row
        else:
            assert row["peak"] <= row["estimate"] <= slot, row
    # The twin is not vacuous: most kinds decode, and at full size.
    assert sum(row["code"] is None for row in seen.values()) >= 8
    assert max(row["peak"] for row in seen.values()) > 6 * PROBE_PIXELS


def test_the_forty_megapixel_sixteen_bit_png_stays_in_one_slot(tmp_path):
    """Finding 1's PNG: 40 MP of 16-bit RGB took 1,836 MB in a gateway; decoded
    straight to 8 bits it takes the RGB image and its copy."""
    width, height = 7680, 5200
    ramp = (np.linspace(0, 65535, width).astype(np.uint16)[None, :]).repeat(height, 0)
    path = tmp_path / "forty.png"
    path.write_bytes(cv2.imencode(".png", np.dstack([ramp, ramp, ramp]),
                                  [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes())
    del ramp
    (row,) = probe([path], LIMIT_PIXELS).values()
    assert row["code"] is None
    assert 6 * width * height <= row["peak"] <= memory.image_bytes(LIMIT_PIXELS), row
