"""What an image file declares before its pixels: format, size, depth, and
the working memory its decoder will take.

Read from the first bytes of the file only, never by decoding, so that every
limit (pixels, bytes held) is applied before a single pixel is allocated.
Each parser reads what the decoder the gateway uses (libjpeg-turbo, libpng,
libwebp, libtiff, OpenCV's BMP reader) reads, in the same way: a JPEG's
markers are found past junk bytes as libjpeg finds them, a TIFF's first
directory is the image OpenCV decodes. A header that cannot be read is not
decoded at all (``None``: the caller refuses the image).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

# TIFF tags read from the first directory (IFD).
_WIDTH, _HEIGHT, _BITS, _COMPRESSION, _SAMPLES = 256, 257, 258, 259, 277
_ROWS_PER_STRIP, _TILE_WIDTH, _TILE_LENGTH, _EXTRA_SAMPLES, _SAMPLE_FORMAT = (
    278, 322, 323, 338, 339)
_IEEE_FLOAT = 3
# SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD9)})


@dataclass(frozen=True)
class Header:
    """An image as its header declares it."""

    format: str
    width: int
    height: int
    bits: int = 8  # bits per sample
    alpha: bool = False  # a transparency channel (or a PNG tRNS chunk)
    float_samples: bool = False
    animated: bool = False
    work_bytes: int = 0  # what the decoder holds beside its output, at its peak

    @property
    def pixels(self) -> int:
        return self.width * self.height


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


def read_header(data: bytes, fmt: str) -> Header | None:
    """The header of an image of format ``fmt`` (see ``sniff_format``), or None
    where it is missing, cut short or inconsistent."""
    parse = _PARSERS[fmt]
    try:
        header = parse(data)
    except (struct.error, IndexError, ValueError):
        return None
    if header is None or header.width <= 0 or header.height <= 0:
        return None
    return header


def _png(data: bytes) -> Header | None:
    if data[12:16] != b"IHDR":
        return None
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    alpha = colour in (4, 6)
    # Chunks before the first IDAT: a tRNS there makes a colour transparent.
    i = 33
    while not alpha and i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        alpha = kind == b"tRNS"
        i += 12 + length
    # libpng reads rows straight into OpenCV's image; with alpha, OpenCV reads
    # them into a buffer of the same size first.
    work = width * height * 4 * (2 if bits > 8 else 1) if alpha else 0
    return Header("png", width, height, bits, alpha, work_bytes=work)


def _gif(data: bytes) -> Header:
    width, height = struct.unpack("<HH", data[6:10])
    return Header("gif", width, height)


def _bmp(data: bytes) -> Header:
    (size,) = struct.unpack("<I", data[14:18])
    if size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
    else:
        width, height, _, bits = struct.unpack("<iiHH", data[18:30])
    # OpenCV reads a BMP row by row into its image. 32 bits: BGRA.
    return Header("bmp", abs(width), abs(height), 8, alpha=bits == 32)


def _webp(data: bytes) -> Header | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        flags = data[20]
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        alpha, animated = bool(flags & 0x10), bool(flags & 0x02)
    elif chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        alpha, animated = bool(bits >> 28 & 1), False
    elif chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        width, height, alpha, animated = w & 0x3FFF, h & 0x3FFF, False, False
    else:
        return None
    # libwebp decodes into buffers of its own (a lossless image: ARGB and its
    # transforms' rows) before writing OpenCV's: 6 bytes a pixel at most, measured.
    return Header("webp", width, height, 8, alpha, animated=animated,
                  work_bytes=6 * width * height)


def _jpeg(data: bytes) -> Header | None:
    frame = None
    for marker, segment in _jpeg_segments(data):
        if marker in _JPEG_SOF and frame is None:
            frame = (marker, segment)
        elif marker == 0xDA:  # start of scan: the frame header came before it
            return _jpeg_frame(*frame, scan_components=segment[0]) if frame else None
    # Cut short before its first scan: what the frame header says, if it came.
    return _jpeg_frame(*frame, scan_components=0) if frame else None


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, body) of each segment, as libjpeg finds them: bytes between
    segments that are not a marker are skipped (libjpeg warns of "extraneous
    bytes" and reads on); ends at the end of the data or of the image."""
    i = 2
    while (i := data.find(b"\xff", i)) >= 0 and i + 1 < len(data):
        marker = data[i + 1]
        if marker in (0xFF, 0x00):  # a fill byte, or 0xFF 0x00: not a marker
            i += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_BARE:
            i += 2
            continue
        if marker == 0xD9 or i + 4 > len(data):  # end of image
            return
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            return
        yield marker, data[i + 4:i + 2 + length]
        i += 2 + length


