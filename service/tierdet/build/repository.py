"""Triton model repositories, rendered from the model specs.

Targets:
- ``cpu-local``: python backend running ONNX Runtime, for the tritonserver
  binary in the ``nvidia-pytriton`` wheel (no onnxruntime backend there).
- ``cpu``: Triton's own onnxruntime backend, for NVIDIA's container on hosts
  without a GPU.
- ``gpu``: ``tensorrt_plan``, engines built from the same ONNX on the GPU.

``model_repository/<target>/<model>/config.pbtxt`` in git is exactly what
``render_config`` produces without provenance (``tierdet generate``
rewrites it, a test fails on drift). A runnable repository is assembled
elsewhere from those configs plus built model files, with the weights'
provenance recorded as config parameters the gateway reads back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from tierdet.build.engines import write_atomic
from tierdet.registry.specs import SPECS, Batching, ModelSpec
from tierdet.registry.tensors import INPUT_NAME, OUTPUT_NAME, PROVENANCE_PREFIX

Target = Literal["cpu-local", "cpu", "gpu"]
TARGETS: tuple[Target, ...] = ("cpu-local", "cpu", "gpu")
MODEL_FILES: dict[str, str] = {"cpu-local": "model.onnx", "cpu": "model.onnx", "gpu": "model.plan"}
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
COMMITTED_ROOT = Path(__file__).resolve().parents[3] / "model_repository"


def _params(items: Mapping[str, str]) -> list[str]:
    # json.dumps quotes and escapes the way protobuf text format reads them.
    return [f"parameters {{ key: {json.dumps(k)} value {{ string_value: "
            f"{json.dumps(v, ensure_ascii=False)} }} }}" for k, v in items.items()]


def _queue_policy(b: Batching) -> list[str]:
    """Priority levels and a queue policy that rejects requests whose timeout
    passed while queued. Left out of ``cpu-local``: with either one set, the
    pip wheel's tritonserver stalls requests that arrive while a batch runs
    for ~500 ms (its batcher's idle wait) before scheduling them, measured by
    ``benchmarks/triton_queue_stall.py`` (p99 ~570 ms vs ~90 ms without). The
    gateway still bounds every call by its deadline there; the container
    targets keep the policy (measure them with the same script)."""
    return [
        f"  priority_levels: {b.priority_levels}",
        f"  default_priority_level: {b.priority_levels}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {b.default_timeout_us}",
        "    allow_timeout_override: true",
        "  }",
    ]


def render_config(spec: ModelSpec, target: Target, intra_op_threads: int = 0,
                  provenance: Mapping[str, str] | None = None,
                  batching: Batching | None = None) -> str:
    """config.pbtxt text for ``spec`` on ``target``; ``batching`` (tuned from a
    latency profile) replaces the spec's defaults."""
    b = batching or spec.batching
    size = spec.input_size
    lines = [
        "# Generated from tierdet.registry.specs by `tierdet generate`; do not edit.",
        f'name: "{spec.name}"',
    ]
    if target == "cpu-local":
        lines.append('backend: "python"')
    elif target == "cpu":
        lines += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
    else:
        lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    lines += [
        f"max_batch_size: {b.max_batch_size}",
        f'input [ {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ {size}, {size}, 3 ] }} ]',
        f'output [ {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 '
        f"dims: [ {spec.max_detections}, 6 ] }} ]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {b.max_queue_delay_us}",
        *([] if target == "cpu-local" else _queue_policy(b)),
        "}",
        (f"instance_group [ {{ kind: KIND_GPU count: {spec.instances.gpu} }} ]" if target == "gpu"
         else f"instance_group [ {{ kind: KIND_CPU count: {spec.instances.cpu} }} ]"),
        "model_warmup [ {",
        '  name: "zeros" batch_size: 1',
        f'  inputs {{ key: "{INPUT_NAME}" value {{ data_type: TYPE_UINT8 '
        f"dims: [ {size}, {size}, 3 ] zero_data: true }} }}",
        "} ]",
    ]
    if target == "cpu-local":
        lines += _params({"onnx_file": "model.onnx", "intra_op_threads": str(intra_op_threads)})
    elif target == "cpu":
        # Where tritonserver runs ONNX Runtime's global thread pool (the Helm chart,
        # sized from the pod's CPU request, and compose), the pool's size applies.
        lines += ["# Ignored under --backend-config=onnxruntime,enable-global-threadpool=1 "
                  "(Helm chart, compose): one pool for every model. Without it, 0 gives "
                  "each model a thread per core."]
        lines += _params({"intra_op_thread_count": str(intra_op_threads)})
    lines += _params({PROVENANCE_PREFIX + k: v for k, v in (provenance or {}).items()})
    return "\n".join(lines) + "\n"


def committed_files(root: Path = COMMITTED_ROOT,
                    specs: Iterable[ModelSpec] | None = None) -> dict[Path, str]:
    """The committed config templates (``tierdet generate`` writes them)."""
    return {root / target / spec.name / "config.pbtxt": render_config(spec, target)
            for target in TARGETS for spec in (specs or SPECS.values())}


def versions(model_dir: Path) -> list[int]:
    """The version folders a model's folder holds, oldest first."""
    if not model_dir.is_dir():
        return []
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def install_model(repository: Path, spec: ModelSpec, target: Target, model_file: Path,
                  provenance: Mapping[str, str], intra_op_threads: int = 0,
                  batching: Batching | None = None, new_version: bool = False) -> Path:
    """Place one built model into a runnable repository (idempotent) as version 1,
    the only one. ``new_version``: as the next version instead, beside the one
    before it (which a running Triton may still be serving: an explicit load
    then switches to the new one, see ``tierdet.serving.changes``); older ones go."""
    model_dir = repository / spec.name
    held = versions(model_dir)
    version = (held[-1] + 1 if held else 1) if new_version else 1
    keep = {version, version - 1} if new_version else {version}
    for old in held:
        if old not in keep:
            shutil.rmtree(model_dir / str(old))
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    dest = version_dir / MODEL_FILES[target]
    if dest.resolve() != model_file.resolve():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(model_file, tmp)
        tmp.replace(dest)
    if target == "cpu-local":
        shutil.copyfile(PYTHON_MODEL, version_dir / "model.py")
    (model_dir / "config.pbtxt").write_text(
        render_config(spec, target, intra_op_threads, provenance, batching))
    return model_dir


def card_template(home: Path, model: str) -> Path:
    """Where a card's gpu config template lives: beside the models it was built
    with (``HOME/templates/gpu``), since the committed ``model_repository/gpu``
    holds only the zoo's. The engine builder looks here for models it lacks."""
    return home / "templates" / "gpu" / model / "config.pbtxt"


def install_template(home: Path, spec: ModelSpec) -> Path:
    """Write a card's gpu template whole (engine builders may be reading it)."""
    path = card_template(home, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_config(spec, "gpu"))
    return path


def installed_models(repository: Path) -> list[str]:
    """Models in ``repository`` that have a config and a model file."""
    if not repository.is_dir():
        return []
    return sorted(
        d.name for d in repository.iterdir()
        if (d / "config.pbtxt").is_file() and any((d / str(v) / f).is_file()
                                                  for v in versions(d)
                                                  for f in set(MODEL_FILES.values()))
    )
