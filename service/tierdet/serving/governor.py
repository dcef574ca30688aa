"""The load governor: keeps the device's projected utilization under a target,
and remembers the budgets seen recently (whom an upgrade could push out)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class LoadGovernor:
    """Keeps the device's projected utilization under a target.

    Fitting a budget is not enough under load: giving every loose-budget
    request the largest model that fits fills the device, and the next tight
    requests are shed. The governor tracks the arrival rate (an exponentially
    decaying count, ``window_s``) and the running mean device cost of admitted
    requests; an upgrade is allowed only while rate x mean cost, with this
    request's cost mixed in, stays below ``target``. At low load every
    request may take a large model; near capacity the mix shifts to small
    ones, so the answers that arrive in time carry the most accuracy.

    The rate counts every request the router sees, refused ones too: demand,
    not what was let in. The target is well under 1: a request whose budget
    is within a service time or two of the fastest model's fits only an
    idle device, so every share of the device taken by upgrades is refused
    tight requests (on the real ladder, 2 CPU cores: 0.45-0.6 beat 0.85 on
    effective AP, docs/performance.md).
    """

    target: float = 0.45
    window_s: float = 2.0
    weight: float = 0.1
    rate: float = 0.0  # requests per second
    mean_cost_ms: float = 0.0
    last: float | None = None
    # (arrival time, budget) of recent requests: who an upgrade could push out.
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=512))
    # model -> (device ms admitted per second, decaying over ``window_s``; when last updated)
    work: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arrival(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.last is not None:
                self.rate *= math.exp(-(now - self.last) / self.window_s)
            self.rate += 1.0 / self.window_s
            self.last = now

    def saw_budget(self, budget_ms: float, now: float | None = None) -> None:
        with self._lock:
            self.recent.append((time.monotonic() if now is None else now, budget_ms))

    def recent_budgets(self, now: float | None = None) -> list[float]:
        """Budgets of the requests that arrived within the last ``window_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [b for t, b in self.recent if now - t <= self.window_s]

    def affordable(self, cost_ms: float, devices: int = 1, others: float = 0.0) -> bool:
        """Whether a request of ``cost_ms`` keeps the projected utilization of
        ``devices`` under the target; ``others``: the share of them (in devices)
        other clients' work takes (other gateways sharing the Triton servers)."""
        mixed = self.weight * cost_ms + (1 - self.weight) * self.mean_cost_ms
        return self.rate * mixed / 1e3 + others <= self.target * max(1, devices)

    def _work(self, model: str, now: float) -> float:
        rate, at = self.work.get(model, (0.0, now))
        return rate * math.exp(-(now - at) / self.window_s)

    def admitted(self, cost_ms: float, model: str = "", now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.mean_cost_ms += self.weight * (cost_ms - self.mean_cost_ms)
            self.work[model] = (self._work(model, now) + cost_ms / self.window_s, now)

    def others_load(self, model: str, devices: int = 1, now: float | None = None) -> float:
        """The share of the device(s) that the work admitted recently for other
        models than ``model`` takes: on a CPU those run beside ``model``'s
        executions (each model has its own instance), not before or after them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            work = sum(self._work(m, now) for m in self.work if m != model)
        return work / 1e3 / max(1, devices)
