"""Image bytes -> pixels, with limits: sniffing, header sizes, decoding.

Everything here runs before any model work, and every refusal is an
``ApiError`` with a stable code. Image dimensions are read from the file
header first, so a decompression bomb (a tiny file declaring a huge image)
is refused before a single pixel is allocated.
"""

from __future__ import annotations

import os
import struct

import cv2
import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.imaging import to_rgb


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes, or None if not an image we take."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) declared by the header, or None if not found cheaply."""
    try:
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8), DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + length
    return None


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> RGB uint8 HxWx3, or an ApiError saying why not."""
    if not data:
        raise ApiError(ErrorCode.EMPTY_IMAGE, "the image is empty")
    if len(data) > max_bytes:
        raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                       f"the image is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       "not a supported image (JPEG, PNG, WebP, BMP, TIFF)")
    size = header_size(data, fmt)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image declares {size[0]}x{size[1]} pixels; "
                       f"the limit is {max_pixels} pixels")
    if fmt == "gif":
        # OpenCV's wheels carry no GIF decoder; refuse clearly rather than guess.
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       "GIF images are not supported: send a frame as PNG or JPEG")
    # JPEG: IMREAD_COLOR applies EXIF orientation and converts CMYK. Others:
    # IMREAD_UNCHANGED keeps alpha (composited in to_rgb) and 16-bit depth.
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:  # e.g. a corrupt header declaring more than OpenCV's size limits
        image = None
    if image is None or image.size == 0:
        raise ApiError(ErrorCode.UNREADABLE_IMAGE, f"the {fmt} image could not be decoded")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image is {image.shape[1]}x{image.shape[0]} pixels; "
                       f"the limit is {max_pixels} pixels")
    return to_rgb(image)


def limit_decoder_pixels(max_pixels: int) -> None:
    """Backstop for formats whose header we do not parse (TIFF): OpenCV's own
    decoders refuse images above this many pixels before allocating them."""
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
