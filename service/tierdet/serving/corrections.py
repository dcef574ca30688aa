"""How much slower (or faster) than its profile each model runs on each endpoint.

A profile is measured once, on one device. What the device does later (a GPU
clocking down, a neighbour taking a core) and how one endpoint's device
differs from another's is a correction per (model, endpoint): a ratio of
observed to profiled time, learnt as an EWMA and relaxed back towards the
profile (half-life ``decay_s``) while nothing new is read. A model without a
profile keeps its observed batch-1 time instead.

An endpoint the model has not been read on yet starts from the mean of the
model's other endpoints (pooled devices are most often alike), not from the
profile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# A single reading never moves a correction beyond these (a stalled answer, a
# clock jump): a device 4x slower than profiled is read over a few answers.
RATIO_BOUNDS = (0.25, 4.0)


@dataclass
class Correction:
    ratio: float = 1.0  # observed / profiled time, EWMA
    ratio_at: float = 0.0  # time.monotonic() of the last update
    observed_ms: float | None = None  # EWMA of batch-1 latency (models without profile)


@dataclass
class Corrections:
    decay_s: float = 60.0
    alpha: float = 0.2  # weight of one observed batch-1 latency
    # model -> endpoint -> its correction there
    by_model: dict[str, dict[str, Correction]] = field(default_factory=dict)

    def at(self, model: str, endpoint: str) -> Correction:
        """``model``'s correction at ``endpoint``, made on first use."""
        there = self.by_model.setdefault(model, {})
        if endpoint not in there:
            now = time.monotonic()
            there[endpoint] = Correction(self.factor(model, None, now), now,
                                         self.observed(model, None))
        return there[endpoint]

    def _known(self, model: str, endpoint: str | None) -> list[Correction]:
        """What speaks for ``model`` at ``endpoint``: its own correction there
        once it has one; else (and for no endpoint) every endpoint's."""
        there = self.by_model.get(model, {})
        own = there.get(endpoint) if endpoint is not None else None
        return [own] if own is not None else list(there.values())

    def factor(self, model: str, endpoint: str | None, now: float | None = None) -> float:
        """The profile's time is multiplied by this at ``endpoint`` (None: the mean
        of the model's endpoints)."""
        known = self._known(model, endpoint)
        return sum(self.ratio(k, now) for k in known) / len(known) if known else 1.0

    def observed(self, model: str, endpoint: str | None) -> float | None:
        """A model without profile: its batch-1 time at ``endpoint``, or (none read
        there yet) the mean of its endpoints'."""
        own = self.by_model.get(model, {}).get(endpoint) if endpoint is not None else None
        if own is not None and own.observed_ms is not None:
            return own.observed_ms
        seen = [c.observed_ms for c in self.by_model.get(model, {}).values()
                if c.observed_ms is not None]
        return sum(seen) / len(seen) if seen else None

    def ratio(self, c: Correction, now: float | None = None) -> float:
        """``c``'s ratio, relaxed towards 1.0 since its last update."""
        if c.ratio == 1.0 or self.decay_s <= 0:
            return c.ratio
        age = (time.monotonic() if now is None else now) - c.ratio_at
        keep = 0.5 ** (max(0.0, age) / self.decay_s)
        return 1.0 + (c.ratio - 1.0) * keep

    def learn(self, c: Correction, implied: float, alpha: float, now: float) -> None:
        """Move ``c`` by ``alpha`` towards a reading of ``implied`` x the profile."""
        current = self.ratio(c, now)
        low, high = RATIO_BOUNDS
        c.ratio = current + alpha * (min(high, max(low, implied)) - current)
        c.ratio_at = now

    def observe(self, c: Correction, batch1_ms: float) -> None:
        """A batch-1 latency of a model without a profile."""
        prev = c.observed_ms
        c.observed_ms = batch1_ms if prev is None else prev + self.alpha * (batch1_ms - prev)

    def forget(self, model: str) -> None:
        self.by_model.pop(model, None)

    def left(self, endpoint: str) -> None:
        """``endpoint`` left the pool: its reads no longer speak for the others."""
        for there in self.by_model.values():
            there.pop(endpoint, None)
