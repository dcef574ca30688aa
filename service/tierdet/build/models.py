"""``tierdet build``: spec + weights -> verified ONNX -> runnable Triton repository.

Layout under the home folder (``TIERDET_HOME``, default ~/.cache/tierdet):
  weights/<official file>         verified downloads
  onnx/<model>.onnx, .json        built models and their build records (provenance)
  repository/<target>/<model>/    what tritonserver loads

A build record names the weights, the export format (``EXPORT_FORMAT``) and
when and by what it was built. A model is built again when its record names
other weights or another export format (or none): a fixed exporter reaches
volumes that already hold the old graphs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from tierdet import __version__
from tierdet.build.export import EXPORT_FORMAT
from tierdet.build.repository import Target, install_model
from tierdet.build.weights import WeightsSource, resolve_checkpoint
from tierdet.registry.cards import ModelCard, sha256_file
from tierdet.registry.profile import LatencyProfile, tuned_batching
from tierdet.registry.specs import Batching, ModelSpec, get_spec
from tierdet.registry.tensors import INPUT_NAME, MODEL_METADATA_KEY
from tierdet.registry.trained import sidecar_ap

log = logging.getLogger(__name__)

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
    provenance = json.loads(meta.read_text())
    spec = get_spec(name)
    if provenance.get("batching", "").startswith("max_batch_size 1"):  # a fixed-batch card
        spec = replace(spec, batching=Batching(max_batch_size=1, max_queue_delay_us=0))
    return BuiltModel(spec, path, provenance)


def build_stamp() -> dict[str, str]:
    """What every build record says about the build itself (models and cards alike)."""
    return {"export_format": str(EXPORT_FORMAT),
            "built_with": f"tierdet {__version__}",
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def format_is_current(provenance: dict[str, str]) -> bool:
    """The record was exported in this exporter's format (a record without one
    predates format 2)."""
    return provenance.get("export_format") == str(EXPORT_FORMAT)


def stale(existing: BuiltModel | None, source: WeightsSource) -> str | None:
    """Why ``existing`` is not the build ``source`` asks for (None: it is)."""
    if existing is None:
        return "not built"
    if not format_is_current(existing.provenance):
        recorded = existing.provenance.get("export_format", "none")
        return f"built in export format {recorded}, the exporter writes {EXPORT_FORMAT}"
    # A build from other weights (say a random one, when official ones are
    # asked for) is not what the caller wants.
    if existing.provenance.get("weights") != source.describe():
        return f"built from other weights ({existing.provenance.get('weights')})"
    return None


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
            **build_stamp(),
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


def build_card(card_path: Path, home: Path) -> list[BuiltModel]:
    """A model card's models (one per input size), built: a graph wrapped
    (``tierdet.build.cards``), or a zoo-family checkpoint exported like any zoo
    model with the card's classes."""
    from tierdet.registry.cards import register

    return [_build_card_model(card, card_path, home) for card in register(card_path)]


def _build_card_model(card: ModelCard, card_path: Path, home: Path) -> BuiltModel:
    from tierdet.build import cards
    from tierdet.registry.cards import CheckpointSource

    spec = get_spec(card.name)
    if isinstance(card.source, CheckpointSource):
        built = build_model(spec, WeightsSource("file", card.source.checkpoint), home,
                            progress=False)
        provenance = {**built.provenance, "card_sha256": sha256_file(card_path),
                      "licence": card.licence, "provenance": card.provenance}
        built.onnx.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
        return BuiltModel(spec, built.onnx, provenance)
    graph = cards.check_graph(card)
    spec = cards.spec_for_build(spec, graph)
    provenance = {**cards.card_provenance(card, card_path, graph), **build_stamp()}
    path = cards.save(cards.wrap(card, graph), onnx_path(home, spec.name),
                      {MODEL_METADATA_KEY: spec.name, **provenance})
    verify_onnx(spec, path, batch=2 if graph.batchable else 1)
    provenance["onnx_sha256"] = sha256_file(path)
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    return BuiltModel(spec, path, provenance)


def ensure_cards(card_paths: Iterable[Path], home: Path, rebuild: bool = False
                 ) -> list[BuiltModel]:
    """Each card's models: the ones built before if neither the card nor its file
    changed since and they were exported in the current format, else built now."""
    from tierdet.registry.cards import CheckpointSource, register

    built = []
    for card_path in card_paths:
        for card in register(card_path):
            existing = None if rebuild else load_built(home, card.name)
            source = card.source
            file = (source.checkpoint if isinstance(source, CheckpointSource)
                    else source.onnx)
            assert isinstance(file, Path)  # one file per expanded card
            if (existing is not None and file.is_file()
                    and format_is_current(existing.provenance)
                    and existing.provenance.get("card_sha256") == sha256_file(card_path)
                    and existing.provenance.get("weights_sha256") == sha256_file(file)):
                built.append(existing)
            else:
                built.append(_build_card_model(card, card_path, home))
    return built


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


def verify_onnx(spec: ModelSpec, path: Path, batch: int = 2) -> None:
    """The exported file loads in ONNX Runtime and answers a batch of ``batch``."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.zeros((batch, spec.input_size, spec.input_size, 3), np.uint8)
    out = session.run(None, {INPUT_NAME: images})[0]
    if out.shape != (batch, spec.max_detections, 6):
        raise RuntimeError(f"{path}: output shape {out.shape}, expected "
                           f"({batch}, {spec.max_detections}, 6)")


def ensure_built(names: Iterable[str], source: WeightsSource, home: Path,
                 rebuild: bool = False, progress: bool = True) -> list[BuiltModel]:
    """Each model as built before, unless that build is ``stale`` (or ``rebuild``)."""
    built = []
    for name in names:
        existing = None if rebuild else load_built(home, name)
        why = stale(existing, source)
        if why is None and existing is not None:
            built.append(existing)
            continue
        if existing is not None:
            log.info("%s: building again: %s", name, why)
        built.append(build_model(get_spec(name), source, home, progress))
    return built


def assemble(models: Iterable[BuiltModel], home: Path, target: Target = "cpu-local",
             intra_op_threads: int = 0, profile: LatencyProfile | None = None,
             new_version: bool = False) -> Path:
    """Install built models into ``home/repository/<target>``; returns that folder.
    With a latency ``profile``, each model's queue delay is tuned from it;
    ``new_version``: each as its next version (a model replaced while served)."""
    repository = home / "repository" / target
    for model in models:
        measured = profile.models.get(model.spec.name) if profile else None
        install_model(repository, model.spec, target, model.onnx, model.provenance,
                      intra_op_threads, tuned_batching(model.spec.batching, measured),
                      new_version)
    return repository
