"""Training on the synthetic set: DAMO-YOLO losses, the loss falls for both
families, reproducibility, and checkpoints the exporter loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tierdet.build.damoyolo import build_damoyolo
from tierdet.build.damoyolo.loss import (
    assign,
    box_iou,
    distribution_focal_loss,
    giou_loss,
    head_outputs,
)
from tierdet.registry.trained import trained_spec
from tierdet.training.datasets.coco import CocoSplit
from tierdet.training.datasets.synthetic import SynthConfig, generate
from tierdet.training.train import (
    MODEL_FOR_FAMILY,
    Hyper,
    TrainConfig,
    load_items,
    make_batch,
    make_trainer,
    normalise,
    train,
)

SIZE = 128  # smoke tests run at half the shipped input size


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return generate(root, {"train": 8, "val": 2}, SynthConfig(size=SIZE), seed=3)


def test_head_outputs_decode_exactly_as_the_served_head():
    torch.manual_seed(0)
    model = build_damoyolo("ns", 6).eval()
    x = torch.rand(2, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        scores, boxes = model(x)
        out = head_outputs(model.head, model.neck(model.backbone(x)))
    torch.testing.assert_close(out.cls_logits.sigmoid(), scores)
    torch.testing.assert_close(out.boxes(model.head.integral.project), boxes)


def test_assigner_picks_points_near_the_centre_of_each_box():
    points = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0),
                                        indexing="xy"), -1).reshape(-1, 2) * 8
    strides = torch.full((points.shape[0],), 8.0)
    gt = torch.tensor([[20.0, 20.0, 60.0, 50.0], [80.0, 70.0, 120.0, 120.0]])
    # Predictions: every point predicts the first box, slightly shrunk.
    boxes = torch.tensor([[22.0, 22.0, 58.0, 48.0]]).expand(points.shape[0], 4)
    scores = torch.full((points.shape[0], 6), 0.01)
    a = assign(scores, boxes, points, strides, gt, torch.tensor([0, 3]))
    assert a.positives.numel() >= 1
    assert set(a.gt_index.tolist()) == {0, 1}  # every ground truth gets a point
    chosen = points[a.positives]
    own = gt[a.gt_index]
    centre = (own[:, :2] + own[:, 2:]) / 2
    assert ((chosen - centre).abs() < 2.5 * 8).all()
    torch.testing.assert_close(a.iou, box_iou(boxes[a.positives], own).diagonal())


def test_box_losses_vanish_on_a_perfect_prediction():
    box = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    assert giou_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    assert giou_loss(box, box + 100).item() > 1.0  # disjoint: GIoU < 0
    peaked = torch.full((1, 8), -20.0)
    peaked[0, 3] = 20.0
    assert distribution_focal_loss(peaked, torch.tensor([3.0])).item() < 1e-6
    assert distribution_focal_loss(peaked, torch.tensor([5.0])).item() > 10


def _config(data: Path, out: Path, family: str, steps: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(family=family, data=data, out=out, minutes=10, seed=seed, steps=steps,
                       hyper=Hyper(batch_size=4, lr=2e-3, weight_decay=1e-2, warmup_steps=3,
                                   ema_decay=0.9),
                       eval_every_min=100, input_size=SIZE, threads=2)


@pytest.mark.parametrize(("family", "steps"), [("damoyolo", 25), ("efficientdet", 15)])
def test_the_loss_falls_when_fitting_one_batch(data: Path, family: str, steps: int):
    # DAMO-YOLO's box losses are weighted by the class scores, so its total
    # first rises while the scores do (about 5 steps here), then falls.
    torch.manual_seed(0)
    spec = trained_spec(MODEL_FOR_FAMILY[family])
    trainer = make_trainer(family, spec, SIZE)
    model = trainer.build().train()
    items = load_items(CocoSplit(data, "train").samples(spec.labels, 2))
    images, targets = make_batch(items, np.random.default_rng(0), spec, SIZE)
    x = normalise(images, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = trainer.loss(model, x, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("family", ["damoyolo", "efficientdet"])
def test_train_saves_an_fp16_checkpoint_the_exporter_loads(data: Path, tmp_path: Path,
                                                           family: str):
    from tierdet.build.export.onnx_export import load_network

    steps: list[dict[str, float]] = []
    cfg = _config(data, tmp_path / f"{family}.pt", family, steps=3)
    result = train(cfg, on_step=lambda _, parts: steps.append(parts))
    assert len(steps) == result.steps == 3 and all(s["loss"] > 0 for s in steps)
    state = torch.load(result.checkpoint, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    meta = json.loads(result.sidecar.read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and meta["steps"] == 3
    assert meta["schedule"] == "steps" and meta["curve"][-1]["step"] == 3
    assert 0 <= meta["val_ap"]["ap"] <= 1 and meta["dataset"]["manifest"]["seed"] == 3
    # The exporter's own loader takes it, strictly: the class count and input
    # size come from the spec, the keys are the family's usual ones.
    network = load_network(cfg.spec, result.checkpoint, seed=0, input_size=SIZE)
    with torch.no_grad():
        boxes, scores = network.module(torch.zeros(1, 3, SIZE, SIZE))
    assert scores.shape[-1] == 6 and boxes.shape[-1] == 4


def test_same_seed_and_steps_give_the_same_weights(data: Path, tmp_path: Path):
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        result = train(_config(data, tmp_path / name, "damoyolo", steps=3, seed=seed))
        return torch.load(result.checkpoint, weights_only=True)

    a, b, c = weights("a.pt", 0), weights("b.pt", 0), weights("c.pt", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
