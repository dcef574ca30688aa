"""``tierdet dataset synth``, ``tierdet train`` and ``tierdet eval``: the accuracy tools.

Kept apart from :mod:`tierdet.cli` so the serving commands stay small;
``cli.parser()`` calls :func:`register`. torch is imported only by ``train``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from tierdet.training.datasets.synthetic import SynthConfig, generate

    config = SynthConfig(size=args.size, min_objects=args.min_objects,
                         max_objects=args.max_objects, image_format=args.format)
    root = generate(args.out, {"train": args.train, "val": args.val}, config, args.seed)
    print(f"{root}: {args.train} train + {args.val} val images, {args.size} px, "
          f"seed {args.seed}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tierdet.training.train import TrainConfig, train

    cfg = TrainConfig(family=args.family, data=args.data, out=args.out, minutes=args.minutes,
                      seed=args.seed, steps=args.steps, eval_every_min=args.eval_every,
                      eval_images=args.eval_images, train_images=args.train_images,
                      threads=args.threads,
                      command=shlex.join(["tierdet", *sys.argv[1:]]))
    result = train(cfg)
    print(f"{result.checkpoint} ({result.steps} steps): val AP {result.final.ap:.3f} "
          f"AP50 {result.final.ap50:.3f}; sidecar {result.sidecar}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tierdet.registry.accuracy import EvalReport
    from tierdet.registry.cards import register as register_card
    from tierdet.training.evaluation import format_table, run_evaluation

    for card in args.card or ():  # so a card model's bare ONNX is known here too
        register_card(card)
    if args.url is None and args.onnx is None:
        raise SystemExit("nothing to evaluate: give --url (the gateway) and/or --onnx PATH")
    if args.calibrate:
        return _calibrate(args)
    records = run_evaluation(args.dataset, args.split, url=args.url, model=args.model,
                             tier=args.tier, onnx=args.onnx, limit=args.limit,
                             concurrency=args.concurrency)
    print(format_table(records))
    out = args.out or args.home / "eval" / "results.json"
    report = EvalReport.load(out) if out.is_file() and args.append else EvalReport()
    report.records.extend(records)
    report.save(out)
    print(f"results: {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """Print the bare model's score calibration, as a card's ``knots`` entry."""
    from tierdet.training.evaluation import fit_calibration

    if args.onnx is None:
        raise SystemExit("--calibrate fits the bare model's scores: give --onnx PATH")
    knots = fit_calibration(args.dataset, args.onnx, args.split)
    print("knots: [" + ", ".join(f"[{x:g}, {y:g}]" for x, y in knots) + "]")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dataset", help="make data sets (synthetic shapes, COCO format)")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    s = dsub.add_parser("synth", help="deterministic synthetic shapes detection set",
                        description="Render coloured shapes (circle, square, triangle, star, "
                                    "ring, cross) on cluttered backgrounds with exact boxes, "
                                    "as COCO train/val splits. The same seed gives "
                                    "byte-identical files.")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--train", type=int, default=2000, help="train images (default 2000)")
    s.add_argument("--val", type=int, default=200, help="val images (default 200)")
    s.add_argument("--size", type=int, default=256, help="long image side, px (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-objects", type=int, default=1)
    s.add_argument("--max-objects", type=int, default=6)
    s.add_argument("--format", choices=["jpg", "png"], default="jpg")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="train a small model on a COCO-format set (CPU)",
                       description="Seeded, time-bounded training of efficientdet-d0-shapes "
                                   "or damoyolo-ns-shapes. Writes an fp16 state_dict that "
                                   "`tierdet build --weights` loads, and a JSON sidecar "
                                   "with the command, seed and val AP curve.")
    t.add_argument("--family", choices=["efficientdet", "damoyolo"], required=True)
    t.add_argument("--data", type=Path, required=True, help="data set folder (COCO layout)")
    t.add_argument("--out", type=Path, required=True, help="checkpoint file (.pt)")
    t.add_argument("--minutes", type=float, required=True, help="training time budget")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None,
                   help="fixed schedule of N steps (replays a run exactly); default: the "
                        "schedule follows the clock")
    t.add_argument("--eval-every", type=float, default=10.0, help="minutes between AP points")
    t.add_argument("--eval-images", type=int, default=None, help="val images per AP point")
    t.add_argument("--train-images", type=int, default=None, help="use the first N only")
    t.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="COCO AP through the gateway and of the bare ONNX model",
                       description="Send every image of a split through the running gateway "
                                   "(HTTP /v1/detect, score_threshold 0.001, 100 detections) "
                                   "and/or run the built ONNX file directly; print AP, AP50, "
                                   "AP75, APs/m/l per source and write them as JSON.")
    e.add_argument("--dataset", type=Path, required=True,
                   help="data set folder: COCO's layout (annotations/instances_SPLIT.json, "
                        "SPLIT/), or instances.json beside images/")
    e.add_argument("--split", default="val")
    e.add_argument("--url", help="gateway base URL, e.g. http://127.0.0.1:8080")
    target = e.add_mutually_exclusive_group()
    target.add_argument("--tier", help="send requests to this tier")
    target.add_argument("--model", help="pin requests to this model")
    e.add_argument("--onnx", type=Path, help="also evaluate this built ONNX file directly")
    e.add_argument("--card", type=Path, action="append", metavar="FILE",
                   help="the model card of a --onnx file built from a card (repeatable)")
    e.add_argument("--limit", type=int, default=None, help="first N images only")
    e.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    e.add_argument("--out", type=Path, help="results JSON (default HOME/eval/results.json)")
    e.add_argument("--append", action="store_true", help="add to the results file")
    e.add_argument("--calibrate", action="store_true",
                   help="instead: fit the --onnx model's score calibration on the split "
                        "(each score's precision at IoU 0.5) and print it for its card")
    e.set_defaults(func=cmd_eval)
