"""Static INT8 (ONNX Runtime) against fp32, for the models where it might pay.

For each model: the built fp32 graph, and the same graph with its
convolutions quantized statically (QDQ, per-channel s8 weights, u8
activations, ``quantize_static``), calibrated on photographs that are not the
evaluation set (scikit-image's astronaut, coffee, chelsea, rocket and their
flips). Then, in one run on this machine: batch-1 latency of both (ONNX
Runtime CPU, 2 threads, one COCO photo, medians), and accuracy:

- with real weights (a card such as YOLOX-Nano): COCO AP of both on
  ../shared/data/coco-val2017-128 (pycocotools);
- with random weights (the zoo here): agreement of the int8 detections with
  fp32's on the COCO photographs: the share of fp32 boxes scoring >= 0.3 that
  int8 finds with the same class at IoU >= 0.8;
- tierdet's trained checkpoints (``--trained``, real trained weights of the
  zoo's architectures on the synthetic shapes set): AP of both on the val
  split the checkpoint records, regenerated from its seed; these calibrate on
  images of the train split instead of the photographs.

A variant would enter the registry only where it is >= 1.3x faster at batch 1
and loses <= 1.0 AP (or agrees on >= 95% of boxes where no real weights exist).

    python benchmarks/int8.py --models damoyolo-t,damoyolo-s,damoyolo-m \\
        --card examples/cards/yolox-nano.yaml --trained
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from tierdet.build.models import BuiltModel, default_home, ensure_built, ensure_cards
from tierdet.build.weights import WeightsSource
from tierdet.serving import imaging
from tierdet.training.evaluation import run_evaluation

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-128"


def calibration_images() -> list[np.ndarray]:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
              skimage.data.rocket()]
    return photos + [p[:, ::-1].copy() for p in photos]


def quantize(model: BuiltModel, out: Path, images: list[np.ndarray] | None = None) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    spec = model.spec

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": imaging.prepare(p, spec.input_size,
                                                            spec.preprocessing)[0][None]}
                                 for p in images or calibration_images()])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model.onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    return out


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(fp32: ort.InferenceSession, int8: ort.InferenceSession, model: BuiltModel,
              limit: int = 32) -> tuple[float, int]:
    """Share of fp32's boxes (score >= 0.3) that int8 finds (same class, IoU >= 0.8)."""
    found = total = 0
    for path in sorted((COCO / "images").glob("*.jpg"))[:limit]:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        tensor, _ = imaging.prepare(image, model.spec.input_size, model.spec.preprocessing)
        a = fp32.run(None, {"images": tensor[None]})[0][0]
        b = int8.run(None, {"images": tensor[None]})[0][0]
        b = b[b[:, 4] >= 0.15]
        for row in a[a[:, 4] >= 0.3]:
            total += 1
            found += any(r[5] == row[5] and _iou(row, r) >= 0.8 for r in b)
    return (found / total if total else float("nan")), total


def shapes_data(checkpoint: Path, root: Path) -> tuple[Path, list[np.ndarray]]:
    """The val split a trained checkpoint records, regenerated from its seed, and 16
    images of its train split for calibration (never the evaluation images)."""
    import json

    from tierdet.training.datasets.synthetic import SynthConfig, generate

    manifest = json.loads(checkpoint.with_suffix(".json").read_text())["dataset"]["manifest"]
    config = SynthConfig(**manifest["config"])
    data = generate(root, {"val": manifest["splits"]["val"], "train": 16}, config,
                    manifest["seed"])
    images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
              for f in sorted((data / "train").glob("*.jpg"))]
    return data, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="damoyolo-t,damoyolo-s,damoyolo-m")
    p.add_argument("--card", type=Path, action="append", default=[])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--trained", action="store_true",
                   help="also tierdet's trained checkpoints (weights/), on their shapes set")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    built = ensure_built(names, WeightsSource.parse("random:0"), args.home, progress=False)
    real = ensure_cards(args.card, args.home)
    trained: dict[str, tuple[Path, list[np.ndarray]]] = {}
    if args.trained:
        from tierdet.registry.trained import CHECKPOINTS
        from tierdet.training.stack_eval import build_checkpoints

        root = Path(__file__).resolve().parents[1]
        work = Path(tempfile.mkdtemp(prefix="tierdet-int8-"))
        for name, path in CHECKPOINTS.items():
            (model,) = build_checkpoints({name: root / path}, args.home)
            built.append(model)
            trained[name] = shapes_data(root / path, work / name)
    photo = cv2.cvtColor(cv2.imread(str(COCO / "images" / "000000160012.jpg")),
                         cv2.COLOR_BGR2RGB)
    print(f"ONNX Runtime {ort.__version__}, 2 threads, batch 1, median of {args.runs}")
    print(f"{'model':<16}{'fp32 ms':>9}{'int8 ms':>9}{'speed-up':>10}  accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        for model in [*built, *real]:
            data, images = trained.get(model.spec.name, (COCO, None))
            q = quantize(model, Path(tmp) / f"{model.spec.name}.int8.onnx", images)
            fp32, int8 = session(model.onnx), session(q)
            tensor, _ = imaging.prepare(photo, model.spec.input_size, model.spec.preprocessing)
            feed = {"images": tensor[None]}
            a, b = median_ms(fp32, feed, args.runs), median_ms(int8, feed, args.runs)
            if model in real or model.spec.name in trained:
                ap32, = run_evaluation(data, onnx=model.onnx)
                ap8, = run_evaluation(data, onnx=q)
                accuracy = f"AP {ap32.ap:.3f} -> {ap8.ap:.3f} ({100 * (ap8.ap - ap32.ap):+.1f})"
            else:
                share, boxes = agreement(fp32, int8, model)
                accuracy = f"{share:.1%} of {boxes} fp32 boxes found by int8 (random weights)"
            print(f"{model.spec.name:<16}{a:>9.1f}{b:>9.1f}{a / b:>9.2f}x  {accuracy}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
