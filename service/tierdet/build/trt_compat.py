"""Will TensorRT build this graph, and does it stay in fp16's range? Checked without a GPU.

Two checks of an exported ONNX file, run in CI over every model tierdet builds:

``parser_problems``: the rules TensorRT 10's ONNX parser applies to the
operators tierdet's graphs use. Sources: onnx-tensorrt's ``docs/operators.md``
and ``onnxOpImporters.cpp`` at its 10.1 GA release (the newest one stored
here; the ScatterND rule is the same in 10.5-10.7, onnxruntime issue 23618),
TensorRT's ``kUINT8`` documentation (a uint8 network input may only feed a
Cast) and ``ITopKLayer`` (K up to 3840). An operator outside ``OPERATORS`` is
reported too: it may well be supported, but nobody has checked it against
the parser, so it has to be added here on purpose.

``fp16_hazards``: runs the graph in ONNX Runtime with the tensors that feed
NMS exposed, on the images it is given (tests use real photographs and
all-white, all-black and noise frames), and reports any value that is not
finite, leaves fp16's range (65504), or (for box coordinates) sits where
fp16's spacing exceeds one pixel. TensorRT's ``--fp16`` may run these layers
in half precision; a class-offset trick, for instance, moves boxes to tens of
thousands of pixels, where fp16 rounds them to 32 px.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# Opsets the TensorRT 10 parser imports.
OPSETS = range(9, 21)
# Operators of tierdet's graphs that the parser imports (restrictions below).
OPERATORS = frozenset({
    "Abs", "Add", "And", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "Div",
    "Equal", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "Gemm", "Greater",
    "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "MatMul", "Max", "MaxPool", "Min",
    "Mod", "Mul", "Neg", "NonMaxSuppression", "Not", "Or", "Pad", "ReduceMax", "ReduceMean",
    "ReduceSum", "Relu", "Reshape", "Resize", "ScatterND", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tile", "TopK", "Transpose", "Unsqueeze",
    "Where",
    # The ladder's card graphs (PicoDet: GlobalAveragePool, HardSigmoid; NanoDet:
    # LeakyRelu), each imported by the parser (onnx-tensorrt's operator table).
    "GlobalAveragePool", "HardSigmoid", "LeakyRelu",
})
# Inputs that must be constants (initializers or Constant nodes), by operator.
CONSTANT_INPUTS = {"Pad": (3,), "ReduceMax": (1,), "ReduceMean": (1,), "ReduceSum": (1,),
                   "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,)}
MAX_TOP_K = 3840
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                      "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
FP16_MAX = 65504.0
UINT8 = 2  # onnx.TensorProto.UINT8


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph: Any) -> dict[str, np.ndarray]:
    import onnx.numpy_helper as nh

    values = {t.name: nh.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attrs = _attrs(node)
            if "value" in attrs:
                values[node.output[0]] = nh.to_array(attrs["value"])
            elif "value_ints" in attrs:
                values[node.output[0]] = np.array(attrs["value_ints"])
            elif "value_int" in attrs:
                values[node.output[0]] = np.array(attrs["value_int"])
    return values


def _node_problems(node: Any, constants: dict[str, np.ndarray]) -> list[str]:
    op, attrs = node.op_type, _attrs(node)
    where = f"{op} {node.name or node.output[0]}"
    found = []
    if op not in OPERATORS:
        found.append(f"{where}: not among the operators checked against TensorRT's parser")
    for i in CONSTANT_INPUTS.get(op, ()):
        if len(node.input) > i and node.input[i] and node.input[i] not in constants:
            found.append(f"{where}: input {i} must be a constant")
    if op == "ScatterND" and "reduction" in attrs:
        found.append(f"{where}: the reduction attribute is refused (even 'none')")
    if op == "TopK":
        if attrs.get("sorted", 1) != 1:
            found.append(f"{where}: sorted must be 1")
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(np.max(k)) > MAX_TOP_K:
            found.append(f"{where}: K {int(np.max(k))} exceeds TensorRT's {MAX_TOP_K}")
    if op == "NonMaxSuppression" and (len(node.input) < 5 or not node.input[4]):
        found.append(f"{where}: no score_threshold input (ONNX Runtime applies none, "
                     "TensorRT 0: the backends disagree)")
    if op == "MaxPool" and (len(node.output) > 1 or any(d != 1 for d in
                                                        attrs.get("dilations", []))):
        found.append(f"{where}: Indices output or dilations are not supported")
    if op == "Resize":
        mode = attrs.get("mode", b"nearest").decode()
        coords = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
        nearest = attrs.get("nearest_mode", b"round_prefer_floor").decode()
        if (mode not in RESIZE_MODES or coords not in RESIZE_COORDINATES
                or nearest not in RESIZE_NEAREST or attrs.get("antialias", 0)):
            found.append(f"{where}: mode {mode}/{coords}/{nearest} or antialias unsupported")
    if op == "Constant" and {"sparse_value", "value_string", "value_strings"} & set(attrs):
        found.append(f"{where}: sparse or string constants are unsupported")
    return found


def parser_problems(model: Any) -> list[str]:
    """What TensorRT 10's ONNX parser would refuse in ``model`` (an onnx.ModelProto)."""
    graph = model.graph
    found = [f"opset {o.version} is outside {OPSETS.start}-{OPSETS.stop - 1}"
             for o in model.opset_import if o.domain in ("", "ai.onnx")
             and o.version not in OPSETS]
    found += [f"custom-domain operator {n.domain}.{n.op_type}" for n in graph.node if n.domain]
    constants = _constants(graph)
    for node in graph.node:
        found += _node_problems(node, constants)
    for value in graph.input:
        if value.type.tensor_type.elem_type == UINT8:
            consumers = [n.op_type for n in graph.node if value.name in n.input]
            if any(c != "Cast" for c in consumers):
                found.append(f"uint8 input {value.name} feeds {consumers}: TensorRT takes a "
                             "uint8 network input only straight into a Cast")
    return found


def nms_tensors(model: Any) -> dict[str, str]:
    """The boxes and scores tensors of every NonMaxSuppression node: name -> role."""
    roles: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "NonMaxSuppression":
            roles[node.input[0]] = "boxes"
            roles[node.input[1]] = "scores"
    return roles


def _spacing(magnitude: float) -> float:
    """fp16's distance between neighbouring values at ``magnitude``."""
    return float(np.spacing(np.float16(min(magnitude, FP16_MAX))))


def fp16_hazards(path: Path, images: Iterable[tuple[str, np.ndarray]]) -> list[str]:
    """Values on the NMS path that fp16 cannot carry, for each (name, uint8 NHWC batch)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    roles = nms_tensors(model)
    exposed = [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in roles]
    model.graph.output.extend(exposed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    found = []
    for label, batch in images:
        values = session.run(list(roles), {input_name: batch})
        for (name, role), value in zip(roles.items(), values, strict=True):
            found += _value_hazards(f"{label}: {role} {name}", role, np.asarray(value))
    return found


def _value_hazards(where: str, role: str, value: np.ndarray) -> list[str]:
    if not np.isfinite(value).all():
        return [f"{where}: not finite"]
    if value.size == 0:
        return []
    peak = float(np.abs(value).max())
    if peak > FP16_MAX:
        return [f"{where}: reaches {peak:.0f}, past fp16's {FP16_MAX:.0f}"]
    if role == "boxes" and _spacing(peak) > 1.0:
        return [f"{where}: reaches {peak:.0f} px, where fp16's spacing is "
                f"{_spacing(peak):.0f} px"]
    return []
