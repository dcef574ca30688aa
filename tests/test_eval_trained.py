"""The shipped tierdet-trained weights keep their accuracy through the real stack.

For each checkpoint in weights/: regenerate its synthetic val split from
the recorded seed (a split does not depend on the size of the others),
build the ONNX with the exporter, serve it with tritonserver + gateway,
and check the gateway's AP against the AP recorded at training time and
against the bare ONNX model's; and check that the AP its sidecar records
travels through the build into the router's table. One stack serves every
shipped model (a split is generated once per manifest): about half a minute
per model, so CI runs it: it is the proof that the serving path keeps a
trained model's accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tierdet.build.models import BuiltModel
from tierdet.registry.specs import SPECS
from tierdet.registry.trained import CHECKPOINTS, sidecar_ap
from tierdet.training.datasets.synthetic import SynthConfig, generate
from tierdet.training.evaluation import run_evaluation
from tierdet.training.stack_eval import build_checkpoints, serve

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = sorted(WEIGHTS.glob("*.fp16.pt"))


@dataclass(frozen=True)
class Served:
    url: str
    built: dict[str, BuiltModel]  # by checkpoint file name
    data: dict[str, Path]  # each checkpoint's regenerated split, by file name


def _meta(checkpoint: Path) -> dict:
    return json.loads(checkpoint.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every shipped checkpoint built and served by one Triton + gateway (a stack
    start and a split generation per model saved); each test evaluates its own."""
    root = tmp_path_factory.mktemp("eval-trained")
    splits: dict[str, Path] = {}  # by manifest: the checkpoints share their val split
    data: dict[str, Path] = {}
    for checkpoint in SHIPPED:
        manifest = _meta(checkpoint)["dataset"]["manifest"]
        key = json.dumps([manifest["config"], manifest["seed"], manifest["splits"]["val"]])
        if key not in splits:
            splits[key] = generate(root / f"data{len(splits)}", {"val": manifest["splits"]["val"]},
                                   SynthConfig(**manifest["config"]), manifest["seed"])
        data[checkpoint.name] = splits[key]
    built = build_checkpoints({_meta(c)["model"]: c for c in SHIPPED}, root / "home")
    with serve(built, root / "home", root) as url:
        yield Served(url, {c.name: b for c, b in zip(SHIPPED, built, strict=True)}, data)


def test_every_trained_model_ships_with_its_measured_ap():
    assert sorted(CHECKPOINTS.values()) == [f"weights/{p.name}" for p in SHIPPED]
    for name, path in CHECKPOINTS.items():
        meta = json.loads((WEIGHTS.parent / path).with_suffix(".json").read_text())
        (gateway,) = [r for r in meta["serving_eval"]["records"]
                      if r["source"] == "gateway" and not r["tier"]]
        measured = sidecar_ap(WEIGHTS.parent / path)
        assert measured is not None and measured.ap == gateway["ap"] > 0.5
        # Measured on the split the checkpoint was trained for (the generator's label).
        manifest = meta["dataset"]["manifest"]
        assert measured.dataset.startswith(
            f"{manifest['label_set']}-v{manifest['version']}-seed{manifest['seed']}:")
        # Nothing is published for these: the registry must not claim a COCO figure.
        assert SPECS[name].published_ap is None


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_keep_their_ap_through_the_gateway(checkpoint: Path, served: Served):
    meta = _meta(checkpoint)
    built = served.built[checkpoint.name]
    recorded = sidecar_ap(checkpoint)
    assert recorded is not None
    assert built.spec.name == meta["model"]
    assert built.provenance["measured_ap"] == f"{recorded.ap:.4f}"
    models = httpx.get(served.url + "/v1/models").json()["models"]
    (info,) = [m for m in models if m["name"] == built.spec.name]
    gateway, onnx = run_evaluation(served.data[checkpoint.name], url=served.url,
                                   model=built.spec.name, onnx=built.onnx)
    # The router ranks the model by the AP its weights measured, in percent.
    assert info["routing_ap"] == round(100 * recorded.ap, 1)
    assert info["measured_ap"][recorded.dataset] == pytest.approx(recorded.ap)
    assert info["published_coco_ap"] is None
    assert gateway.source == "gateway" and onnx.source == "onnx"
    assert gateway.model == onnx.model == meta["model"]
    # The checkpoint is fp16 and Triton may batch requests: allow rounding.
    assert abs(gateway.ap - meta["val_ap"]["ap"]) <= 0.01
    assert abs(gateway.ap - onnx.ap) <= 0.01
    assert gateway.ap >= 0.5 and gateway.missed == {}
