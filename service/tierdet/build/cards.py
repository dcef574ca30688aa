"""``tierdet build --card FILE``: a model card's graph, wrapped to serve like the zoo.

The card's own graph (any exporter's ONNX) is put between two graphs tierdet
writes itself with onnx alone (``tierdet.build.card_ends``, opset 18; no torch,
so a card builds in about a second, also beside serving):

    uint8 RGB NHWC [B, S, S, 3]  (what the gateway sends every model)
      -> input: the card's dtype, layout, channel order, mean/std
      -> the card's graph
      -> decode of the card's output format (yolox grid, GFL/DFL head, boxes + scores, end2end)
      -> the zoo's detection head: top-k, class-aware NMS, top-K
      -> [B, K, 6] x1 y1 x2 y2 score class  (the one contract of the serving path)

and the three are merged into one ONNX file (``onnx.compose``), so Triton's
dynamic batching and every backend see one graph. Before anything is written
the card's graph is run once on the shape the card declares: a wrong input
size, dtype or output shape is a ``CardError`` here, not an error at the first
request. A card of several sizes is built once per size (``<name>-<size>``):
from its file for that size, or from one size-free graph whose declared input
is re-pinned to the size; the outputs must then follow the size (checked, as
above). A graph exported with a fixed batch of 1 is made batchable when its
only batch-bound ops are ``Reshape``s with a literal leading 1 (they copy the
batch instead: checked equal, image by image, to the original); otherwise it
is served with ``max_batch_size: 1``. The build records which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tierdet.build.detection_head import OPSET
from tierdet.registry.cards import (
    CardError,
    CheckpointSource,
    ModelCard,
    labels_of,
    sha256_file,
    single_size,
)
from tierdet.registry.specs import Batching, ModelSpec
from tierdet.registry.tensors import INPUT_NAME, OUTPUT_NAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CardGraph:
    """The card's graph as found by running it once."""

    model: Any  # onnx.ModelProto, batchable where it could be made so
    input_name: str
    output_names: tuple[str, ...]
    batchable: bool
    anchors: int  # N, the rows per image of a grid or boxes+scores output
    outputs: tuple[tuple[tuple[int, ...], Any], ...]  # (shape at batch 1, dtype) per output


def check_graph(card: ModelCard) -> CardGraph:
    """Load the card's ONNX, run it once as the card describes it, make it batchable."""
    import onnx

    path, digest = _source_file(card)
    if not path.is_file():
        raise CardError(f"{card.name}: source.onnx: no such file: {path}")
    if digest and sha256_file(path) != digest:
        raise CardError(f"{card.name}: source.sha256: {path} does not match {digest}")
    model = onnx.load(str(path))
    # Older exporters list the weights among the inputs too: as inputs they could be
    # overridden, so ONNX Runtime neither folds them nor stays quiet about it.
    weights = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:
        model.graph.initializer.remove(init)
    name = card.input.name or (inputs[0] if len(inputs) == 1 else None)
    if name is None or name not in inputs:
        raise CardError(f"{card.name}: input.name: the graph's inputs are {inputs}; "
                        "name the image input")
    _pin_input(card, model, name)
    outputs = tuple(card.output.names) or tuple(o.name for o in model.graph.output)
    first = _run(card, model.SerializeToString(), name, outputs, _input(card, 1))
    anchors = _check_outputs(card, first)
    batchable = _try_batch(card, model, name, outputs, first)
    return CardGraph(model, name, outputs, batchable, anchors,
                     tuple((o.shape, o.dtype) for o in first))


def _source_file(card: ModelCard) -> tuple[Path, str | None]:
    """The file of an expanded card and its digest."""
    source = card.source
    assert not isinstance(source, CheckpointSource)
    assert not isinstance(source.onnx, dict) and not isinstance(source.sha256, dict), \
        "expand() the card first"
    return source.onnx, source.sha256


