"""Scores that mean the same on every model: a detection's estimated precision.

Each detector family scores on its own scale (YOLOX multiplies objectness by
a class probability: a median detection scores 0.013; PP-PicoDet's sigmoid
class scores put the same median at 0.14). A routed service answers one
request with one model and the next with another, so a client's threshold,
or any ranking across answers, means something else on each. And COCO AP
over answers from several models pools their detections by score: on the
128 photographs, half answered by YOLOX-Nano 320 (26.1 AP alone) and half by
PP-PicoDet-S 320 (32.0) score 25.7 AP on their own scores, 28.7 calibrated
(``tests/test_cards.py``).

A card may record a score calibration: for a few knots of the model's own
score, the share of its detections at that score that matched an object
(IoU 0.5) on a labelled set, a non-decreasing curve (isotonic regression,
``fit``). The gateway maps every score through it (``calibrated``) before the
threshold applies, so ``score`` is the detection's estimated precision on
that set. The map is increasing, so one model's own ranking, and its AP, are
unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

Knots = tuple[tuple[float, float], ...]  # (model score, precision), both non-decreasing

# Keeps the map strictly increasing where the curve is flat: two detections of
# one model keep their order, and none falls to zero.
_TIE_BREAK = 1e-4


def calibrated(scores: np.ndarray, knots: Knots) -> np.ndarray:
    """``scores`` mapped through ``knots`` (unchanged without knots)."""
    if not knots:
        return scores
    xs, ys = _curve(knots)
    mapped = np.interp(scores, xs, ys) * (1 - _TIE_BREAK) + _TIE_BREAK * scores
    return mapped.astype(scores.dtype)


@functools.lru_cache(maxsize=64)
def _curve(knots: Knots) -> tuple[np.ndarray, np.ndarray]:
    """The knots as arrays, once per curve (a served model's is read per request)."""
    xs, ys = np.array(knots, dtype=np.float64).T
    return xs, ys


def calibrated_rows(rows: np.ndarray, knots: Knots) -> np.ndarray:
    """Model rows [..., 6] (score in column 4) with calibrated scores (a copy)."""
    if not knots:
        return rows
    out = rows.copy()
    out[..., 4] = calibrated(rows[..., 4], knots)
    return out


def fit(matched: Iterable[tuple[float, bool]], knots: int = 20) -> Knots:
    """The calibration curve of (score, matched an object) pairs: isotonic
    regression (pool adjacent violators), read at the model's score at the
    minimum, the maximum and ``knots`` quantiles of its true positives' scores
    (where ranking against other models decides AP)."""
    pairs = sorted(matched)
    if not any(hit for _, hit in pairs):
        raise ValueError("no detection matched an object: nothing to calibrate against")
    scores = np.array([s for s, _ in pairs])
    means, values = _isotonic(scores, np.array([float(h) for _, h in pairs]))
    hits = scores[[h for _, h in pairs]]
    grid = np.unique(np.concatenate([[scores[0]], np.quantile(hits, np.linspace(0, 1, knots)),
                                     [scores[-1]]]))
    precision = np.maximum.accumulate(np.interp(grid, means, values))
    return tuple((round(float(x), 6), round(float(y), 4)) for x, y in zip(grid, precision,
                                                                         strict=True))


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators over ``y`` sorted by ``x``: each block's mean
    ``x`` and its value."""
    sums: list[float] = []
    weights: list[int] = []
    xsums: list[float] = []
    for xi, yi in zip(x, y, strict=True):
        sums.append(float(yi))
        weights.append(1)
        xsums.append(float(xi))
        while len(sums) > 1 and sums[-2] / weights[-2] > sums[-1] / weights[-1]:
            sums[-2:] = [sums[-2] + sums[-1]]
            weights[-2:] = [weights[-2] + weights[-1]]
            xsums[-2:] = [xsums[-2] + xsums[-1]]
    w = np.array(weights, dtype=np.float64)
    return np.array(xsums) / w, np.array(sums) / w
