"""Calibrated scores: a detection's estimated precision, the same scale on every model."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tierdet.registry.cards import CardError, ModelCard, expand, spec_of, validated
from tierdet.serving.scores import calibrated, calibrated_rows, fit


def _pairs(precision, n=4000, seed=0):
    """(score, matched) pairs whose chance of a match at score s is precision(s)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.random()
        out.append((s, rng.random() < precision(s)))
    return out


def test_the_fitted_curve_follows_the_share_of_matches_by_score():
    knots = fit(_pairs(lambda s: s * s))
    xs, ys = zip(*knots, strict=True)
    assert list(xs) == sorted(set(xs)) and list(ys) == sorted(ys)
    for x, y in knots[2:-2]:  # the ends rest on few detections
        assert abs(y - x * x) < 0.12, (x, y)


def test_a_model_that_never_matched_cannot_be_calibrated():
    with pytest.raises(ValueError, match="nothing to calibrate"):
        fit([(0.5, False), (0.9, False)])


def test_calibration_keeps_one_models_order_and_maps_into_zero_to_one():
    knots = ((0.01, 0.0), (0.2, 0.0), (0.5, 0.4), (0.9, 0.4), (0.95, 1.0))
    raw = np.array([0.001, 0.05, 0.1, 0.3, 0.6, 0.7, 0.93, 0.99], np.float32)
    mapped = calibrated(raw, knots)
    assert np.all(np.diff(mapped) > 0)  # flat stretches of the curve keep the order
    assert mapped.min() > 0 and mapped.max() <= 1
    assert mapped[5] == pytest.approx(0.4, abs=1e-3)
    rows = np.array([[0, 0, 10, 10, 0.6, 1]], np.float32)
    assert calibrated_rows(rows, knots)[0, 4] == pytest.approx(0.4, abs=1e-3)
    assert rows[0, 4] == pytest.approx(0.6)  # the model's own rows are left as they were
    assert calibrated_rows(rows, ()) is rows


CARD = {"name": "c", "source": {"onnx": "g.onnx", "sha256": "0" * 64},
        "input": {"size": [320, 416], "layout": "NCHW", "dtype": "float32"},
        "output": {"format": "yolox", "strides": [8, 16, 32]}, "classes": "coco80",
        "licence": "MIT", "provenance": "test"}
CURVE = [[0.01, 0.0], [0.5, 0.3], [0.9, 0.9]]


def _card(knots) -> ModelCard:
    return validated({**CARD, "score_calibration": {"knots": knots, "dataset": "d",
                                                    "command": "tierdet eval --calibrate"}},
                     "card")


def test_a_card_gives_each_size_its_own_curve():
    card = _card({320: CURVE, 416: [[0.0, 0.0], [1.0, 1.0]]})
    small, large = (spec_of(c) for c in expand(card))
    assert small.score_calibration == tuple(map(tuple, CURVE))
    assert large.score_calibration == ((0.0, 0.0), (1.0, 1.0))
    assert spec_of(expand(validated(CARD, "card"))[0]).score_calibration == ()


@pytest.mark.parametrize("knots,problem", [
    ([[0.5, 0.3], [0.4, 0.5]], "scores increasing"),
    ([[0.1, 0.5], [0.4, 0.3]], "precisions non-decreasing"),
    ([[0.1, 0.5], [0.4, 1.5]], "lie in 0..1"),
    ([[0.1, 0.5]], "at least two"),
    ({320: CURVE}, "one entry per input size"),
])
def test_a_malformed_curve_is_refused_with_the_field_named(knots, problem):
    with pytest.raises(CardError, match="score_calibration") as info:
        _card(knots)
    assert problem in str(info.value)
