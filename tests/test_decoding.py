"""Decoding edge cases and fuzzing: every input is an image or a clear ApiError."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.decoding import decode as decode_at
from tierdet.serving.decoding import decode_image, header_size, sniff_format

LIMIT_BYTES, LIMIT_PIXELS = 20 * 1024 * 1024, 40_000_000


def save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return decode_image(data, LIMIT_BYTES, LIMIT_PIXELS)


RGB = Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("name,data,shape", [
    ("jpeg", save(RGB, "JPEG"), (40, 60, 3)),
    ("png", save(RGB, "PNG"), (40, 60, 3)),
    ("webp", save(RGB, "WEBP"), (40, 60, 3)),
    ("webp lossless", save(RGB, "WEBP", lossless=True), (40, 60, 3)),
    ("bmp", save(RGB, "BMP"), (40, 60, 3)),
    ("tiff", save(RGB, "TIFF"), (40, 60, 3)),
    ("grayscale png", save(RGB.convert("L"), "PNG"), (40, 60, 3)),
    ("grayscale jpeg", save(RGB.convert("L"), "JPEG"), (40, 60, 3)),
    ("gray+alpha png", save(RGB.convert("LA"), "PNG"), (40, 60, 3)),
    ("palette png", save(RGB.convert("P"), "PNG"), (40, 60, 3)),
    ("cmyk jpeg", save(RGB.convert("CMYK"), "JPEG"), (40, 60, 3)),
    ("16-bit png", save(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"),
     (20, 30, 3)),
    ("1x1", save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), (1, 1, 3)),
    ("10000x1", save(Image.new("RGB", (10000, 1)), "PNG"), (1, 10000, 3)),
    ("1x10000", save(Image.new("RGB", (1, 10000)), "PNG"), (10000, 1, 3)),
])
def test_accepted_images_become_rgb_uint8(name, data, shape):
    image = decode(data)
    assert image.shape == shape and image.dtype == np.uint8


def test_sixteen_bit_keeps_its_brightness():
    image = decode(save(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"))
    assert (image == 40000 >> 8).all()


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode(save(rgba, "PNG"))
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_honoured():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode(save(RGB, "JPEG", exif=exif.tobytes()))
    assert image.shape == (60, 40, 3)


def test_colour_order_is_rgb():
    image = decode(save(Image.new("RGB", (8, 8), (250, 10, 10)), "PNG"))
    assert tuple(image[0, 0]) == (250, 10, 10)


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


@pytest.mark.parametrize("fmt,data", [
    ("png", _png_header(50_000, 50_000) + b"\x00" * 100),
    ("jpeg", b"\xff\xd8\xff\xc0\x00\x11\x08" + struct.pack(">HH", 60_000, 60_000) + b"\x00" * 50),
    ("webp", b"RIFF\x00\x00\x00\x00WEBPVP8X" + b"\x0a\x00\x00\x00" + b"\x00" * 4
     + (59_999).to_bytes(3, "little") + (59_999).to_bytes(3, "little")),
    ("bmp", b"BM" + b"\x00" * 16 + struct.pack("<ii", 70_000, 70_000) + b"\x00" * 40),
])
def test_bombs_are_refused_from_the_header(fmt, data):
    assert sniff_format(data) == fmt
    width, height = header_size(data, fmt)
    assert width * height > LIMIT_PIXELS
    with pytest.raises(ApiError) as info:
        decode(data)
    assert info.value.code is ErrorCode.TOO_MANY_PIXELS


def test_real_tiny_file_declaring_huge_pixels_is_refused():
    """A genuine PNG bomb: 64k x 64k of zeros compresses to a few hundred KB."""
    from tierdet.serving.decoding import configure_decoders

    configure_decoders(LIMIT_PIXELS)
    width = height = 20_000
    row = b"\x00" + b"\x00" * width  # filter byte + 1 byte per pixel (grayscale)
    raw = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    assert len(bomb) < 1_000_000
    with pytest.raises(ApiError) as info:
        decode(bomb)
    assert info.value.code is ErrorCode.TOO_MANY_PIXELS


@pytest.mark.parametrize("name,data,code", [
    ("empty", b"", ErrorCode.EMPTY_IMAGE),
    ("text", b"hello, world", ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ("pdf", b"%PDF-1.7\n", ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ("zip", b"PK\x03\x04" + b"\x00" * 30, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ("gif", save(RGB, "GIF"), ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ("animated gif", save(RGB, "GIF", save_all=True, append_images=[RGB.rotate(90)]),
     ErrorCode.UNSUPPORTED_MEDIA_TYPE),
    ("truncated jpeg", save(RGB, "JPEG")[:100], ErrorCode.UNREADABLE_IMAGE),
    ("truncated png", save(RGB, "PNG")[:60], ErrorCode.UNREADABLE_IMAGE),
    ("truncated webp", save(RGB, "WEBP")[:40], ErrorCode.UNREADABLE_IMAGE),
    ("png header only", _png_header(10, 10), ErrorCode.UNREADABLE_IMAGE),
    ("jpeg magic only", b"\xff\xd8\xff", ErrorCode.UNREADABLE_IMAGE),
    ("bmp header garbage", b"BM" + b"\xff" * 60, ErrorCode.UNREADABLE_IMAGE),
    ("tiff header garbage", b"II*\x00" + b"\xff" * 60, ErrorCode.UNREADABLE_IMAGE),
    ("too many bytes", b"\xff\xd8\xff" + b"\x00" * LIMIT_BYTES, ErrorCode.IMAGE_TOO_LARGE),
])
def test_refusals_have_stable_codes(name, data, code):
    with pytest.raises(ApiError) as info:
        decode(data)
    assert info.value.code is code


VALID = [save(RGB, f) for f in ("JPEG", "PNG", "WEBP", "BMP", "TIFF")]


def _check(data: bytes) -> None:
    try:
        image = decode(data)
    except ApiError as exc:
        assert exc.http_status in (400, 413, 415)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data):
    _check(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.data())
def test_fuzz_corrupted_real_images(valid, data):
    """Flip, cut and splice bytes of real images (keeping their magic)."""
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(4, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    _check(bytes(raw[:cut]))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("step", [1, 2, 4, 8])
def test_jpeg_pixels_are_opencvs_at_every_scale_and_orientation(orientation, step):
    """The libjpeg-turbo path changes no pixel: it is what OpenCV's IMREAD_COLOR
    (EXIF orientation applied) or IMREAD_REDUCED_COLOR_<step> gives."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = Image.fromarray((np.random.default_rng(1).random((203, 301, 3)) * 255
                             ).astype(np.uint8))
    data = save(photo, "JPEG", exif=exif.tobytes(), quality=90)
    need = -(-301 // step)
    got = decode_at(data, LIMIT_BYTES, LIMIT_PIXELS, lambda w, h: max(w, h) >= need)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[step]
    want = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)
    assert got.step == step and got.pixels.shape == want.shape
    assert (got.pixels == want).all()
    assert (got.width, got.height) == ((203, 301) if orientation >= 5 else (301, 203))


@pytest.mark.parametrize("kept", [0.5, 0.75, 0.95])
def test_a_truncated_jpeg_gets_opencvs_answer(kept):
    """libjpeg-turbo refuses it; OpenCV then decides, as it did before: the part
    that arrived, or ``unreadable_image``."""
    data = save(Image.fromarray(np.asarray(RGB.resize((600, 400)))), "JPEG")
    data = data[:int(len(data) * kept)]
    want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if want is None:
        with pytest.raises(ApiError) as err:
            decode(data)
        assert err.value.code == ErrorCode.UNREADABLE_IMAGE
    else:
        assert (decode(data) == cv2.cvtColor(want, cv2.COLOR_BGR2RGB)).all()
