"""Image bytes -> pixels, with limits: sniffing, header sizes, decoding (and
``from_pixels``: an image sent as raw RGB pixels, within the same limits).

Everything here runs before any model work, and every refusal is an
``ApiError`` with a stable code. Image dimensions are read from the file
header first, so a decompression bomb (a tiny file declaring a huge image)
is refused before a single pixel is allocated.

JPEGs, most of what a detector is sent, are decoded by libjpeg-turbo through
simplejpeg (SIMD; straight to RGB) and, when the models' inputs are smaller
than the photograph, at a reduced scale: libjpeg's IDCT then computes 1/2,
1/4 or 1/8 of the pixels directly, instead of computing them all and
averaging them away in the resize. The result is pixel for pixel what
OpenCV's ``IMREAD_REDUCED_COLOR_*`` gives; OpenCV remains the decoder for
every other format and for what simplejpeg refuses (CMYK, truncated files).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
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


@dataclass(frozen=True)
class Decoded:
    """An image's pixels, possibly decoded at a reduced scale."""

    pixels: np.ndarray  # RGB uint8, H x W x 3
    width: int  # the image's own size, as displayed (EXIF orientation applied)
    height: int
    step: int = 1  # image pixels per decoded pixel, on each axis: 1, 2, 4 or 8


def from_pixels(image: Pixels, max_bytes: int, max_pixels: int) -> Decoded:
    """Raw pixels as a ``Decoded`` image (no copy), within the same limits as an
    encoded image's: its bytes, then its pixels."""
    if not image.data or image.width < 1 or image.height < 1:
        raise ApiError(ErrorCode.EMPTY_IMAGE, "the image has no pixels")
    if len(image.data) > max_bytes:
        raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                       f"the image is {len(image.data)} bytes; the limit is {max_bytes}")
    if image.width * image.height > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image is {image.width}x{image.height} pixels; "
                       f"the limit is {max_pixels} pixels")
    if len(image.data) != image.width * image.height * 3:
        raise ApiError(ErrorCode.UNREADABLE_IMAGE,
                       f"{len(image.data)} bytes are not {image.height}x{image.width}x3 pixels")
    pixels = np.frombuffer(image.data, np.uint8).reshape(image.height, image.width, 3)
    return Decoded(pixels, image.width, image.height)


# The largest fraction first: the IDCT scales libjpeg computes exactly.
REDUCTIONS = (8, 4, 2)


def reduction(width: int, height: int, fits: Callable[[int, int], bool]) -> int:
    """The largest DCT reduction after which the image still ``fits`` (libjpeg
    rounds a reduced size up), or 1 for a full decode."""
    for step in REDUCTIONS:
        if fits(-(-width // step), -(-height // step)):
            return step
    return 1


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> RGB uint8 HxWx3 at full size, or an ApiError saying why not."""
    return decode(data, max_bytes, max_pixels).pixels


def decode(data: bytes, max_bytes: int, max_pixels: int,
           fits: Callable[[int, int], bool] | None = None) -> Decoded:
    """Encoded bytes -> pixels, or an ApiError saying why not. With ``fits``
    (whether a decoded width x height still serves every model that may run), a
    JPEG is decoded at the smallest DCT scale that does."""
    fmt = _check(data, max_bytes, max_pixels)
    decoded = _decode_jpeg(data, fits) if fmt == "jpeg" else None
    if decoded is None:
        image = _decode_opencv(data, fmt)
        decoded = Decoded(to_rgb(image), image.shape[1], image.shape[0])
    if decoded.width * decoded.height > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image is {decoded.width}x{decoded.height} pixels; "
                       f"the limit is {max_pixels} pixels")
    return decoded


def _check(data: bytes, max_bytes: int, max_pixels: int) -> str:
    """The limits that need no decoding; the image's format."""
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
    return fmt


def _decode_opencv(data: bytes, fmt: str) -> np.ndarray:
    # JPEG: IMREAD_COLOR applies EXIF orientation and converts CMYK. Others:
    # IMREAD_UNCHANGED keeps alpha (composited in to_rgb) and 16-bit depth.
    flags = cv2.IMREAD_COLOR if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:  # e.g. a corrupt header declaring more than OpenCV's size limits
        image = None
    if image is None or image.size == 0:
        raise ApiError(ErrorCode.UNREADABLE_IMAGE, f"the {fmt} image could not be decoded")
    return image


def _decode_jpeg(data: bytes, fits: Callable[[int, int], bool] | None) -> Decoded | None:
    """libjpeg-turbo's decode, reduced where ``fits`` allows; None where OpenCV must
    decide: CMYK (OpenCV's Adobe handling is the service's answer), or an error
    (a truncated file OpenCV decodes in part, a corrupt one it refuses)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace in ("CMYK", "YCCK"):
            return None
        orientation = exif_orientation(data)
        shown = (height, width) if orientation >= 5 else (width, height)
        step = reduction(*shown, fits) if fits is not None else 1
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_factor=step,
                                        min_width=-(-width // step),
                                        min_height=-(-height // step))
    except ValueError:
        return None
    if pixels.shape[:2] != (-(-height // step), -(-width // step)):
        return None  # not the scale asked for: let OpenCV decode it in full
    return Decoded(orient(pixels, orientation), *shown, step)


# EXIF orientation -> the OpenCV operations that show the image upright.
_ORIENT: dict[int, tuple[Callable[[np.ndarray], np.ndarray], ...]] = {
    2: (lambda a: cv2.flip(a, 1),),
    3: (lambda a: cv2.rotate(a, cv2.ROTATE_180),),
    4: (lambda a: cv2.flip(a, 0),),
    5: (cv2.transpose,),
    6: (lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),),
    7: (cv2.transpose, lambda a: cv2.flip(a, -1)),
    8: (lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),),
}


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels as stored -> as displayed, for an EXIF orientation (1-8)."""
    for op in _ORIENT.get(orientation, ()):
        pixels = op(pixels)
    return pixels


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1 when absent or unreadable)."""
    i = 2
    try:
        while i + 4 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker in (0xD9, 0xDA):  # end of image, start of scan: no EXIF before it
                return 1
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
                return _tiff_orientation(data[i + 10:i + 2 + length])
            i += 2 + length
    except struct.error:
        return 1
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == 0x0112 and kind == 3:  # orientation, a SHORT
            (value,) = struct.unpack(order + "H", entry[8:10])
            return value if 1 <= value <= 8 else 1
    return 1


def configure_decoders(max_pixels: int) -> None:
    """Backstop for formats whose header we do not parse (TIFF): OpenCV's own
    decoders refuse images above this many pixels before allocating them.
    Also keeps OpenCV single-threaded: requests already run side by side in
    worker threads, and OpenCV's own pool on top only adds hand-offs and
    spinning workers (CPU with no work)."""
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
    cv2.setNumThreads(1)
