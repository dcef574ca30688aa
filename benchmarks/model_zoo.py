"""Model zoo table: parameters, ONNX size and CPU latency of every model.

Builds what is missing (``tierdet build`` semantics, random weights by
default: latency does not depend on the weights), then times each ONNX file
with ONNX Runtime on one real photo prepared as the gateway prepares it,
batch 1. Prints a Markdown table; with ``--record`` writes the figures to
docs/model-zoo.json, from which `tierdet generate` renders the model zoo
table of docs/performance.md (the registry gives the other columns).

    python benchmarks/model_zoo.py --record              # all 15 models
    python benchmarks/model_zoo.py --models efficientdet-d0,damoyolo-t --runs 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tierdet.build.models import (
    BuiltModel,
    build_model,
    default_home,
    format_is_current,
    load_built,
)
from tierdet.build.weights import WeightsSource
from tierdet.registry.specs import SPECS, ZOO, ModelSpec


@dataclass(frozen=True)
class Row:
    spec: ModelSpec
    params: int
    onnx_mb: float
    median_ms: float
    p90_ms: float
    runs: int


def photo() -> np.ndarray:
    """scikit-image's astronaut (512x512 RGB): real content, so NMS does real work."""
    import skimage.data

    return skimage.data.astronaut()


def built(spec: ModelSpec, home: Path, weights: WeightsSource) -> BuiltModel:
    model = load_built(home, spec.name)
    # Any weights do (latency does not depend on them); builds from before the
    # parameter count was recorded, or of another export format, are rebuilt.
    if (model is None or "params" not in model.provenance
            or not format_is_current(model.provenance)):
        model = build_model(spec, weights, home, progress=False)
    return model


def time_model(model: BuiltModel, runs: int, warmup: int, threads: int) -> list[float]:
    """Wall-clock milliseconds of ``runs`` single-image inferences."""
    import onnxruntime as ort
    from tierdet.serving import imaging

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model.onnx), options, providers=["CPUExecutionProvider"])
    spec = model.spec
    tensor, _ = imaging.prepare(photo(), spec.input_size, spec.preprocessing)
    feed = {"images": tensor[None]}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(spec: ModelSpec, home: Path, weights: WeightsSource, runs: int, warmup: int,
            threads: int) -> Row:
    model = built(spec, home, weights)
    times = time_model(model, runs, warmup, threads)
    return Row(spec, int(model.provenance["params"]), model.onnx.stat().st_size / 1e6,
               statistics.median(times), float(np.percentile(times, 90)), runs)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible"


def header(threads: int, runs: int) -> str:
    import onnxruntime as ort

    return (f"Measured {dt.date.today().isoformat()} on {machine()} with "
            f"`benchmarks/model_zoo.py`: ONNX Runtime {ort.__version__} CPU, "
            f"{threads} intra-op threads, batch 1, one photo (512x512) resized as the "
            f"gateway does, median and p90 of {runs} runs after warm-up; the whole graph "
            f"(normalise, network, decode, top-k, NMS).\n\n"
            "| model | input | params (M) | published COCO AP | ONNX (MB) | "
            "CPU median (ms) | CPU p90 (ms) |\n|---|---|---|---|---|---|---|")


def row_text(r: Row) -> str:
    return (f"| {r.spec.name} | {r.spec.input_size} | {r.params / 1e6:.2f} | "
            f"{r.spec.published_ap:.1f} | {r.onnx_mb:.1f} | {r.median_ms:.0f} | {r.p90_ms:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated names (default: all)")
    p.add_argument("--home", type=Path, default=default_home(),
                   help="where built models are found or built (default: TIERDET_HOME)")
    p.add_argument("--weights", default="random:0",
                   help="for models not built yet (default random:0)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", action="store_true",
                   help="write the figures to docs/model-zoo.json (then run `tierdet generate`)")
    p.add_argument("--build-only", action="store_true",
                   help="build what is missing and stop (build first, time on a quiet machine)")
    args = p.parse_args(argv)
    if args.runs < 10:
        p.error("--runs must be at least 10 (the table reports medians of >= 10)")
    names = args.models.split(",") if args.models else list(ZOO)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    weights = WeightsSource.parse(args.weights)
    if args.build_only:
        for name in names:
            model = built(SPECS[name], args.home, weights)
            print(f"{name}: {model.onnx}", flush=True)
        return 0
    print(header(args.threads, args.runs), flush=True)
    rows = []
    for name in names:
        rows.append(measure(SPECS[name], args.home, weights, args.runs, args.warmup,
                            args.threads))
        print(row_text(rows[-1]), flush=True)
    if args.record:
        record(rows, args.threads, args.runs)
    return 0


def record(rows: list[Row], threads: int, runs: int) -> None:
    """Merge the figures into docs/model-zoo.json (what docs/performance.md's zoo table shows)."""
    import json

    import onnxruntime as ort

    path = Path(__file__).resolve().parents[1] / "docs" / "model-zoo.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    doc.update({"measured_on": dt.date.today().isoformat(), "machine": machine(),
                "onnxruntime": ort.__version__, "threads": threads, "runs": runs})
    for r in rows:
        doc["models"][r.spec.name] = {"params_m": round(r.params / 1e6, 2),
                                      "onnx_mb": round(r.onnx_mb, 1),
                                      "median_ms": round(r.median_ms),
                                      "p90_ms": round(r.p90_ms)}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"recorded in {path}; run `tierdet generate` to refresh docs/performance.md")


if __name__ == "__main__":
    sys.exit(main())
