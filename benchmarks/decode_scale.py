"""What decoding at a reduced JPEG scale costs in AP, and what it saves in time.

Real weights on real photographs: YOLOX-Nano (the shipped card, 416 px input)
on the 128 COCO val2017 images in ../shared/data/coco-val2017-128. Those
photographs are ~640 px, smaller than a camera's: no reduction applies to
them at 416. So each is also enlarged k times (bicubic) and re-encoded as a
JPEG (quality 90), the size a phone or a 1080p/4K camera sends; every such
file is then run twice through the gateway's own decode and resize
(``tierdet.serving.decoding.decode`` + ``imaging.prepare``): once decoding
every pixel, once at the DCT scale the gateway picks. The model is the
wrapped ONNX graph the gateway serves, run with ONNX Runtime; boxes are mapped
back to the native image and scored with pycocotools. Times are the median
decode + resize per image, both ways in this one run.

    python benchmarks/decode_scale.py --card examples/cards/yolox-nano.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
from tierdet.build.models import default_home, ensure_cards
from tierdet.registry.cards import register
from tierdet.registry.specs import get_spec
from tierdet.serving import decoding, imaging
from tierdet.training.datasets.coco import CocoSplit
from tierdet.training.evaluation import coco_ap, image_samples, onnx_runner, rows_to_coco

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-128"
LIMIT = 1 << 31


def enlarged(path: Path, k: int) -> bytes:
    """The photograph k times larger, as a camera-sized JPEG (k = 1: the file as is)."""
    if k == 1:
        return path.read_bytes()
    image = cv2.imread(str(path))
    image = cv2.resize(image, None, fx=k, fy=k, interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", type=Path, required=True)
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--dataset", type=Path, default=COCO)
    p.add_argument("--factors", default="1,2,3,4,8", help="enlargements k, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    built = ensure_cards([args.card], args.home)[-1]  # of several sizes: the largest
    register(args.card)
    spec = get_spec(built.spec.name)
    size, prep = spec.input_size, spec.preprocessing
    run = onnx_runner(built.onnx, args.threads)
    data = CocoSplit(args.dataset)
    samples = image_samples(data)

    def fits(width: int, height: int) -> bool:
        return imaging.covers(width, height, size, prep)

    print(f"{spec.name} ({size} px, {prep.resize}, shrink {prep.shrink}) on "
          f"{len(samples)} COCO val2017 photographs")
    print("| enlarged | image (median) | DCT scale | AP full decode | AP reduced | "
          "AP lost | decode+resize full | reduced | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in map(int, args.factors.split(",")):
        found: dict[str, list[dict]] = {"full": [], "reduced": []}
        spent: dict[str, list[float]] = {"full": [], "reduced": []}
        steps, sizes = [], []
        for sample in samples:
            jpeg = enlarged(sample.path, k)
            for way, how in (("full", None), ("reduced", fits)):
                start = time.perf_counter()
                image = decoding.decode(jpeg, LIMIT, LIMIT, how)
                tensor, geometry = imaging.prepare(image.pixels, size, prep, image.step,
                                                   (image.width, image.height))
                spent[way].append((time.perf_counter() - start) * 1e3)
                rows = run(tensor[None])[0]
                for det in rows_to_coco(rows, geometry, spec.labels, sample.image_id):
                    det["bbox"] = [v / k for v in det["bbox"]]  # back to the native photo
                    found[way].append(det)
                if way == "reduced":
                    steps.append(image.step)
                    sizes.append(f"{image.width}x{image.height}")
        ap = {way: coco_ap(data.coco, dets).ap for way, dets in found.items()}
        full_ms, reduced_ms = (statistics.median(spent[w]) for w in ("full", "reduced"))
        scale = ", ".join(f"1/{s}" for s in sorted(set(steps)))
        print(f"| {k}x | {statistics.mode(sizes)} | {scale} | {ap['full'] * 100:.1f} | "
              f"{ap['reduced'] * 100:.1f} | {(ap['full'] - ap['reduced']) * 100:+.1f} | "
              f"{full_ms:.1f} ms | {reduced_ms:.1f} ms | {full_ms / reduced_ms:.2f}x |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
