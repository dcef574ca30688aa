"""Worst valid images (issue 27): for every format and bit depth the gateway
accepts, the largest image it still takes, sent alone and sixteen at once to a
gateway configured as the Helm chart configures it.

Each image is made as large as the gateway's own header check lets it be
(``decoding``'s pixel, byte and decode-memory limits with the chart's
settings; where the check refuses, its message says the limit, and the image
is made again within it), then:

1. **alone**: posted once; the gateway's peak RSS growth (``VmHWM`` after
   ``clear_refs``, over ``VmRSS`` before) against what ``serving/memory.py``
   allows one image: an image slot (``memory.image_bytes``) and its body
   (``memory.BODY_COPIES`` x its bytes);
2. **sixteen at once**: the heaviest image (by its measured growth) sixteen
   times, then the sixteen variants mixed, each over its own connection;
   every request must be answered (200, or the 503 the concurrency bound
   gives), and the gateway's peak RSS must stay within the chart's
   ``resources.limits.memory`` for the gateway.

The chart's settings and limit are read from ``deploy/helm/tierdet/values.yaml``
(the one source). Loopback only; serves one real model card. Example:

    python benchmarks/worst_images.py --home .cache/test-home
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import yaml
from tierdet.build.models import default_home, ensure_cards
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.devstack.stack import GatewayProcess, start_triton
from tierdet.serving import decoding, memory
from tierdet.serving.headers import read_header, sniff_format
from tierdet.serving.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
from load import proc_status_bytes

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "deploy/helm/tierdet/values.yaml"
CARD = ROOT / "examples/cards/yolox-nano.yaml"
AT_ONCE = 16
# Chart settings that name the cluster rather than the gateway's memory.
NOT_HERE = {"workers"}


@dataclass(frozen=True)
class Variant:
    name: str
    ext: str
    channels: int
    depth: type  # np.uint8 or np.uint16
    params: tuple[int, ...] = ()


VARIANTS = [
    Variant("jpeg baseline", ".jpg", 3, np.uint8, (cv2.IMWRITE_JPEG_QUALITY, 95)),
    Variant("jpeg progressive", ".jpg", 3, np.uint8,
            (cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    Variant("png 8-bit RGB", ".png", 3, np.uint8, (cv2.IMWRITE_PNG_COMPRESSION, 9)),
    Variant("png 8-bit RGBA", ".png", 4, np.uint8, (cv2.IMWRITE_PNG_COMPRESSION, 9)),
    Variant("png 16-bit RGB", ".png", 3, np.uint16, (cv2.IMWRITE_PNG_COMPRESSION, 9)),
    Variant("png 16-bit RGBA", ".png", 4, np.uint16, (cv2.IMWRITE_PNG_COMPRESSION, 9)),
    Variant("webp lossy RGB", ".webp", 3, np.uint8, (cv2.IMWRITE_WEBP_QUALITY, 90)),
    Variant("webp lossless RGBA", ".webp", 4, np.uint8, (cv2.IMWRITE_WEBP_QUALITY, 101)),
    Variant("tiff 8-bit RGB", ".tif", 3, np.uint8, (cv2.IMWRITE_TIFF_COMPRESSION, 8)),
    Variant("tiff 8-bit RGBA", ".tif", 4, np.uint8, (cv2.IMWRITE_TIFF_COMPRESSION, 8)),
    Variant("tiff 16-bit RGB", ".tif", 3, np.uint16, (cv2.IMWRITE_TIFF_COMPRESSION, 8)),
    Variant("tiff 16-bit RGBA", ".tif", 4, np.uint16, (cv2.IMWRITE_TIFF_COMPRESSION, 8)),
    Variant("bmp 24-bit", ".bmp", 3, np.uint8),
    Variant("bmp 32-bit", ".bmp", 4, np.uint8),
]


def chart() -> tuple[dict[str, str], int]:
    """The gateway's settings (TIERDET_* names, lower case) and memory limit in bytes."""
    gateway = yaml.safe_load(VALUES.read_text())["gateway"]
    settings = {k: str(v) for k, v in gateway["settings"].items() if k not in NOT_HERE}
    limit = gateway["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    return settings, int(number) * {"Mi": 2**20, "Gi": 2**30}[unit]


def picture(pixels: int, variant: Variant) -> np.ndarray:
    """A smooth 4:3 scene (compresses well, so the byte limit binds last)."""
    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    top = np.iinfo(variant.depth).max
    x = np.linspace(0, top, width, dtype=np.float32)[None, :]
    y = np.linspace(0, top, height, dtype=np.float32)[:, None]
    base = ((x + y) / 2).astype(variant.depth)
    planes = [base, np.flip(base, 1), np.flip(base, 0), np.full_like(base, top // 2)]
    return np.dstack(planes[:variant.channels])


def largest(variant: Variant, settings: Settings) -> tuple[bytes, str]:
    """The largest image of ``variant`` the gateway's header check accepts."""
    pixels = settings.max_image_pixels
    for _ in range(8):
        ok, encoded = cv2.imencode(variant.ext, picture(pixels, variant), list(variant.params))
        if not ok:
            raise RuntimeError(f"OpenCV could not write {variant.name}")
        data = encoded.tobytes()
        try:
            decoding.checked_header(data, settings.max_image_bytes, settings.max_image_pixels)
        except ApiError as error:
            if error.code == ErrorCode.IMAGE_TOO_LARGE:
                pixels = int(pixels * settings.max_image_bytes / len(data) * 0.97)
                continue
            most = re.search(r"limit is (\d+) pixels", error.message)
            if error.code == ErrorCode.TOO_MANY_PIXELS and most:
                pixels = int(int(most.group(1)) * 0.998)
                continue
            return data, f"refused: {error.message}"
        header = read_header(data, sniff_format(data) or "")
        return data, f"{header.width}x{header.height}, {header.bits}-bit"
    raise RuntimeError(f"{variant.name}: no accepted size found")


def post(base: str, model: str, name: str, data: bytes) -> int:
    r = httpx.post(base + "/v1/detect", files={"image": (name, data)},
                   data={"model": model, "sla_ms": "60000"}, timeout=300)
    if r.status_code not in (200, 503):
        raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
    return r.status_code


def alone(gateway: GatewayProcess, model: str, images: dict[str, bytes]) -> dict[str, int]:
    """Each image's peak RSS growth, posted by itself."""
    pid, grew = gateway.process.pid, {}
    for name, data in images.items():
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak, from now
        before = proc_status_bytes(pid, "VmRSS")
        assert post(gateway.http, model, name, data) == 200, name
        grew[name] = proc_status_bytes(pid, "VmHWM") - before
    return grew


def at_once(gateway: GatewayProcess, model: str, batch: list[tuple[str, bytes]]
            ) -> tuple[int, collections.Counter[int]]:
    """The gateway's peak RSS (absolute) while ``batch`` is posted all at once."""
    pid = gateway.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        statuses = collections.Counter(pool.map(
            lambda item: post(gateway.http, model, *item), batch))
    return proc_status_bytes(pid, "VmHWM"), statuses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    args = p.parse_args()
    chart_settings, limit = chart()
    settings = Settings.from_env({f"TIERDET_{k.upper()}": v for k, v in chart_settings.items()})
    made = {v.name + v.ext: largest(v, settings) for v in VARIANTS}
    images = {name: data for name, (data, what) in made.items() if not what.startswith("refused")}
    one = memory.image_bytes(settings.max_image_pixels)

    built = ensure_cards([CARD], args.home)
    model = built[0].spec.name
    work = Path(tempfile.mkdtemp(prefix="tierdet-worst-"))
    triton = start_triton(built, args.home, work, threads=2)
    gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log", cards=str(CARD),
                                   models=",".join(b.spec.name for b in built),
                                   **chart_settings)
    try:
        idle = proc_status_bytes(gateway.process.pid, "VmRSS")
        grew = alone(gateway, model, images)
        heaviest = max(grew, key=grew.__getitem__)
        same_peak, same = at_once(gateway, model, [(heaviest, images[heaviest])] * AT_ONCE)
        mixed = [list(images.items())[i % len(images)] for i in range(AT_ONCE)]
        mixed_peak, mixed_statuses = at_once(gateway, model, mixed)
    finally:
        gateway.stop()
        triton.stop()

    print(f"== worst valid images: chart settings {chart_settings} ==")
    print("| image | size | body KB | peak growth MiB | allowed MiB (slot + body) | within |")
    print("|---|---|---|---|---|---|")
    over = 0
    for name, (data, what) in made.items():
        if name not in grew:
            print(f"| {name} | {what} | {len(data) / 1e3:.0f} | | | |")
            continue
        allowed = one + memory.BODY_COPIES * len(data)
        over += grew[name] > allowed
        print(f"| {name} | {what} | {len(data) / 1e3:.0f} | {grew[name] / memory.MIB:.0f} | "
              f"{allowed / memory.MIB:.0f} | {'yes' if grew[name] <= allowed else 'NO'} |")
    bound = memory.bound(settings)
    print(f"idle gateway {idle / memory.MIB:.0f} MiB; the chart's limit {limit / memory.MIB:.0f} "
          f"MiB; serving/memory.py's bound {bound.describe()}")
    for label, peak, statuses in (
            (f"{AT_ONCE} x {heaviest}", same_peak, same),
            (f"{AT_ONCE} mixed", mixed_peak, mixed_statuses)):
        print(f"{label}: peak {peak / memory.MIB:.0f} MiB of {limit / memory.MIB:.0f} "
              f"({'within' if peak <= limit else 'OVER'}), statuses {dict(statuses)}")
    return 0 if not over and max(same_peak, mixed_peak) <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
