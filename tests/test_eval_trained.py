"""The shipped tierdet-trained weights keep their accuracy through the real stack.

For each checkpoint in weights/: regenerate its synthetic val split from
the recorded seed (a split does not depend on the size of the others),
build the ONNX with the exporter, serve it with tritonserver + gateway,
and check the gateway's AP against the AP recorded at training time and
against the bare ONNX model's. About half a minute per model, so CI runs it:
it is the proof that the serving path keeps a trained model's accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tierdet.accuracy_stack import evaluate_checkpoints
from tierdet.datasets.synthetic import SynthConfig, generate
from tierdet.specs import SPECS
from tierdet.trained import CHECKPOINTS, MEASURED_AP

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = sorted(WEIGHTS.glob("*.fp16.pt"))


def test_every_trained_model_ships_with_its_measured_ap():
    assert sorted(CHECKPOINTS.values()) == [f"weights/{p.name}" for p in SHIPPED]
    for name, path in CHECKPOINTS.items():
        meta = json.loads((WEIGHTS.parent / path).with_suffix(".json").read_text())
        (gateway,) = [r for r in meta["serving_eval"]["records"] if r["source"] == "gateway"]
        # The router ranks by the spec's AP: it must be the one measured through the gateway.
        assert SPECS[name].coco_ap == MEASURED_AP[name] == round(100 * gateway["ap"], 1)


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_keep_their_ap_through_the_gateway(checkpoint: Path, tmp_path: Path):
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    manifest = meta["dataset"]["manifest"]
    config = SynthConfig(**manifest["config"])
    data = generate(tmp_path / "data", {"val": manifest["splits"]["val"]}, config,
                    manifest["seed"])
    gateway, onnx = evaluate_checkpoints({meta["model"]: checkpoint}, data, tmp_path / "home")
    assert gateway.source == "gateway" and onnx.source == "onnx"
    assert gateway.model == onnx.model == meta["model"]
    # The checkpoint is fp16 and Triton may batch requests: allow rounding.
    assert abs(gateway.ap - meta["val_ap"]["ap"]) <= 0.01
    assert abs(gateway.ap - onnx.ap) <= 0.01
    assert gateway.ap >= 0.5 and gateway.missed == {}
