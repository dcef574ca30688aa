"""The two graphs a card's own graph is served between, written with onnx alone:

``front``: uint8 RGB NHWC pixels (what the gateway sends every model) -> the
card's input (its dtype, layout, channel order, mean and std).

``back``: the card's outputs -> decoded boxes and scores (yolox grid, GFL/DFL
head, boxes + scores) -> the detection head (``tierdet.build.detection_head``)
-> ``[B, K, 6]``; an end2end graph's own rows pass through.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tierdet.build.detection_head import Head, Nodes
from tierdet.registry.cards import ModelCard, labels_of, single_size
from tierdet.registry.tensors import INPUT_NAME, OUTPUT_NAME

CARD_INPUT = "card_input"


def front(card: ModelCard) -> Any:
    """uint8 RGB NHWC [B, S, S, 3] -> ``card_input``."""
    from onnx import TensorProto, helper

    prep, size = card.input, single_size(card)
    g = Nodes()
    x = g.op("Cast", INPUT_NAME, to=TensorProto.FLOAT)  # TensorRT: a uint8 input feeds a Cast
    axis, shape = 3, [1, 1, 1, 3]
    if prep.layout == "NCHW":
        x, axis, shape = g.op("Transpose", x, perm=[0, 3, 1, 2]), 1, [1, 3, 1, 1]
    if prep.channels == "BGR":  # whole planes: one Gather, not a reversed Slice per pixel
        x = g.op("Gather", x, g.ints(2, 1, 0), axis=axis)
    # Pixels already in the graph's units (YOLOX: 0..255) skip the arithmetic: on a
    # 416 px input each full-tensor op costs ~3 ms on ONNX Runtime's CPU.
    if (prep.mean, prep.std) != ((0.0,) * 3, (1.0,) * 3):
        mean = np.asarray(prep.mean, np.float32).reshape(shape)
        inv_std = (np.float32(1.0) / np.asarray(prep.std, np.float32)).reshape(shape)
        x = g.op("Mul", g.op("Sub", x, g.const(mean)), g.const(inv_std))
    if prep.dtype == "float32":
        g.op("Identity", x, out=CARD_INPUT)
    else:
        clipped = g.op("Clip", g.op("Round", x), g.const(0.0), g.const(255.0))
        g.op("Cast", clipped, to=TensorProto.UINT8, out=CARD_INPUT)
    dims: list[str | int] = ["batch", size, size, 3]
    card_dims: list[str | int] = ["batch", 3, size, size] if prep.layout == "NCHW" else dims
    card_type = TensorProto.FLOAT if prep.dtype == "float32" else TensorProto.UINT8
    return g.model([helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, dims)],
                   [helper.make_tensor_value_info(CARD_INPUT, card_type, card_dims)],
                   "front")


def back(card: ModelCard, outputs: tuple[tuple[tuple[int, ...], Any], ...],
         anchors: int) -> Any:
    """The card graph's outputs (``card_out0``, ...: shape at batch 1 and dtype
    each, as its check found them) -> ``[B, K, 6]``."""
    from onnx import TensorProto, helper

    out, size = card.output, single_size(card)
    g = Nodes()
    names = [f"card_out{i}" for i in range(len(outputs))]
    maps = [g.op("Cast", n, to=TensorProto.FLOAT) for n in names]
    head = Head(num_classes=labels_of(card).num_classes, pre_nms_top_k=card.pre_nms_top_k,
                max_detections=card.max_detections, iou_threshold=card.nms_iou,
                scores_are_logits=out.scores == "logits", multi_label=out.multi_label,
                input_size=size)
    if out.format == "end2end":
        g.op("Identity", maps[0], out=OUTPUT_NAME)
    elif out.format == "boxes_scores":
        head.detections(g, maps[0], maps[1], anchors, out=OUTPUT_NAME)
    elif out.format == "yolox":
        row, (cells, strides) = maps[0], _grid(card)
        centre = g.op("Mul", g.op("Add", _columns(g, row, 0, 2), g.const(cells)),
                      g.const(strides))
        half = g.op("Div", g.op("Mul", g.op("Exp", _columns(g, row, 2, 4)), g.const(strides)),
                    g.const(2.0))
        boxes = g.op("Concat", g.op("Sub", centre, half), g.op("Add", centre, half), axis=-1)
        scores = g.op("Mul", _columns(g, row, 4, 5), _columns(g, row, 5, 2**62))
        head.detections(g, boxes, scores, anchors, out=OUTPUT_NAME)
    else:  # gfl
        boxes, scores = _gfl(g, card, maps, *_grid(card))
        head.detections(g, boxes, scores, anchors, out=OUTPUT_NAME)
    inputs = [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", *shape[1:]])
        for n, (shape, dtype) in zip(names, outputs, strict=True)]
    rows: list[str | int] = ["batch", card.max_detections, 6]
    return g.model(inputs, [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                                          rows)], "back")


def _gfl(g: Nodes, card: ModelCard, maps: list[str], cells: np.ndarray,
         strides: np.ndarray) -> tuple[str, str]:
    """Class maps, then distance distributions, per level -> boxes and scores: each
    side's distance is the softmax-weighted mean of 0..bins-1, times the stride, from
    the cell's point."""
    levels, bins = len(card.output.strides), card.output.bins
    scores = g.op("Concat", *maps[:levels], axis=1)
    logits = g.op("Reshape", g.op("Concat", *maps[levels:], axis=1), g.ints(0, 0, 4, bins))
    weighted = g.op("Mul", g.op("Softmax", logits, axis=-1),
                    g.const(np.arange(bins, dtype=np.float32)))
    distances = g.op("Mul", g.op("ReduceSum", weighted, g.ints(-1), keepdims=0),
                     g.const(strides))
    boxes = g.op("Concat", g.op("Sub", g.const(cells), _columns(g, distances, 0, 2)),
                 g.op("Add", g.const(cells), _columns(g, distances, 2, 4)), axis=-1)
    return boxes, scores


def _columns(g: Nodes, x: str, start: int, end: int) -> str:
    """``x[..., start:end]``."""
    return g.op("Slice", x, g.ints(start), g.ints(end), g.ints(-1))


def _grid(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """The points boxes are decoded from [1, N, 2] and their strides [1, N, 1]:
    a YOLOX grid's cell indices (the decode adds them to the offsets), a GFL
    head's cell points by the card's convention."""
    out, size = card.output, single_size(card)
    cells, steps = [], []
    for s in out.strides:
        # YOLOX's grid floors; a GFL head's (PicoDet's) pads the last cell.
        n = size // s if out.format == "yolox" else -(-size // s)
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        cells.append(np.stack([xs, ys], -1).reshape(-1, 2))
        steps.append(np.full((n * n, 1), s))
    grid = np.concatenate(cells)[None].astype(np.float32) if cells else \
        np.zeros((1, 0, 2), np.float32)
    step = np.concatenate(steps)[None].astype(np.float32) if steps else \
        np.zeros((1, 0, 1), np.float32)
    if out.format == "gfl":
        if out.cell_centre == "(x+0.5)*s":
            grid = (grid + np.float32(0.5)) * step
        elif out.cell_centre == "x*s+(s-1)/2":
            grid = grid * step + (step - np.float32(1)) / np.float32(2)
        else:
            grid = grid * step
    return grid, step
