"""``tierdet train``: seeded, time-bounded CPU training of the small models.

Trains ``efficientdet-d0-shapes`` (effdet's tf_efficientdet_d0 through its
own DetBenchTrain: anchor labeler, focal + Huber loss) or
``damoyolo-ns-shapes`` (our DAMO-YOLO-Ns with the losses of
:mod:`tierdet.build.damoyolo.loss`) on a COCO-format data set such as
``tierdet dataset synth`` writes, and saves what ``tierdet build`` loads:
an fp16 state_dict of the EMA weights plus a JSON sidecar (command, seed,
budget, hyper-parameters, the val AP curve).

Why it is built this way:

* Inputs go through :func:`tierdet.serving.imaging.prepare` with the spec's
  preprocessing (letterbox + ImageNet normalisation for EfficientDet, stretch
  + raw pixels for DAMO-YOLO), i.e. exactly what the gateway sends Triton.
* The curve's AP is computed by running the EMA model wrapped in the
  exporter's own detection head (top-k, NMS, top-100) eagerly, so it is the
  AP the built ONNX model should reproduce.
* The learning-rate schedule (warm-up, then cosine to 5%) runs on the clock
  by default: whatever the machine's speed, the budget ends annealed. The
  sidecar records the steps taken; ``--steps N`` replays a schedule of
  exactly N steps, which with the same seed, data and thread count repeats
  the run step for step (evaluation never touches the training RNG).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol, cast

import numpy as np
import torch
from torch import nn

from tierdet.build.export.network import Network
from tierdet.registry.accuracy import APResult
from tierdet.registry.specs import ModelSpec
from tierdet.registry.trained import DAMOYOLO_SHAPES, EFFDET_SHAPES, sidecar_path, trained_spec
from tierdet.serving import imaging
from tierdet.training.datasets.coco import CocoSplit, Sample, read_rgb
from tierdet.training.evaluation import coco_ap, predict_rows, subset_gt

log = logging.getLogger("tierdet.training.train")

FamilyName = Literal["efficientdet", "damoyolo"]
MODEL_FOR_FAMILY: dict[str, str] = {"efficientdet": EFFDET_SHAPES, "damoyolo": DAMOYOLO_SHAPES}
MIN_LR_FRAC = 0.05
GRAD_CLIP = 10.0


@dataclass(frozen=True)
class Hyper:
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    ema_decay: float


# Chosen by short runs on the synthetic shapes set (see weights/*.json).
DEFAULT_HYPER: dict[str, Hyper] = {
    "efficientdet": Hyper(batch_size=8, lr=3e-3, weight_decay=1e-2, warmup_steps=200,
                          ema_decay=0.998),
    "damoyolo": Hyper(batch_size=16, lr=3e-3, weight_decay=1e-2, warmup_steps=200,
                      ema_decay=0.998),
}


@dataclass(frozen=True)
class TrainConfig:
    family: FamilyName
    data: Path
    out: Path
    minutes: float
    seed: int = 0
    hyper: Hyper | None = None  # None: DEFAULT_HYPER[family]
    steps: int | None = None  # None: schedule by the clock (see the module doc)
    eval_every_min: float = 5.0
    eval_images: int | None = None  # None: the whole val split
    train_images: int | None = None  # None: the whole train split
    input_size: int | None = None  # None: the spec's
    threads: int = 2
    command: str = ""

    @property
    def spec(self) -> ModelSpec:
        return trained_spec(MODEL_FOR_FAMILY[self.family])

    @property
    def size(self) -> int:
        return self.input_size or self.spec.input_size

    @property
    def hp(self) -> Hyper:
        return self.hyper or DEFAULT_HYPER[self.family]


@dataclass(frozen=True)
class CurvePoint:
    minutes: float  # training time so far (evaluations excluded)
    step: int
    epoch: float
    loss: float  # mean training loss since the previous point
    ap: float
    ap50: float
    ap75: float


@dataclass
class TrainResult:
    checkpoint: Path
    sidecar: Path
    steps: int
    final: APResult
    curve: list[CurvePoint] = field(default_factory=list)


# -- data ---------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    image: np.ndarray  # RGB uint8, original size
    boxes: np.ndarray  # [N, 4] float32 xyxy, image pixels
    slots: np.ndarray  # [N] int64


def load_items(samples: list[Sample]) -> list[Item]:
    # Images without objects teach nothing to effdet's labeler and break it.
    return [Item(read_rgb(s.path), s.boxes, s.slots) for s in samples if len(s.slots)]


def dihedral(image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 flips/transposes, the same for the image and its boxes.
    Every shape class is closed under them, so labels stay true."""
    boxes = boxes.copy()
    if rng.random() < 0.5:  # transpose: (x, y) -> (y, x)
        image = image.transpose(1, 0, 2)
        boxes = boxes[:, [1, 0, 3, 2]]
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        image = image[:, ::-1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        image = image[::-1]
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return np.ascontiguousarray(image), boxes


Targets = list[tuple[torch.Tensor, torch.Tensor]]  # (boxes xyxy input px, slots)


def make_batch(items: list[Item], rng: np.random.Generator, spec: ModelSpec, size: int
               ) -> tuple[torch.Tensor, Targets]:
    """uint8 NHWC model inputs (as the gateway prepares them) and targets."""
    tensors, targets = [], []
    for item in items:
        image, boxes = dihedral(item.image, item.boxes, rng)
        tensor, geometry = imaging.prepare(image, size, spec.preprocessing)
        scale = np.array([geometry.scale_x, geometry.scale_y] * 2, np.float32)
        tensors.append(tensor)
        targets.append((torch.from_numpy(boxes * scale), torch.from_numpy(item.slots)))
    return torch.from_numpy(np.stack(tensors)), targets


def normalise(images: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, the same arithmetic as the ONNX graph's front."""
    mean = torch.tensor(spec.preprocessing.mean).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(spec.preprocessing.std).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() - mean) * inv_std


# -- families -----------------------------------------------------------------


class Trainer(Protocol):
    def build(self) -> nn.Module: ...

    def loss(self, model: nn.Module, x: torch.Tensor, targets: Targets
             ) -> dict[str, torch.Tensor]: ...

    def network(self, model: nn.Module) -> Network: ...


@dataclass
class EfficientDetTrainer:
    """effdet's EfficientDet + DetBenchTrain (anchor labeler, focal/Huber loss)."""

    spec: ModelSpec
    size: int
    bench: nn.Module | None = None

    def build(self) -> nn.Module:
        from effdet import DetBenchTrain, get_efficientdet_config
        from effdet.factory import create_model_from_config

        config = get_efficientdet_config(self.spec.arch)
        # Drop-path only slows a short run from scratch; it has no weights,
        # so the checkpoint loads into the stock architecture.
        config.backbone_args = {**config.backbone_args, "drop_path_rate": 0.0}
        model = create_model_from_config(config, num_classes=self.spec.labels.num_classes,
                                         image_size=(self.size, self.size),
                                         pretrained_backbone=False)
        self.bench = DetBenchTrain(model, create_labeler=True)
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, targets: Targets
             ) -> dict[str, torch.Tensor]:
        assert self.bench is not None and self.bench.model is model
        # effdet wants yxyx boxes and 1-based classes (-1 pads).
        boxes = [b[:, [1, 0, 3, 2]] for b, _ in targets]
        classes = [(s + 1).float() for _, s in targets]
        out = self.bench(x, {"bbox": boxes, "cls": classes})
        return {"loss": out["loss"], "cls": out["class_loss"].detach(),
                "box": out["box_loss"].detach()}

    def network(self, model: nn.Module) -> Network:
        from tierdet.build.export.efficientdet import EfficientDetNetwork

        return Network(EfficientDetNetwork(model).eval(), scores_are_logits=True)


