"""Admission calibration: how far answers overrun their predictions, learned
from the answers, so the router admits what will make its budget."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Calibration:
    """How far answers overrun their predictions, learned from the answers.

    A prediction is scaled by ``factor`` before it is compared with a budget:
    ``prior`` (1 + the configured margin) until ``min_samples`` answers are
    seen, then the ``quantile`` of actual / predicted end-to-end time over the
    last ``window`` admitted requests (late ones, 504s included), never under
    1.0. Only requests admitted near their budget count (predicted at least
    ``band`` of it): that is where the factor decides, and a short prediction's
    relative error (a few ms of host jitter on an idle device) says little
    about a long queue's. Where predictions run pessimistic the router stops
    refusing what would have made it; where they run optimistic (other
    gateways' bursts, a loaded host) it stops admitting what will be late.
    ``quantile`` 0: the prior only. The ratios are kept either way: they also
    say how likely an answer is to make its budget (``chance_within``).
    """

    prior: float = 1.15
    quantile: float = 0.95
    window: int = 400
    min_samples: int = 50
    band: float = 0.5
    ceiling: float = 3.0
    factor: float = 0.0  # set from prior in __post_init__
    ratios: deque[float] = field(default_factory=deque)  # in arrival order
    _ranked: list[float] = field(default_factory=list)  # the same, sorted
    _seen: int = 0

    def __post_init__(self) -> None:
        self.factor = self.prior

    def observe(self, predicted_ms: float, actual_ms: float, budget_ms: float) -> None:
        if predicted_ms <= 0 or predicted_ms < self.band * budget_ms:
            return
        ratio = actual_ms / predicted_ms
        self.ratios.append(ratio)
        bisect.insort(self._ranked, ratio)
        if len(self.ratios) > self.window:
            self._ranked.pop(bisect.bisect_left(self._ranked, self.ratios.popleft()))
        self._seen += 1
        if self.quantile > 0 and len(self.ratios) >= self.min_samples and self._seen % 10 == 0:
            ranked = self._ranked
            q = ranked[min(len(ranked) - 1, int(self.quantile * len(ranked)))]
            self.factor = min(self.ceiling, max(1.0, q))

    def chance_within(self, predicted_ms: float, limit_ms: float) -> float:
        """The share of recent answers that, predicted ``predicted_ms``, would
        have come within ``limit_ms`` (1.0 until ``min_samples`` are seen)."""
        if len(self.ratios) < self.min_samples or predicted_ms <= 0:
            return 1.0
        return bisect.bisect_right(self._ranked, limit_ms / predicted_ms) / len(self._ranked)
