"""COCO AP of a served model, measured two ways on the same images.

* ``gateway``: every image goes through the running service (HTTP
  ``/v1/detect``, multipart, ``score_threshold`` 0.001, ``max_detections`` 100):
  decode, routing, resize, Triton, box mapping, JSON. This is what clients get.
* ``onnx``: the built ONNX file run directly with ONNX Runtime, after the
  same :func:`tierdet.serving.imaging.prepare`, its rows mapped back to image pixels
  here (not with the gateway's code), so a loss anywhere in the serving path
  shows as a difference between the two.

AP numbers come from pycocotools (IoU .50:.95, max 100 detections per image)
and are fractions in 0..1; -1 means the split has no ground truth in that
size range. Results are written as an :class:`EvalReport` JSON file, the
schema the gateway can export as Prometheus gauges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tierdet.registry.accuracy import EvalRecord
from tierdet.registry.labels import LabelSet
from tierdet.registry.specs import ModelSpec, get_spec
from tierdet.registry.tensors import MODEL_METADATA_KEY
from tierdet.serving import imaging, scores
from tierdet.serving.apscore import coco_ap, matched_at_iou50
from tierdet.training.datasets.coco import CocoSplit, Sample, read_rgb

SCORE_THRESHOLD = 0.001  # COCO practice: rank everything, let AP weigh it
MAX_DETECTIONS = 100
RETRIES = 5  # per image, for answers that carry Retry-After


def rows_to_coco(rows: np.ndarray, geometry: imaging.Geometry, labels: LabelSet,
                 image_id: int, score_threshold: float = SCORE_THRESHOLD) -> list[dict]:
    """Model rows [K, 6] (x1 y1 x2 y2 score slot, input pixels) -> COCO results."""
    rows = rows[rows[:, 4] >= score_threshold]
    boxes = imaging.boxes_to_image(rows[:, :4], geometry)
    out = []
    for (x1, y1, x2, y2), row in zip(boxes, rows, strict=True):
        label = labels.lookup(int(row[5]))
        if label is None or x2 <= x1 or y2 <= y1:
            continue
        out.append({"image_id": image_id, "category_id": label[0], "score": float(row[4]),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    return out


def ground_truth_as_detections(gt: dict) -> list[dict]:
    """Every annotation as a detection of score 1: AP must come out 1.0."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": list(a["bbox"])} for a in gt["annotations"] if not a.get("iscrowd")]


# -- predictors ---------------------------------------------------------------

RowsFn = Callable[[np.ndarray], np.ndarray]  # uint8 [B, S, S, 3] -> rows [B, K, 6]


def predict_rows(run: RowsFn, samples: Iterable[Sample], spec: ModelSpec,
                 batch_size: int = 8, input_size: int | None = None,
                 calibrate: bool = True) -> list[dict]:
    """Detections of a bare model function over ``samples``, COCO results, scored
    as the gateway scores them (``calibrate``: through the spec's calibration)."""
    size = input_size or spec.input_size
    knots = spec.score_calibration if calibrate else ()
    out: list[dict] = []
    batch: list[tuple[int, np.ndarray, imaging.Geometry]] = []

    def flush() -> None:
        rows = scores.calibrated_rows(run(np.stack([tensor for _, tensor, _ in batch])), knots)
        for (image_id, _, geometry), image_rows in zip(batch, rows, strict=True):
            out.extend(rows_to_coco(image_rows, geometry, spec.labels, image_id))
        batch.clear()

    for sample in samples:
        tensor, geometry = imaging.prepare(read_rgb(sample.path), size, spec.preprocessing)
        batch.append((sample.image_id, tensor, geometry))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return out