@dataclass
class DamoYoloTrainer:
    spec: ModelSpec
    size: int

    def build(self) -> nn.Module:
        from tierdet.build.damoyolo import build_damoyolo
        from tierdet.build.damoyolo.loss import init_head_

        model = build_damoyolo(self.spec.arch, self.spec.labels.num_classes)
        init_head_(model.head)
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, targets: Targets
             ) -> dict[str, torch.Tensor]:
        from tierdet.build.damoyolo import DamoYolo
        from tierdet.build.damoyolo.loss import damoyolo_loss, head_outputs

        damo = cast(DamoYolo, model)  # what make_model built
        out = head_outputs(damo.head, damo.neck(damo.backbone(x)))
        return damoyolo_loss(out, damo.head.integral.project, targets)

    def network(self, model: nn.Module) -> Network:
        from tierdet.build.damoyolo import DamoYolo
        from tierdet.build.export.damoyolo import DamoYoloNetwork

        return Network(DamoYoloNetwork(cast(DamoYolo, model)).eval(), scores_are_logits=False)


def make_trainer(family: FamilyName, spec: ModelSpec, size: int) -> Trainer:
    if family == "efficientdet":
        return EfficientDetTrainer(spec, size)
    if family == "damoyolo":
        return DamoYoloTrainer(spec, size)
    raise ValueError(f"unknown family {family!r}")


