"""What wrapping a card's graph costs: the graph as shipped vs tierdet's wrapped one.

Times, with ONNX Runtime on the CPU (2 intra-op threads, one real COCO photo
prepared as the gateway prepares it, medians of --runs after warm-up, all in
one run): the card's own graph at batch 1 (its own float input, made here
the way the card says), the wrapped graph (uint8 in, decode + NMS inside) at
batch 1, and the wrapped graph at batch 4 per image (it was made batchable).
``--compare`` adds another wrapped graph of the same card (an older build's,
e.g. copied before an exporter change) at batch 1, in the same run.

    python benchmarks/cards.py --card examples/cards/yolox-nano.yaml
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
from tierdet.build.models import default_home, ensure_cards
from tierdet.registry.cards import CheckpointSource, expand, load_card
from tierdet.serving import imaging

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-128" / \
    "images" / "000000160012.jpg"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(run, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", type=Path, required=True)
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", type=Path, help="another wrapped graph of this card")
    args = p.parse_args(argv)
    card = expand(load_card(args.card))[-1]  # of several input sizes: the largest
    if isinstance(card.source, CheckpointSource):
        p.error("a checkpoint card has no graph of its own to compare with")
    built = ensure_cards([args.card], args.home)[-1]
    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    tensor, _ = imaging.prepare(image, built.spec.input_size, built.spec.preprocessing)
    # The card's own input, made here as the card describes it.
    raw = tensor[..., ::-1] if card.input.channels == "BGR" else tensor
    raw = (raw.astype(np.float32) - np.array(card.input.mean, np.float32)) / np.array(
        card.input.std, np.float32)
    raw = np.ascontiguousarray(raw.transpose(2, 0, 1) if card.input.layout == "NCHW" else raw)
    own = session(card.source.onnx, args.threads)
    own_name = own.get_inputs()[0].name
    wrapped = session(built.onnx, args.threads)
    one, four = tensor[None], np.stack([tensor] * 4)
    rows = [
        ("card's own graph, batch 1 (no decode, no NMS)",
         median_ms(lambda: own.run(None, {own_name: raw[None]}), args.runs)),
        ("wrapped graph, batch 1", median_ms(lambda: wrapped.run(None, {"images": one}),
                                             args.runs)),
        ("wrapped graph, batch 4, per image",
         median_ms(lambda: wrapped.run(None, {"images": four}), args.runs) / 4),
    ]
    if args.compare:
        other = session(args.compare, args.threads)
        rows.append((f"{args.compare.name}, batch 1",
                     median_ms(lambda: other.run(None, {"images": one}), args.runs)))
    print(f"{card.name}: {built.provenance['batching']}; ONNX Runtime {ort.__version__}, "
          f"{args.threads} threads, median of {args.runs}")
    for label, ms in rows:
        print(f"  {label:<48} {ms:7.2f} ms  ({ms / rows[0][1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
