"""A card sent through the admin API: parsed and validated, its graph found
only inside the cards folder (``TIERDET_CARDS_DIR``: a relative path, no
``..``, no link out) with the sha256 the card states, and written as the build
reads it. Every refusal is an ``ApiError`` with its own code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.registry.cards import (
    CardError,
    OnnxSource,
    card_mapping,
    expand,
    sha256_file,
    spec_of,
    validated,
)
from tierdet.registry.cards import ModelCard as Card
from tierdet.registry.specs import SPECS, ModelSpec


def parse_card(name: str, body: bytes) -> tuple[dict[str, Any], Card]:
    """The card in ``body`` (YAML, or JSON: YAML reads it), validated, for ``name``."""
    try:
        raw = card_mapping(body.decode("utf-8"), "card")
        card = validated(raw, "card")
    except UnicodeDecodeError:
        raise ApiError(ErrorCode.INVALID_CARD, "card: not UTF-8 text") from None
    except CardError as exc:
        raise ApiError(ErrorCode.INVALID_CARD, str(exc)) from None
    if card.name != name:
        raise ApiError(ErrorCode.INVALID_CARD, f"name: the card is {card.name!r}, the URL "
                       f"names {name!r}")
    if not isinstance(card.source, OnnxSource) or card.source.sha256 is None:
        raise ApiError(ErrorCode.INVALID_CARD, "source: the admin API takes an ONNX graph with "
                       "its sha256 (source: {onnx: FILE, sha256: DIGEST})")
    return raw, card


def check_replaceable(card: Card, serving: ModelSpec | None) -> None:
    """``card`` may take its name: not a shipped model's and, where a model of that
    name serves (``serving``: its spec), with what the gateway prepares for it
    unchanged: requests prepared for the old version may still be on their way."""
    if card.name in SPECS:
        raise ApiError(ErrorCode.MODEL_CONFLICT, f"{card.name!r} is a shipped model's name")
    if serving is not None and _prepared(serving) != _prepared(spec_of(card)):
        raise ApiError(ErrorCode.MODEL_CONFLICT, (
            f"{card.name}: the replacement changes what the gateway prepares for it "
            "(input size, resize, classes or detections): add it under a new name, "
            "then retire the old one"))


def _prepared(spec: ModelSpec) -> tuple[object, ...]:
    """What the gateway does for a model outside its graph. Normalisation and channel
    order happen inside the graph (the gateway always sends uint8 RGB): a version may
    change them."""
    outside = replace(spec.preprocessing, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      channels="RGB")
    return spec.input_size, outside, spec.labels, spec.max_detections


def checked_graphs(card: Card, cards_dir: Path) -> dict[int, Path]:
    """Input size -> the graph's file in ``cards_dir``, checked against its digest
    (blocking: it reads the files)."""
    out = {}
    for model in expand(card):
        source = model.source
        assert isinstance(source, OnnxSource)
        assert isinstance(source.onnx, Path) and isinstance(source.sha256, str)  # expanded
        path = graph_path(cards_dir, source.onnx)
        if sha256_file(path) != source.sha256:
            raise ApiError(ErrorCode.DIGEST_MISMATCH, f"source: {source.onnx} does not have "
                           f"the sha256 {source.sha256}")
        size = model.input.size
        assert isinstance(size, int)
        out[size] = path
    return out


def graph_path(cards_dir: Path, path: Path) -> Path:
    """``path`` inside ``cards_dir``: relative, no ``..``, not out through a link."""
    if path.is_absolute() or ".." in path.parts:
        raise ApiError(ErrorCode.CARD_PATH_REFUSED, f"source: {path}: a graph is named by "
                       "its path in the cards folder (relative, without '..')")
    root = cards_dir.resolve()
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise ApiError(ErrorCode.CARD_PATH_REFUSED, f"source: {path} leads out of the cards "
                       "folder")
    if not full.is_file():
        raise ApiError(ErrorCode.GRAPH_NOT_FOUND, f"source: {path}: no such file in the "
                       "cards folder")
    return full


def write_card(home: Path, raw: dict[str, Any], graphs: dict[int, Path]) -> Path:
    """The card as the build reads it: its graphs named by the checked paths."""
    source = dict(raw["source"])
    onnx = source["onnx"]
    source["onnx"] = ({int(k): str(graphs[int(k)]) for k in onnx} if isinstance(onnx, dict)
                      else str(next(iter(graphs.values()))))
    path = home / "admin-cards" / f"{raw['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({**raw, "source": source}, sort_keys=False))
    tmp.replace(path)
    return path