# -- optimisation -------------------------------------------------------------


class Ema:
    """Exponential moving average of weights (and copied buffers), warmed up
    as timm does so early steps are not frozen in."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, cur in zip(self.module.state_dict().values(), model.state_dict().values(),
                            strict=True):
            if ema.dtype.is_floating_point:
                ema.mul_(d).add_(cur.detach(), alpha=1 - d)
            else:
                ema.copy_(cur)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms and biases (1-D tensors): decaying them only hurts."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, hp: Hyper) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from lr to 5% of it."""
    warm = min(1.0, (step + 1) / hp.warmup_steps)
    cosine = MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * min(progress, 1)))
    return hp.lr * warm * cosine


# -- evaluation during training -----------------------------------------------


@torch.no_grad()
def evaluate_model(trainer: Trainer, model: nn.Module, spec: ModelSpec, size: int,
                   samples: list[Sample], gt: dict) -> APResult:
    """AP of ``model`` behind the exporter's own detection head, run eagerly."""
    from tierdet.build.export.onnx_export import wrap_for_export

    network = trainer.network(model)
    probe = network.module(torch.zeros(1, 3, size, size))[1]
    # Tiny test inputs have fewer (anchor, class) pairs than the spec's top-k.
    spec = dataclasses.replace(spec, pre_nms_top_k=min(spec.pre_nms_top_k,
                                                       probe.shape[1] * probe.shape[2]))
    wrapper = wrap_for_export(spec, network)

    def run(batch: np.ndarray) -> np.ndarray:
        return wrapper(torch.from_numpy(batch)).numpy()

    return coco_ap(gt, predict_rows(run, samples, spec, input_size=size))


# -- the loop -----------------------------------------------------------------


@dataclass
class _Clock:
    """Training time, paused while evaluating."""

    budget_s: float
    spent_s: float = 0.0
    _since: float = field(default_factory=time.perf_counter)

    def pause(self) -> None:
        self.spent_s += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    @property
    def now_s(self) -> float:
        return self.spent_s + time.perf_counter() - self._since


@dataclass
class _Run:
    """The state of one training run, stepped by :func:`train`."""

    cfg: TrainConfig
    trainer: Trainer
    model: nn.Module
    ema: Ema
    optimizer: torch.optim.Optimizer
    items: list[Item]
    val_samples: list[Sample]
    val_gt: dict
    rng: np.random.Generator
    clock: _Clock
    step: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    curve: list[CurvePoint] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, cfg: TrainConfig) -> _Run:
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # before build: the initial weights draw from it
        rng = np.random.default_rng(cfg.seed)  # shuffling and augmentation
        spec = cfg.spec
        items = load_items(CocoSplit(cfg.data, "train").samples(spec.labels, cfg.train_images))
        val = CocoSplit(cfg.data, "val")
        val_samples = val.samples(spec.labels, cfg.eval_images)
        val_gt = subset_gt(val.coco, {s.image_id for s in val_samples})
        trainer = make_trainer(cfg.family, spec, cfg.size)
        model = trainer.build().train()
        optimizer = torch.optim.AdamW(param_groups(model, cfg.hp.weight_decay), lr=cfg.hp.lr)
        return cls(cfg, trainer, model, Ema(model, cfg.hp.ema_decay), optimizer, items,
                   val_samples, val_gt, rng, _Clock(cfg.minutes * 60))

    @property
    def progress(self) -> float:
        if self.cfg.steps is not None:
            return self.step / self.cfg.steps
        return self.clock.now_s / self.clock.budget_s

    @property
    def done(self) -> bool:
        return self.progress >= 1 or self.clock.now_s >= self.clock.budget_s

    def _next_items(self) -> list[Item]:
        batch_size = self.cfg.hp.batch_size
        if len(self.order) < batch_size:  # epochs run on without a ragged last batch
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.items))])
        batch, self.order = self.order[:batch_size], self.order[batch_size:]
        return [self.items[i] for i in batch]

    def train_step(self) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.progress, self.cfg.hp)
        items = self._next_items()
        images, targets = make_batch(items, self.rng, self.cfg.spec, self.cfg.size)
        losses = self.trainer.loss(self.model, normalise(images, self.cfg.spec), targets)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        self.seen += len(items)
        parts = {k: float(v.detach()) for k, v in losses.items()}
        self.loss_sum += parts["loss"]
        self.loss_n += 1
        return parts

    def log_step(self, parts: dict[str, float]) -> None:
        log.info("step %d epoch %.2f loss %.4f (%s) lr %.2e %.1f img/s", self.step,
                 self.seen / len(self.items), self.loss_sum / self.loss_n,
                 " ".join(f"{k} {v:.3f}" for k, v in parts.items() if k != "loss"),
                 self.optimizer.param_groups[0]["lr"], self.seen / max(self.clock.now_s, 1e-9))

    def evaluate(self) -> tuple[CurvePoint, APResult]:
        """An AP point of the EMA weights; the clock stops meanwhile."""
        self.clock.pause()
        cfg = self.cfg
        result = evaluate_model(self.trainer, self.ema.module, cfg.spec, cfg.size,
                                self.val_samples, self.val_gt)
        point = CurvePoint(round(self.clock.spent_s / 60, 2), self.step,
                           round(self.seen / len(self.items), 2),
                           round(self.loss_sum / max(self.loss_n, 1), 4), result.ap,
                           result.ap50, result.ap75)
        self.curve.append(point)
        self.loss_sum, self.loss_n = 0.0, 0
        log.info("eval %s", json.dumps(asdict(point)))
        self.save(result, final=False)  # a stopped run still leaves its best record
        self.clock.resume()
        return point, result

    def save(self, result: APResult, final: bool) -> tuple[Path, Path]:
        return _save(self.cfg, self.ema.module, self.curve, self.step, self.seen,
                     time.time() - self.started, result, final)