def _pin_input(card: ModelCard, model, name: str) -> None:
    """Declare the card's size on the graph's input, if it declares another: a
    size-free graph then runs at it (``_check_outputs`` checks the outputs
    follow); a graph with sizes fixed inside fails its first run."""
    size = single_size(card)
    value = next(i for i in model.graph.input if i.name == name)
    dims = value.type.tensor_type.shape.dim
    spatial = (2, 3) if card.input.layout == "NCHW" else (1, 2)
    if len(dims) != 4 or all(dims[a].dim_value in (0, size) for a in spatial):
        return
    for axis in spatial:
        dims[axis].dim_value = size
    # Shapes declared or inferred for the exported size no longer hold.
    del model.graph.value_info[:]
    for output in model.graph.output:
        for i, dim in enumerate(output.type.tensor_type.shape.dim):
            if i > 0:
                dim.dim_param = f"{output.name}_{i}"


def _input(card: ModelCard, batch: int, seed: int = 0) -> np.ndarray:
    size = single_size(card)
    shape = (batch, 3, size, size) if card.input.layout == "NCHW" else (batch, size, size, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, shape)
    return pixels.astype(np.float32 if card.input.dtype == "float32" else np.uint8)


def _run(card: ModelCard, graph: bytes, name: str, outputs: tuple[str, ...],
         images: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        return session.run(list(outputs), {name: images})
    except Exception as exc:  # onnxruntime reports shape and dtype errors as its own types
        raise CardError(f"{card.name}: the graph does not run on the input the card declares "
                        f"({card.input.layout} {card.input.dtype} {card.input.size}px, batch "
                        f"{len(images)}): {str(exc).splitlines()[0]}") from None


def _check_outputs(card: ModelCard, outs: list[np.ndarray]) -> int:
    """The output shapes the card's format promises; returns N (rows per image)."""
    fmt, classes = card.output.format, labels_of(card).num_classes
    shapes = [tuple(o.shape) for o in outs]
    if fmt == "end2end":
        if len(outs) != 1 or len(shapes[0]) != 3 or shapes[0][2] != 6:
            raise CardError(f"{card.name}: output.format end2end expects one [B, K, 6] output, "
                            f"the graph gives {shapes}")
        return shapes[0][1]
    if fmt == "gfl":
        return _check_gfl(card, shapes, classes)
    if fmt == "yolox":
        cells = sum((single_size(card) // s) ** 2 for s in card.output.strides)
        if len(outs) != 1 or shapes[0][1:] != (cells, 5 + classes):
            raise CardError(f"{card.name}: output.format yolox with strides "
                            f"{list(card.output.strides)} and {classes} classes expects "
                            f"[B, {cells}, {5 + classes}], the graph gives {shapes}")
        return cells
    if (len(outs) != 2 or len(shapes[0]) != 3 or shapes[0][2] != 4
            or shapes[1][:2] != shapes[0][:2] or shapes[1][2:] != (classes,)):
        raise CardError(f"{card.name}: output.format boxes_scores expects boxes [B, N, 4] and "
                        f"scores [B, N, {classes}], the graph gives {shapes}")
    return shapes[0][1]


def _gfl_cells(card: ModelCard) -> list[int]:
    """Cells per level of a GFL head: ceil(size / stride) squared."""
    return [(-(-single_size(card) // s)) ** 2 for s in card.output.strides]


def _check_gfl(card: ModelCard, shapes: list[tuple[int, ...]], classes: int) -> int:
    cells, bins = _gfl_cells(card), card.output.bins
    want = [(1, n, classes) for n in cells] + [(1, n, 4 * bins) for n in cells]
    if [(1, *s[1:]) for s in shapes] != want:
        raise CardError(f"{card.name}: output.format gfl with strides "
                        f"{list(card.output.strides)}, {bins} bins and {classes} classes at "
                        f"{single_size(card)} px expects class maps then distance maps "
                        f"{[list(w) for w in want]} (B first), the graph gives "
                        f"{[list(s) for s in shapes]}")
    return sum(cells)


def _try_batch(card: ModelCard, model, name: str, outputs: tuple[str, ...],
               single: list[np.ndarray]) -> bool:
    """Make a fixed-batch graph take any batch; True if it did (or already could)."""
    import onnx

    dim = model.graph.input[[i.name for i in model.graph.input].index(name)] \
        .type.tensor_type.shape.dim[0]
    if not dim.HasField("dim_value") or dim.dim_value != 1:
        return True  # already dynamic
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    if not _copy_batch_in_reshapes(candidate):
        return False
    for value in (*candidate.graph.input, *candidate.graph.output):
        if value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del candidate.graph.value_info[:]  # shapes inferred for batch 1 no longer hold
    both = _input(card, 2)
    try:
        pair = _run(card, candidate.SerializeToString(), name, outputs, both)
        again = _run(card, candidate.SerializeToString(), name, outputs, both[:1])
    except CardError:
        return False
    # The first image of ``both`` is the one ``single`` came from (same seed).
    second = _run(card, model.SerializeToString(), name, outputs, both[1:])
    same = all(np.allclose(p[:1], s, atol=1e-4) and np.allclose(p[1:], t, atol=1e-4)
               and np.allclose(a, s, atol=1e-4)
               for p, s, t, a in zip(pair, single, second, again, strict=True))
    if same:
        model.CopyFrom(candidate)
    return same


def _copy_batch_in_reshapes(model) -> bool:
    """Rewrite ``Reshape`` targets that start with a literal 1 to start with 0 (ONNX:
    copy that dimension from the input), so they follow the batch. False if a
    target is computed (nothing to rewrite safely)."""
    from onnx import numpy_helper

    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    initializers = {i.name: i for i in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        target = node.input[1]
        if target in initializers:
            tensor = initializers[target]
        elif target in constants:
            tensor = constants[target].attribute[0].t
        else:
            return False
        shape = numpy_helper.to_array(tensor).copy()
        if shape.size and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))
            changed = True
    return changed


# -- the graphs around it ----------------------------------------------------------


def wrap(card: ModelCard, graph: CardGraph):
    """The one served graph: front + the card's graph + back, merged."""
    import onnx
    from onnx import compose, version_converter

    from tierdet.build.card_ends import CARD_INPUT, back, front

    head = front(card)
    user = version_converter.convert_version(graph.model, OPSET)
    user.ir_version = head.ir_version
    tail = back(card, graph.outputs, graph.anchors)
    merged = compose.merge_models(head, user, io_map=[(CARD_INPUT, graph.input_name)],
                                  prefix1="front/", prefix2="card/")
    merged = compose.merge_models(
        merged, tail, prefix2="head/",
        io_map=[(f"card/{name}", f"card_out{i}") for i, name in enumerate(graph.output_names)])
    # Each merge appends the parts' opset imports: keep one per domain (all are 18).
    opsets = {o.domain: o.version for o in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    # The merge keeps the parts' names for the ends; give them the contract's.
    merged.graph.input[0].name = INPUT_NAME
    _rename(merged, f"front/{INPUT_NAME}", INPUT_NAME)
    merged.graph.output[0].name = OUTPUT_NAME
    _rename(merged, f"head/{OUTPUT_NAME}", OUTPUT_NAME)
    onnx.checker.check_model(merged)
    return merged


def _rename(model, old: str, new: str) -> None:
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]


def spec_for_build(spec: ModelSpec, graph: CardGraph) -> ModelSpec:
    """The spec as served: batch 1 only where the graph could not be made batchable."""
    if graph.batchable:
        return spec
    return replace(spec, batching=Batching(max_batch_size=1, max_queue_delay_us=0))


def card_provenance(card: ModelCard, card_path: Path, graph: CardGraph) -> dict[str, str]:
    path, digest = _source_file(card)
    return {
        "weights": f"card {card_path}",
        "card_sha256": sha256_file(card_path),
        "source": str(path),
        "weights_sha256": sha256_file(path),
        # A card's published figure counts only for the exact file it names.
        "weights_digest_check": "sha256" if digest else "none (the card names no sha256)",
        "batching": "dynamic" if graph.batchable else "max_batch_size 1 (fixed-batch graph)",
        "licence": card.licence,
        "provenance": card.provenance,
        **measured_provenance(card),
    }


def measured_provenance(card: ModelCard) -> dict[str, str]:
    """The AP the card records for this size (percent in the card; 0..1 in the build
    record, as a trained checkpoint's sidecar gives it): the router ranks by it."""
    measured = card.measured_ap
    if measured is None:
        return {}
    assert isinstance(measured.ap, float), "expand() the card first"
    return {"measured_ap": f"{measured.ap / 100:.4f}", "measured_on": measured.dataset}


def save(model, path: Path, metadata: dict[str, str]) -> Path:
    import onnx

    from tierdet.registry.tensors import MODEL_METADATA_KEY

    onnx.helper.set_model_props(model, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    assert MODEL_METADATA_KEY in metadata
    return path
