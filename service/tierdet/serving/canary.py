"""Canaries: a replacement judged on live figures before it takes a model's name.

``PUT /admin/models/{name}?canary=SHARE`` builds the new card under a side name
(``side_name``: ``{name}.canary``) beside the model it would replace
(``changes``). While the canary runs, ``SHARE`` of the requests routed to
``{name}`` go to the side instead (``divert``); the router never chooses the
side on its own, nor does shadow scoring take it for a reference. Every answer
of the side is shadow-scored (``watched``: sampling forced to 100%, still only
where the reference's device is idle) and paired: the model it would replace
answers the same image in the shadow too (idle device, lowest priority),
scored against the same reference detections, so what differs from image to
image cancels and a small loss shows within a few hundred images. Both keep
the total time of their answers (``answered``: the gateway's own observations).
A canary of the reference itself has nothing to be judged against: no pairs,
the admin decides.

The rule (``judge``, a pure function of the figures; ``TIERDET_CANARY_*``):
once there are ``min_samples`` pairs, roll back when the old model's agreement
exceeds the side's on them by more than ``max_agreement_drop`` on average, by
``CONFIDENCE`` standard errors, or when the side's p99 is above the old one's
by more than the ratio ``max_p99_ratio``; else promote. An operator may decide at any time. From a
decision on, nothing more is diverted or recorded: the figures shown are those
it was taken on. Promotion replaces ``{name}`` by the card (the replace path)
and retires the side; rollback retires the side; retiring drains first, so no
request in flight fails.
Every decision is logged and counted (``tierdet_canary_decisions_total``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tierdet.contract.results import CanaryInfo
from tierdet.serving.metrics import Metrics
from tierdet.serving.settings import Settings

log = logging.getLogger("tierdet.canary")

Verdict = Literal["promote", "rollback"]
By = Literal["rule", "operator"]
State = Literal["running", "promoting", "rolling_back", "promoted", "rolled_back", "failed"]
SUFFIX = ".canary"
# Answers' times kept per side: the p99 of the latest ones.
LATENCY_WINDOW = 2000
# A drop counts once its mean is this many standard errors past the margin (one-sided
# 97.7%): sampling noise alone rolls an equally good version back about 1 time in 44.
CONFIDENCE = 2.0


def side_name(name: str) -> str:
    """The name the canary of ``name`` is served under beside it."""
    return name + SUFFIX


@dataclass(frozen=True)
class Rule:
    min_samples: int
    max_agreement_drop: float
    max_p99_ratio: float

    @classmethod
    def of(cls, settings: Settings) -> Rule:
        return cls(settings.canary_min_samples, settings.canary_max_agreement_drop,
                   settings.canary_max_p99_ratio)


@dataclass(frozen=True)
class Pairs:
    """Images both sides answered, each scored against the same reference detections."""

    count: int
    drop: float | None  # mean of (old - new) agreement over them
    error: float = 0.0  # its standard error

    @classmethod
    def of(cls, drops: list[float]) -> Pairs:
        if not drops:
            return cls(0, None)
        error = statistics.stdev(drops) / math.sqrt(len(drops)) if len(drops) > 1 else 0.0
        return cls(len(drops), statistics.fmean(drops), error)


@dataclass(frozen=True)
class Figures:
    """One side's window: scored samples, their mean agreement, its answers' p99."""

    samples: int
    agreement: float | None
    p99_ms: float | None


def judge(old: Figures, new: Figures, pairs: Pairs, rule: Rule
          ) -> tuple[Verdict, str] | None:
    """The rule's verdict on the canary (``new``) against the model it would
    replace (``old``), with why; None until there are ``min_samples`` pairs."""
    if pairs.count < rule.min_samples or pairs.drop is None:
        return None
    if old.p99_ms is None or new.p99_ms is None:
        return None  # both answered the pairs' images: known once there are pairs
    figures = (f"agreement {pairs.drop:+.4f} (standard error {pairs.error:.4f}) below the "
               f"model's on the same {pairs.count} images; p99 {new.p99_ms:.1f} vs "
               f"{old.p99_ms:.1f} ms")
    # Worse beyond the pairs' noise: an equally good version is not rolled back by chance.
    if pairs.drop - CONFIDENCE * pairs.error > rule.max_agreement_drop:
        return "rollback", (f"agreement dropped by more than {rule.max_agreement_drop} "
                            f"(by {CONFIDENCE} standard errors): {figures}")
    if new.p99_ms > old.p99_ms * rule.max_p99_ratio:
        return "rollback", f"p99 above {rule.max_p99_ratio}x the old one's: {figures}"
    return "promote", f"within the rule: {figures}"


@dataclass
class Side:
    """What one side of a canary has shown so far."""

    model: str
    scores: list[float] = field(default_factory=list)
    times_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def figures(self) -> Figures:
        agreement = sum(self.scores) / len(self.scores) if self.scores else None
        p99 = float(np.percentile(self.times_ms, 99)) if self.times_ms else None
        return Figures(len(self.scores), agreement, p99)


@dataclass
class Canary:
    name: str  # the model it would replace
    share: float  # of the requests routed to ``name`` that go to the side
    card: bytes  # the card, as sent: the promotion builds it under ``name``
    old: Side
    new: Side
    drops: list[float] = field(default_factory=list)  # old - new agreement, per pair
    state: State = "running"
    by: str = ""  # who decided: rule or operator
    reason: str = ""

    @property
    def side(self) -> str:
        return self.new.model

    def pairs(self) -> Pairs:
        return Pairs.of(self.drops)

    def info(self) -> CanaryInfo:
        old, new, pairs = self.old.figures(), self.new.figures(), self.pairs()
        return CanaryInfo(
            model=self.side, share=self.share, state=self.state, decided_by=self.by,
            reason=self.reason, samples=new.samples, old_samples=old.samples,
            agreement=_rounded(new.agreement), old_agreement=_rounded(old.agreement),
            p99_ms=_rounded(new.p99_ms, 1), old_p99_ms=_rounded(old.p99_ms, 1),
            pairs=pairs.count, agreement_drop=_rounded(pairs.drop))


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


# What carries out a decision (``ModelChanges.carry_out``): promote or roll back.
Act = Callable[[str, Verdict], Coroutine[Any, Any, object]]


class Canaries:
    """Every model's latest canary (kept after its decision, to be shown)."""

    def __init__(self, rule: Rule, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.rule = rule
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.latest: dict[str, Canary] = {}  # model -> its latest canary
        self.act: Act | None = None  # set by whoever carries decisions out
        self._tasks: set[asyncio.Task[object]] = set()

    def start(self, name: str, share: float, card: bytes) -> Canary:
        canary = Canary(name, share, card, Side(name), Side(side_name(name)))
        self.latest[name] = canary
        log.info("canary of %s started: %s takes %.0f%% of its requests", name, canary.side,
                 100 * share)
        return canary

    def running(self, name: str) -> Canary | None:
        """The running canary of ``name``, or the one ``name`` is the side of."""
        canary = self.latest.get(name.removesuffix(SUFFIX))
        if canary is None or canary.state != "running" or name not in (canary.name,
                                                                       canary.side):
            return None
        return canary

    def divert(self, model: str) -> str | None:
        """The side a request routed to ``model`` goes to instead (drawn at the
        canary's share), or None."""
        canary = self.running(model)
        if canary is None or model != canary.name or self.rng.random() >= canary.share:
            return None
        return canary.side

    def watched(self, model: str) -> bool:
        """``model`` is the side of a running canary: every answer is sampled (the
        model's own at the usual rate: the rule judges pairs)."""
        canary = self.running(model)
        return canary is not None and model == canary.side

    def answered(self, model: str, total_ms: float) -> None:
        """An answer of ``model`` (an ordinary one, or the side's)."""
        canary = self.running(model)
        if canary is not None:
            (canary.old if model == canary.name else canary.new).times_ms.append(total_ms)

    def scored(self, model: str, agreement: float) -> None:
        """A shadow score of ``model``'s answer (either side's: shown)."""
        canary = self.running(model)
        if canary is not None:
            (canary.old if model == canary.name else canary.new).scores.append(agreement)

    def paired(self, canary: Canary, new: float, old: float) -> None:
        """The side's and the model's agreement on one image: the rule is applied
        (unless ``canary`` was decided, or replaced by another, meanwhile)."""
        if self.running(canary.name) is not canary:
            return
        canary.drops.append(old - new)
        verdict = judge(canary.old.figures(), canary.new.figures(), canary.pairs(), self.rule)
        if verdict is None:
            return
        self.decide(canary.name, verdict[0], "rule", verdict[1])
        if self.act is not None:  # carried out in the background; the caller goes on
            task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
                self.act(canary.name, verdict[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def decide(self, name: str, verdict: Verdict, by: By, reason: str) -> Canary:
        """Take a decision on ``name``'s running canary: logged and counted; from
        now on nothing more is diverted or recorded."""
        canary = self.running(name)
        assert canary is not None and canary.name == name
        canary.state = "promoting" if verdict == "promote" else "rolling_back"
        canary.by, canary.reason = by, reason
        self.metrics.canary_decisions.labels(name, verdict, by).inc()
        log.warning("canary of %s: %s by the %s (%s)", name, verdict, by, reason)
        return canary

    def finished(self, name: str, error: str = "") -> None:
        """The decision on ``name``'s canary is carried out (or failed: why)."""
        canary = self.latest[name]
        if error:
            log.error("canary of %s: %s failed: %s", name, canary.state, error)
            canary.state, canary.reason = "failed", f"{canary.reason}; then failed: {error}"
        else:
            canary.state = "promoted" if canary.state == "promoting" else "rolled_back"
            log.info("canary of %s: %s", name, canary.state)

    def info(self, name: str) -> CanaryInfo | None:
        canary = self.latest.get(name)
        return canary.info() if canary is not None else None

    async def close(self) -> None:
        """Stop decisions being carried out (the gateway is stopping: a change
        cancelled puts the serving set back as it was)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