def train(cfg: TrainConfig, on_point: Callable[[CurvePoint], None] | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train, evaluating every ``eval_every_min`` and at the end; ``on_point``
    sees each AP point, ``on_step`` each step's losses (tests use it)."""
    run = _Run.start(cfg)
    log.info("training %s (%s) at %d px on %d images, %.1f min budget, seed %d",
             cfg.spec.name, cfg.spec.arch, cfg.size, len(run.items), cfg.minutes, cfg.seed)
    next_eval_s = cfg.eval_every_min * 60
    result: APResult | None = None
    while not run.done:
        parts = run.train_step()
        if on_step:
            on_step(run.step, parts)
        if run.step % 25 == 0:
            run.log_step(parts)
        if run.clock.now_s >= next_eval_s:
            point, result = run.evaluate()
            next_eval_s += cfg.eval_every_min * 60
            if on_point:
                on_point(point)
    if cfg.steps is not None and run.step < cfg.steps:
        log.warning("the %.1f min budget ended after %d of %d steps", cfg.minutes, run.step,
                    cfg.steps)
    if result is None or run.curve[-1].step != run.step:
        point, result = run.evaluate()
        if on_point:
            on_point(point)
    ckpt, sidecar = run.save(result, final=True)
    return TrainResult(ckpt, sidecar, run.step, result, run.curve)


# -- saving -------------------------------------------------------------------


def fp16_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating tensors as fp16 (half the bytes; loads into fp32 models as is)."""
    return {k: (v.detach().half() if v.dtype.is_floating_point else v.detach()).clone()
            for k, v in model.state_dict().items()}


def _save(cfg: TrainConfig, model: nn.Module, curve: list[CurvePoint], step: int, seen: int,
          wall_s: float, result: APResult, final: bool) -> tuple[Path, Path]:
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.with_name(cfg.out.name + ".tmp")
    torch.save(fp16_state_dict(model), tmp)
    tmp.replace(cfg.out)
    manifest = cfg.data / "dataset.json"
    meta = {
        "model": cfg.spec.name, "arch": cfg.spec.arch, "family": cfg.family,
        "input_size": cfg.size, "labels": cfg.spec.labels.name,
        "status": "finished" if final else "running",
        "command": cfg.command, "seed": cfg.seed, "minutes": cfg.minutes,
        "steps": step, "schedule": "steps" if cfg.steps is not None else "clock",
        "images_seen": seen, "epochs": round(seen / max(1, _train_count(cfg)), 2),
        "wall_s": round(wall_s, 1), "threads": cfg.threads, "hyper": asdict(cfg.hp),
        "dataset": {"path": str(cfg.data), "manifest": json.loads(manifest.read_text())
                    if manifest.is_file() else None,
                    "train_images": cfg.train_images, "eval_images": cfg.eval_images},
        "val_ap": asdict(result),
        "curve": [asdict(p) for p in curve],
        "checkpoint_sha256": hashlib.sha256(cfg.out.read_bytes()).hexdigest(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    side = sidecar_path(cfg.out)
    side.write_text(json.dumps(meta, indent=2) + "\n")
    return cfg.out, side


def _train_count(cfg: TrainConfig) -> int:
    return len(CocoSplit(cfg.data, "train").coco["images"][:cfg.train_images])
