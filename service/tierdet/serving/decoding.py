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

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.registry.specs import ModelSpec
from tierdet.serving import OPENCV_LIMIT, imaging, memory
from tierdet.serving.headers import Header, read_header, sniff_format
from tierdet.serving.imaging import to_rgb
from tierdet.serving.settings import Settings

log = logging.getLogger("tierdet")
__all__ = ["Decoded", "decode", "decode_image", "from_pixels", "header_size", "peak_bytes",
           "sniff_format"]


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) declared by the header, or None if it cannot be read."""
    header = read_header(data, fmt)
    return None if header is None else (header.width, header.height)


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
    header = checked_header(data, max_bytes, max_pixels)
    decoded = _decode_jpeg(data, fits) if header.format == "jpeg" else None
    if decoded is None:
        image = _decode_opencv(data, header)
        decoded = Decoded(to_rgb(image), image.shape[1], image.shape[0])
    if decoded.width * decoded.height > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image is {decoded.width}x{decoded.height} pixels; "
                       f"the limit is {max_pixels} pixels")
    return decoded


def checked_header(data: bytes, max_bytes: int, max_pixels: int) -> Header:
    """The limits that need no decoding; the image's header (an ApiError where a
    limit refuses it: what ``decode`` refuses before it allocates anything)."""
    if not data:
        raise ApiError(ErrorCode.EMPTY_IMAGE, "the image is empty")
    if len(data) > max_bytes:
        raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                       f"the image is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       "not a supported image (JPEG, PNG, WebP, BMP, TIFF)")
    header = read_header(data, fmt)
    if header is None:  # never handed to a decoder: its size would be unknown
        raise ApiError(ErrorCode.UNREADABLE_IMAGE, f"the {fmt} image's header is unreadable")
    if header.pixels > max_pixels:
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image declares {header.width}x{header.height} pixels; "
                       f"the limit is {max_pixels} pixels")
    _check_kind(header)
    budget = memory.image_bytes(max_pixels)
    if peak_bytes(header) > budget:
        most = header.pixels * budget // peak_bytes(header)
        raise ApiError(ErrorCode.TOO_MANY_PIXELS,
                       f"the image declares {header.width}x{header.height} pixels; a "
                       f"{header.bits}-bit {fmt}{' with transparency' if header.alpha else ''} "
                       f"this way takes more memory to decode: its limit is {most} pixels")
    return header


def _check_kind(header: Header) -> None:
    """Refuse what the models cannot use, or OpenCV cannot decode, before decoding."""
    fmt = header.format
    if fmt == "gif":
        # OpenCV's wheels carry no GIF decoder; refuse clearly rather than guess.
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       "GIF images are not supported: send a frame as PNG or JPEG")
    if header.animated:
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       f"animated {fmt} images are not supported: send a frame as PNG or JPEG")
    if header.float_samples or header.bits > 16:
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                       f"{header.bits}-bit{' floating-point' if header.float_samples else ''} "
                       f"samples are not supported: send 8 or 16 bits a sample")


def _keeps_alpha(header: Header) -> bool:
    """Whether the image is decoded with its alpha (to be shown over white) and
    so at its own depth; else OpenCV decodes it straight to 8-bit BGR."""
    return header.alpha and header.format != "jpeg"


def peak_bytes(header: Header) -> int:
    """The most memory decoding ``header``'s image takes, at full scale: the
    decoder's own buffers beside its output, then its output beside the RGB
    copy (``to_rgb``) or a JPEG's EXIF rotation. ``memory.image_bytes`` is
    what one image may take; an image that would take more is refused."""
    pixels = header.pixels
    depth = 2 if header.bits > 8 else 1
    out = (4 * depth if _keeps_alpha(header) else 3) * pixels
    return memory.DECODE_OVERHEAD + max(header.work_bytes + out, out + 3 * pixels)


def _decode_opencv(data: bytes, header: Header) -> np.ndarray:
    # JPEG: IMREAD_COLOR applies EXIF orientation and converts CMYK. Others:
    # IMREAD_UNCHANGED keeps alpha (composited in to_rgb) at the image's depth;
    # without alpha, IMREAD_COLOR decodes straight to 8 bits (libpng and
    # libtiff drop the low byte of 16-bit samples as they read).
    if header.format == "jpeg":
        flags = cv2.IMREAD_COLOR
    elif _keeps_alpha(header):
        flags = cv2.IMREAD_UNCHANGED
    else:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:  # e.g. a corrupt header declaring more than OpenCV's size limits
        image = None
    if image is None or image.size == 0:
        raise ApiError(ErrorCode.UNREADABLE_IMAGE,
                       f"the {header.format} image could not be decoded")
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
    """Keep OpenCV single-threaded: requests already run side by side in
    worker threads, and OpenCV's own pool on top only adds hand-offs and
    spinning workers (CPU with no work). Its own pixel limit, the backstop
    behind the header checks here, was read when cv2 was imported (see
    ``tierdet.serving``): say so if it is not this gateway's."""
    if os.environ.get(OPENCV_LIMIT) != str(max_pixels):
        log.warning("OpenCV's pixel limit is %s, read when cv2 was imported, not this "
                    "gateway's %d: start the gateway with TIERDET_MAX_IMAGE_PIXELS set",
                    os.environ.get(OPENCV_LIMIT, "its default"), max_pixels)
    cv2.setNumThreads(1)


def decode_for(data: bytes | Pixels, specs: list[ModelSpec], settings: Settings,
               full: bool = False) -> tuple[Decoded, float]:
    """``data`` decoded at the smallest scale that still covers every model of
    ``specs`` (``full``: every pixel, e.g. for tiles), and the seconds it took.
    Raw ``Pixels`` are only checked against the same limits."""
    t0 = time.perf_counter()
    if isinstance(data, Pixels):
        return (from_pixels(data, settings.max_image_bytes, settings.max_image_pixels),
                time.perf_counter() - t0)
    inputs = [(s.input_size, s.preprocessing) for s in specs]

    def fits(width: int, height: int) -> bool:
        return all(imaging.covers(width, height, size, prep) for size, prep in inputs)

    reduced = settings.decode_scale == "reduced" and not full
    decoded = decode(data, settings.max_image_bytes, settings.max_image_pixels,
                     fits if reduced else None)
    return decoded, time.perf_counter() - t0
