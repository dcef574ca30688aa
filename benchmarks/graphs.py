"""Two served graphs of one model, side by side: an exporter change's cost and
whether the answers stayed the same.

Both graphs take tierdet's input (uint8 NHWC) and give [B, K, 6]. Each is run
on the same real COCO photographs, letterboxed as the gateway does, with ONNX
Runtime on the CPU; the runs are interleaved (A, B, A, B, ...) so the
machine's drift touches both alike. Prints the medians, their ratio, and the
largest difference between the two answers (rows sorted by score).

    cp HOME/onnx/efficientdet-d0.onnx /tmp/d0-before.onnx   # before the change
    tierdet --home /tmp/after build --models efficientdet-d0 --weights random
    python benchmarks/graphs.py /tmp/d0-before.onnx /tmp/after/onnx/efficientdet-d0.onnx
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from tierdet.registry.specs import get_spec
from tierdet.serving import imaging

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-128" / "images"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rows(output: np.ndarray) -> np.ndarray:
    """The detections of one answer, best first (padding rows dropped)."""
    kept = output[0][output[0][:, 4] > 0]
    return kept[np.lexsort((kept[:, 5], -kept[:, 4]))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--model", default="efficientdet-d0", help="the spec both graphs serve")
    p.add_argument("--photos", type=int, default=3)
    p.add_argument("--runs", type=int, default=20, help="timed runs of each graph")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    spec = get_spec(args.model)
    graphs = [session(args.before, args.threads), session(args.after, args.threads)]
    photos = sorted(COCO.glob("*.jpg"))[:args.photos]
    tensors = [imaging.prepare(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB),
                               spec.input_size, spec.preprocessing)[0][None] for f in photos]
    worst, counts = 0.0, []
    for x in tensors:
        a, b = (rows(g.run(None, {"images": x})[0]) for g in graphs)
        counts.append((len(a), len(b)))
        if len(a) != len(b):
            worst = float("inf")
        elif len(a):
            worst = max(worst, float(np.abs(a - b).max()))
    times: list[list[float]] = [[], []]
    for i in range(args.runs + 2):  # two warm-up rounds
        for which, g in enumerate(graphs):
            x = tensors[i % len(tensors)]
            start = time.perf_counter()
            g.run(None, {"images": x})
            if i >= 2:
                times[which].append((time.perf_counter() - start) * 1e3)
    before, after = (statistics.median(t) for t in times)
    print(f"{args.model}: ONNX Runtime {ort.__version__}, {args.threads} threads, batch 1, "
          f"{len(photos)} COCO photographs, {args.runs} interleaved runs each, medians")
    print(f"  before {args.before}: {before:8.2f} ms")
    print(f"  after  {args.after}: {after:8.2f} ms  (after/before {after / before:.3f})")
    print(f"  detections per photo (before, after): {counts}; largest difference in any "
          f"row value: {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