def onnx_runner(path: Path, threads: int = 0) -> RowsFn:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Waiting threads sleep: an evaluation shares the cores with the stack it
    # compares against (or other jobs), where spinning ones took twice the time
    # (64 photographs, beside a load of 5: 6-7 s spinning, 3 s sleeping).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def onnx_model_name(path: Path) -> str:
    """The spec name the exporter wrote into the ONNX metadata."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    if MODEL_METADATA_KEY not in props:
        raise ValueError(f"{path}: no {MODEL_METADATA_KEY} metadata; not built by tierdet build")
    return props[MODEL_METADATA_KEY]


# Answers that are a verdict on the request's budget, not on the evaluation:
# the image counts as answered with nothing, as the user would have seen it.
MISSES = {(503, "sla_unattainable"), (504, "deadline_exceeded")}


@dataclass
class GatewayAnswers:
    detections: list[dict] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)  # model -> images it answered
    missed: dict[str, int] = field(default_factory=dict)  # error code -> images


def _error_code(resp) -> str | None:
    try:
        return resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def predict_gateway(url: str, samples: Sequence[Sample], model: str | None = None,
                    tier: str | None = None, concurrency: int = 4,
                    timeout_s: float = 120.0) -> GatewayAnswers:
    """Send every image to ``url``/v1/detect. A shed or late answer (MISSES,
    after the retries its Retry-After allows) counts as no detections; any
    other failure raises."""
    import httpx

    form = {"score_threshold": str(SCORE_THRESHOLD), "max_detections": str(MAX_DETECTIONS)}
    if model:
        form["model"] = model
    if tier:
        form["tier"] = tier
    answers = GatewayAnswers()
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        def one(sample: Sample) -> tuple[int, dict | str]:
            files = {"image": (sample.path.name, sample.path.read_bytes())}
            for _ in range(RETRIES):
                resp = client.post("/v1/detect", data=form, files=files)
                # Shed or not ready yet: the service says when to come back.
                if resp.status_code not in (429, 503):
                    break
                time.sleep(min(float(resp.headers.get("Retry-After", 1)), 5.0))
            if resp.status_code == 200:
                return sample.image_id, resp.json()
            code = _error_code(resp)
            if (resp.status_code, code) in MISSES:
                return sample.image_id, str(code)
            raise RuntimeError(f"{sample.path}: HTTP {resp.status_code}: {resp.text}")

        # A few requests in flight let Triton's dynamic batcher work as in production.
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for image_id, body in pool.map(one, samples):
                if isinstance(body, str):
                    answers.missed[body] = answers.missed.get(body, 0) + 1
                    continue
                answers.models[body["model"]] = answers.models.get(body["model"], 0) + 1
                answers.detections.extend(
                    {"image_id": image_id, "category_id": d["class_id"], "score": d["score"],
                     "bbox": [d["x1"], d["y1"], d["x2"] - d["x1"], d["y2"] - d["y1"]]}
                    for d in body["detections"])
    return answers


def run_evaluation(dataset: Path, split: str = "val", *, url: str | None = None,
                   model: str | None = None, tier: str | None = None,
                   onnx: Path | None = None, limit: int | None = None,
                   concurrency: int = 4) -> list[EvalRecord]:
    """Evaluate through the gateway at ``url`` and/or the bare ``onnx`` file,
    on the first ``limit`` images of ``split`` (all by default)."""
    data = CocoSplit(dataset, split)
    samples = image_samples(data, limit)
    gt = subset_gt(data.coco, {s.image_id for s in samples})
    records: list[EvalRecord] = []
    if url is not None:
        answers = predict_gateway(url, samples, model=model, tier=tier,
                                  concurrency=concurrency)
        answered = max(answers.models, key=answers.models.__getitem__, default="none")
        records.append(EvalRecord.of(coco_ap(gt, answers.detections), model=answered,
                                     tier=tier, source="gateway", dataset=data.label,
                                     split=split, images=len(samples), models=answers.models,
                                     missed=answers.missed))
    if onnx is not None:
        spec = get_spec(onnx_model_name(onnx))
        detections = predict_rows(onnx_runner(onnx), samples, spec)
        records.append(EvalRecord.of(coco_ap(gt, detections), model=spec.name, tier=None,
                                     source="onnx", dataset=data.label, split=split,
                                     images=len(samples), onnx=str(onnx)))
    return records


def fit_calibration(dataset: Path, onnx: Path, split: str = "val") -> scores.Knots:
    """The score calibration of the bare ``onnx`` model on a labelled split: its
    own scores against whether each detection matched an object (IoU 0.5)."""
    data = CocoSplit(dataset, split)
    spec = get_spec(onnx_model_name(onnx))
    raw = predict_rows(onnx_runner(onnx), image_samples(data), spec, calibrate=False)
    return scores.fit(matched_at_iou50(data.coco, raw))


def image_samples(data: CocoSplit, limit: int | None = None) -> list[Sample]:
    """The split's images (ids and paths; boxes are not needed to predict)."""
    return [Sample(info["id"], data.image_dir / info["file_name"], np.zeros((0, 4), np.float32),
                   np.zeros(0, np.int64)) for info in data.coco["images"][:limit]]


def subset_gt(gt: dict, image_ids: set[int]) -> dict:
    """``gt`` restricted to some images: AP over exactly the images predicted."""
    return {**gt, "images": [i for i in gt["images"] if i["id"] in image_ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids]}


def format_table(records: Iterable[EvalRecord]) -> str:
    head = (f"{'model':<24}{'tier':<10}{'source':<9}{'images':>7}{'missed':>7}{'AP':>8}"
            f"{'AP50':>8}{'AP75':>8}{'APs':>8}{'APm':>8}{'APl':>8}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r.model:<24}{r.tier or '-':<10}{r.source:<9}{r.images:>7}"
                     f"{sum(r.missed.values()):>7}"
                     + "".join(f"{v:>8.3f}" for v in (r.ap, r.ap50, r.ap75, r.ap_small,
                                                       r.ap_medium, r.ap_large)))
    return "\n".join(lines)

