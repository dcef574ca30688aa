"""What tiled inference (``tile=auto``) gains in AP on small objects, and what
it costs in latency (issue 17).

Real weights on real photographs, through the real stack: YOLOX-Nano (the
shipped card, 416 px input) served by Triton behind a gateway, on the 128 COCO
val2017 images of ../shared/data/coco-val2017-128. Those photographs are ~640
px, under twice the model's input: no tiles apply to them. So each is also
enlarged k times (bicubic, re-encoded as JPEG q90: what a 1080p or 4K camera
sends; the enlargement adds no detail, so what tiling gains here is the
model seeing objects larger, which is what it gains on a real 4K frame too),
then sent with ``tile=off`` and ``tile=auto`` (a budget that lets every tile
run). Boxes are mapped back to the native photo and scored with pycocotools;
latency is the gateway's own total, medians.

    python benchmarks/tiling.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from decode_scale import COCO, enlarged
from tierdet.build.models import default_home, ensure_cards
from tierdet.devstack.stack import running_stack
from tierdet.training.datasets.coco import CocoSplit
from tierdet.training.evaluation import coco_ap, image_samples, subset_gt

CARD = Path(__file__).resolve().parents[1] / "examples" / "cards" / "yolox-nano.yaml"
MODEL = "yolox-nano-416"


def detect_all(url: str, samples: list, k: int, tile: str) -> tuple[list[dict], list[float],
                                                                   list[int]]:
    found, latency, tiles = [], [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for sample in samples:
            r = client.post("/v1/detect", files={"image": ("a.jpg", enlarged(sample.path, k),
                                                           "image/jpeg")},
                            data={"model": MODEL, "sla_ms": "60000", "tile": tile,
                                  "score_threshold": "0.001", "max_detections": "100"})
            r.raise_for_status()
            answer = r.json()
            latency.append(answer["timing"]["total_ms"])
            tiles.append(answer["routing"]["tiles"])
            for d in answer["detections"]:
                found.append({"image_id": sample.image_id, "category_id": d["class_id"],
                              "score": d["score"],
                              "bbox": [d["x1"] / k, d["y1"] / k, (d["x2"] - d["x1"]) / k,
                                       (d["y2"] - d["y1"]) / k]})
    return found, latency, tiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--dataset", type=Path, default=COCO)
    p.add_argument("--factors", default="1,2,3", help="enlargements k, comma-separated")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    args = p.parse_args(argv)
    built = ensure_cards([CARD], args.home)
    data = CocoSplit(args.dataset)
    samples = image_samples(data)
    samples = samples[:args.limit] if args.limit else samples
    truth = subset_gt(data.coco, {s.image_id for s in samples})
    with tempfile.TemporaryDirectory(prefix="tierdet-tiling-") as tmp, \
            running_stack(built, args.home, Path(tmp), threads=2,
                          cards=str(CARD)) as (_, gateway):
        print(f"{MODEL} on {len(samples)} COCO val2017 photographs, through the gateway")
        print("| enlarged | tiles (median) | AP off | AP auto | AP_small off | "
              "AP_small auto | p50 ms off | p50 ms auto | latency |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in map(int, args.factors.split(",")):
            off, off_ms, _ = detect_all(gateway.http, samples, k, "off")
            auto, auto_ms, tiles = detect_all(gateway.http, samples, k, "auto")
            a, b = coco_ap(truth, off), coco_ap(truth, auto)
            print(f"| {k}x | {statistics.median(tiles):.0f} | {a.ap * 100:.1f} | "
                  f"{b.ap * 100:.1f} | {a.ap_small * 100:.1f} | {b.ap_small * 100:.1f} | "
                  f"{statistics.median(off_ms):.0f} | {statistics.median(auto_ms):.0f} | "
                  f"{statistics.median(auto_ms) / statistics.median(off_ms):.2f}x |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
