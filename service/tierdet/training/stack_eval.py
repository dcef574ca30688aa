"""Measure tierdet-trained checkpoints through the real serving stack.

Builds each checkpoint with the exporter (as ``tierdet build`` does), starts
tritonserver and a gateway on loopback, and runs :func:`run_evaluation`
through the gateway and on the bare ONNX file.

    python -m tierdet.training.stack_eval --data DIR --out results.json \\
        damoyolo-ns-shapes=weights/damoyolo-ns-shapes.fp16.pt
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tierdet.build.models import BuiltModel, build_model, default_home
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import running_stack
from tierdet.registry.accuracy import EvalRecord, EvalReport
from tierdet.registry.trained import sidecar_path, trained_spec
from tierdet.training.evaluation import format_table, run_evaluation


def build_checkpoints(checkpoints: Mapping[str, Path], home: Path) -> list[BuiltModel]:
    return [build_model(trained_spec(name), WeightsSource.parse(str(path)), home,
                        progress=False) for name, path in checkpoints.items()]


@contextmanager
def serve(built: list[BuiltModel], home: Path, workdir: Path, threads: int = 2
          ) -> Iterator[str]:
    """Triton + gateway serving ``built``; yields the gateway's HTTP URL."""
    with running_stack(built, home, workdir, threads=threads,
                       models=",".join(b.spec.name for b in built)) as (_, gateway):
        yield gateway.http


def evaluate_checkpoints(checkpoints: Mapping[str, Path], data: Path, home: Path,
                         split: str = "val", limit: int | None = None,
                         tiers: Sequence[str] = ()) -> list[EvalRecord]:
    """Per model: gateway (pinned) and bare ONNX; then per tier: the router's pick."""
    built = build_checkpoints(checkpoints, home)
    records: list[EvalRecord] = []
    with tempfile.TemporaryDirectory(prefix="tierdet-acc-") as tmp, \
            serve(built, home, Path(tmp)) as url:
        for model in built:
            records += run_evaluation(data, split, url=url, model=model.spec.name,
                                      onnx=model.onnx, limit=limit)
        for tier in tiers:
            records += run_evaluation(data, split, url=url, tier=tier, limit=limit)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="MODEL=CHECKPOINT")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int)
    p.add_argument("--tier", action="append", default=[],
                   help="also evaluate this tier (the router picks among the models)")
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", action="store_true",
                   help="also write the results into each checkpoint's JSON sidecar")
    args = p.parse_args(argv)
    checkpoints = {name: Path(path) for name, _, path in
                   (c.partition("=") for c in args.checkpoints)}
    records = evaluate_checkpoints(checkpoints, args.data, args.home, args.split,
                                   args.limit, args.tier)
    print(format_table(records))
    EvalReport(records).save(args.out)
    print(f"results: {args.out}")
    if args.record:
        command = shlex.join(["python", "-m", "tierdet.training.stack_eval", *sys.argv[1:]])
        for name, path in checkpoints.items():
            record_in_sidecar(path, [r for r in records if r.model == name and not r.tier],
                              command)
    return 0


def record_in_sidecar(checkpoint: Path, records: list[EvalRecord], command: str) -> None:
    """Add the serving-path AP to the checkpoint's training sidecar."""
    side = sidecar_path(checkpoint)
    meta = json.loads(side.read_text())
    meta["serving_eval"] = {"command": command, "records": [asdict(r) for r in records]}
    side.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
