"""``tierdet build``: spec + weights -> verified ONNX -> runnable Triton repository.

Layout under the home folder (``TIERDET_HOME``, default ~/.cache/tierdet):
  weights/<official file>         verified downloads
  onnx/<model>.onnx, .json        built models and their provenance
  repository/<target>/<model>/    what tritonserver loads
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tierdet import __version__
from tierdet.build.repository import Target, install_model
from tierdet.build.weights import WeightsSource, resolve_checkpoint, sha256_file
from tierdet.registry.profile import LatencyProfile, tuned_batching
from tierdet.registry.specs import ModelSpec, get_spec
from tierdet.registry.tensors import INPUT_NAME
from tierdet.registry.trained import sidecar_ap


@dataclass(frozen=True)
class BuiltModel:
    spec: ModelSpec
    onnx: Path
    provenance: dict[str, str]


def default_home() -> Path:
    """Where weights, built models and the runnable repository live (``TIERDET_HOME``)."""
    return Path(os.environ.get("TIERDET_HOME") or Path.home() / ".cache" / "tierdet")


def onnx_path(home: Path, name: str) -> Path:
    return home / "onnx" / f"{name}.onnx"


def load_built(home: Path, name: str) -> BuiltModel | None:
    path = onnx_path(home, name)
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    return BuiltModel(get_spec(name), path, json.loads(meta.read_text()))


def build_model(spec: ModelSpec, source: WeightsSource, home: Path,
                progress: bool = True) -> BuiltModel:
    """Export ``spec`` with ``source`` weights and check the result runs."""
    from tierdet.build.export.onnx_export import export_onnx, load_network

    # A context: on a failure the bar is closed (its line ended) before the error shows.
    with tqdm(total=4, desc=f"build {spec.name}", disable=not progress,
              bar_format="{desc}: {n}/{total} {postfix}") as steps:
        steps.set_postfix_str("weights")
        checkpoint = resolve_checkpoint(spec, source, home / "weights", progress=progress)
        steps.update()
        steps.set_postfix_str("network")
        network = load_network(spec, checkpoint, source.seed)
        steps.update()
        steps.set_postfix_str("export")
        provenance = {
            "weights": source.describe(),
            "weights_sha256": sha256_file(checkpoint) if checkpoint else "",
            "weights_digest_check": digest_check(spec, source),
            # Counted on the exported module (DAMO-YOLO: RepConvs fused), for the docs.
            "params": str(sum(p.numel() for p in network.module.parameters())),
            "built_with": f"tierdet {__version__}",
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **measured_provenance(checkpoint),
        }
        path = export_onnx(spec, network, onnx_path(home, spec.name), metadata=provenance)
        steps.update()
        steps.set_postfix_str("verify")
        verify_onnx(spec, path)
        provenance["onnx_sha256"] = sha256_file(path)
        path.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
        steps.update()
    return BuiltModel(spec, path, provenance)


def measured_provenance(checkpoint: Path | None) -> dict[str, str]:
    """The AP the checkpoint measured through the gateway (its sidecar), if any:
    it travels with the built model to the gateway, whose router ranks by it."""
    measured = sidecar_ap(checkpoint) if checkpoint is not None else None
    if measured is None:
        return {}
    return {"measured_ap": f"{measured.ap:.4f}", "measured_on": measured.dataset}


def digest_check(spec: ModelSpec, source: WeightsSource) -> str:
    """How strongly the checkpoint's bytes were checked against a published digest."""
    if source.kind != "official" or spec.official_weights is None:
        return "none (not an official download)"
    official = spec.official_weights
    return {"sha256": "sha256",
            "sha256-prefix": f"sha256 prefix ({len(official.sha256)} hex digits)",
            "none": "none (no digest published)"}[official.digest_kind]


def verify_onnx(spec: ModelSpec, path: Path) -> None:
    """The exported file loads in ONNX Runtime and answers a batch of 2."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = np.zeros((2, spec.input_size, spec.input_size, 3), np.uint8)
    out = session.run(None, {INPUT_NAME: batch})[0]
    if out.shape != (2, spec.max_detections, 6):
        raise RuntimeError(f"{path}: output shape {out.shape}, expected "
                           f"(2, {spec.max_detections}, 6)")


def ensure_built(names: Iterable[str], source: WeightsSource, home: Path,
                 rebuild: bool = False, progress: bool = True) -> list[BuiltModel]:
    built = []
    for name in names:
        existing = None if rebuild else load_built(home, name)
        # A build from other weights (say a random one, when official ones are
        # asked for) is not what the caller wants: build again.
        if existing is not None and existing.provenance.get("weights") != source.describe():
            existing = None
        built.append(existing or build_model(get_spec(name), source, home, progress))
    return built


def assemble(models: Iterable[BuiltModel], home: Path, target: Target = "cpu-local",
             intra_op_threads: int = 0, profile: LatencyProfile | None = None) -> Path:
    """Install built models into ``home/repository/<target>``; returns that folder.
    With a latency ``profile``, each model's queue delay is tuned from it."""
    repository = home / "repository" / target
    for model in models:
        measured = profile.models.get(model.spec.name) if profile else None
        install_model(repository, model.spec, target, model.onnx, model.provenance,
                      intra_op_threads, tuned_batching(model.spec.batching, measured))
    return repository