def _jpeg_frame(marker: int, sof: bytes, scan_components: int) -> Header:
    bits, height, width, count = struct.unpack(">BHHB", sof[:6])
    sampling = [(sof[7 + 3 * k] >> 4, sof[7 + 3 * k] & 0x0F) for k in range(count)]
    if not sampling or any(h == 0 or v == 0 for h, v in sampling):
        # libjpeg refuses it; its size still counts against the limits.
        sampling, scan_components = [(1, 1)] * 4, 0
    # A progressive or multi-scan image is decoded from a buffer of every DCT
    # coefficient (2 bytes each, components padded to whole MCUs); one
    # interleaved baseline scan is decoded a row of MCUs at a time.
    buffered = marker in _JPEG_PROGRESSIVE or scan_components < count
    work = _coefficient_bytes(width, height, sampling) if buffered else 0
    return Header("jpeg", width, height, bits, work_bytes=work)


def _coefficient_bytes(width: int, height: int, sampling: list[tuple[int, int]]) -> int:
    h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
    mcu_cols, mcu_rows = -(-width // (8 * h_max)), -(-height // (8 * v_max))
    blocks = sum(mcu_cols * h * mcu_rows * v for h, v in sampling)
    return blocks * 64 * 2


def _tiff(data: bytes) -> Header | None:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    tags: dict[int, int] = {}
    for k in range(count):
        entry = data[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        tags[tag] = _tiff_value(data, order, kind, n, entry[8:12])
    if _WIDTH not in tags or _HEIGHT not in tags:
        return None
    width, height = tags[_WIDTH], tags[_HEIGHT]
    samples, bits = tags.get(_SAMPLES, 1), tags.get(_BITS, 1)
    if tags.get(_TILE_WIDTH):
        tile = tags[_TILE_WIDTH] * tags.get(_TILE_LENGTH, height)
    else:
        tile = width * min(tags.get(_ROWS_PER_STRIP, height) or height, height)
    # OpenCV reads a tile (a strip) at a time: libtiff's raw strip and its
    # decoded copy at the image's own depth, and OpenCV's (RGBA, or the
    # samples at 16 bits). One strip may be the whole image (Pillow's default).
    work = tile * (2 * samples * -(-bits // 8) + max(4, 2 * samples))
    return Header("tiff", width, height, bits, alpha=_EXTRA_SAMPLES in tags,
                  float_samples=tags.get(_SAMPLE_FORMAT) == _IEEE_FLOAT, work_bytes=work)


def _tiff_value(data: bytes, order: str, kind: int, count: int, field: bytes) -> int:
    """The first value of a SHORT or LONG entry (inline or at its offset); 0 else."""
    size = {3: 2, 4: 4}.get(kind)
    if size is None or count == 0:
        return 0
    if count * size > 4:  # the values are elsewhere: the field is their offset
        (offset,) = struct.unpack(order + "I", field)
        field = data[offset:offset + size]
    (value,) = struct.unpack(order + ("H" if size == 2 else "I"), field[:size])
    return int(value)


_PARSERS = {"png": _png, "gif": _gif, "bmp": _bmp, "webp": _webp, "jpeg": _jpeg,
            "tiff": _tiff}
