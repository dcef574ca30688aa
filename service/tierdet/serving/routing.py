"""Route each request to the most accurate model that can answer within its budget.

For every candidate the router predicts when the answer would be ready:

    predicted = elapsed (decode so far)
              + backlog (work queued on the endpoint's device, all models)
              + service time of this model at batch 1
              + fixed gateway overhead

and picks the highest-AP model whose prediction, with a safety margin,
fits the budget, on the endpoint (Triton server) where it would finish
first. Each endpoint's device is treated as shared: on a CPU (and largely on
one GPU) every model's requests compete for the same cores, so a long D1
backlog slows a D0 answer too. A backlog is the larger of this gateway's
own work in flight there and what Triton last reported queued (every
gateway's work, ``observe_queues``) plus the work sent there since: this
gateway's, and the other gateways' at the rate Triton's counts show.
Service times come from the measured profile, corrected online by the
ratio of observed to predicted Triton latency (EWMA per model). When
nothing fits the request is shed at once (or, where its tier allows, served
by the fastest model and marked degraded): work that cannot make its
deadline is never queued.

Among the models that fit, a bigger one is worth its accuracy only if its
extra device time does not push other requests out of their budgets: each
candidate's AP is discounted by the AP expected to be lost to requests with
tighter budgets that would arrive while its work is queued (from the budgets
seen recently). Under light load, or with only loose budgets around, the
discount is near zero; with frequent tight requests, loose ones take small
models and the tight ones keep fitting. A load governor also keeps the
projected device utilization under a target.

AP measured on different data sets does not compare (a model fine-tuned on
six shapes scores 85 where a COCO detector scores 30): the router ranks only
models of one label set against each other. A request that several label
sets could answer goes to the default one's models (COCO's, unless the
gateway says otherwise); one that classes or a pinned model confine to
another set is routed within that set.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.registry.profile import LatencyProfile
from tierdet.serving.backend import QueueReport, Served

# Prior for a model with no profile and no observation yet: slow enough that
# it is only chosen when nothing measured fits.
UNKNOWN_SERVICE_MS = 1000.0
# The endpoint of a router fed plain model lists (one backend, unit tests).
LOCAL = "local"
# A device window (Triton's own queue wait and batch size) older than this is
# not used to read an answer's latency: the device may have changed since.
WINDOW_MAX_AGE_S = 2.0
# A queue report older than this is not used: the poll has stopped or fails.
QUEUE_MAX_AGE_S = 1.0

Placement = Mapping[str, Iterable[str]]  # model -> endpoints that have it ready


@dataclass(frozen=True)
class Tier:
    name: str
    budget_ms: float
    models: tuple[str, ...] = ()  # empty: every served model
    degrade: bool = False  # nothing fits: serve the fastest model late, marked
    priority: int = 2  # Triton priority level (1 = first)


DEFAULT_TIERS: dict[str, Tier] = {
    t.name: t for t in (
        Tier("realtime", 150.0, priority=1),
        Tier("balanced", 500.0, degrade=True),
        Tier("accurate", 3000.0, degrade=True),
    )
}


@dataclass(frozen=True)
class TierConfig:
    tiers: dict[str, Tier]
    default: str

    @classmethod
    def load(cls, path: Path | None, default: str) -> TierConfig:
        """Tiers from a YAML/JSON file ({tiers: {name: {budget_ms, models,
        degrade, priority}}}), or the built-in ones."""
        tiers = dict(DEFAULT_TIERS)
        if path is not None:
            import yaml

            raw = yaml.safe_load(path.read_text()) or {}
            tiers = {name: Tier(name=name, budget_ms=float(t["budget_ms"]),
                                models=tuple(t.get("models") or ()),
                                degrade=bool(t.get("degrade", False)),
                                priority=int(t.get("priority", 2)))
                     for name, t in (raw.get("tiers") or {}).items()}
            default = raw.get("default", default)
        if default not in tiers:
            raise ValueError(f"default tier {default!r} is not among {sorted(tiers)}")
        return cls(tiers, default)


@dataclass(frozen=True)
class RouteRequest:
    """What the client asked for; every field optional."""

    model: str | None = None
    tier: str | None = None
    sla_ms: float | None = None
    deadline_ms: float | None = None  # e.g. the gRPC call deadline, from now


@dataclass(frozen=True)
class Decision:
    model: str
    tier: str | None
    budget_ms: float
    predicted_ms: float
    degraded: bool
    priority: int
    endpoint: str = LOCAL

    def timeout_s(self, elapsed_ms: float, floor_ms: float = 1.0) -> float:
        """Time left for the Triton call: the budget minus what is spent."""
        return max(floor_ms, self.budget_ms - elapsed_ms) / 1e3


@dataclass
class _ModelLoad:
    ratio: float = 1.0  # observed / predicted Triton time, EWMA
    ratio_at: float = 0.0  # monotonic time of the last ratio update
    observed_ms: float | None = None  # EWMA of batch-1 latency (models without profile)


@dataclass(frozen=True)
class DeviceWindow:
    """What one endpoint's Triton did with a model between two queue reports:
    the mean time its answered requests waited in its queue, and the mean batch
    (images per execution) they ran in."""

    queue_ms: float
    batch: float
    at: float  # time.monotonic() of the report that closed the window


@dataclass(frozen=True, eq=False)  # each ticket is its own: compared by identity
class Ticket:
    """An admitted request: what was predicted, and whether the device was idle."""

    model: str
    predicted_ms: float  # Triton time (queue + service) predicted at admission
    idle: bool  # nothing was in flight on the device when it was admitted
    ratio: float  # the model's correction used for that prediction
    endpoint: str = LOCAL
    admitted_at: float = 0.0  # time.monotonic()


@dataclass
class Dispatch:
    """Work on the device, from ``Router.dispatch``: say how long it took."""

    ticket: Ticket
    observed_ms: float | None = None  # None: it did not complete (nothing learned)

    def observe(self, ms: float) -> None:
        self.observed_ms = ms


@dataclass
class LatencyModel:
    """Predicts service time per model; tracks admitted work (thread-safe).

    Learning is guarded against queueing: a model's own service time is
    learned only from requests admitted to an idle device, so a burst cannot
    inflate the estimate (and an inflated estimate sheds the very requests
    that would correct it). Requests admitted behind others refine the
    profile's ratio slowly, and every correction decays back towards the
    profile (half-life ``decay_s``) when no new evidence arrives.
    """

    profile: LatencyProfile
    alpha: float = 0.2
    busy_alpha: float = 0.05
    decay_s: float = 60.0
    loads: dict[str, _ModelLoad] = field(default_factory=dict)
    flight: set[Ticket] = field(default_factory=set)  # admitted, not finished
    # endpoint -> time.monotonic() its device finishes the work in flight there
    busy_until: dict[str, float] = field(default_factory=dict)
    # endpoint -> (time.monotonic() it was asked, requests queued at Triton per model)
    queues: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)
    # endpoint -> device ms of work other clients send there per second (EWMA)
    others_rate: dict[str, float] = field(default_factory=dict)
    sent: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, model) -> ours
    # endpoint -> (asked, the high of Triton's arrivals less ours, per model) at the last report
    _last: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)
    # (endpoint, model) -> Triton's cumulative counts at the last report, and the
    # window between the last two reports that saw answers
    _served: dict[tuple[str, str], Served] = field(default_factory=dict)
    windows: dict[tuple[str, str], DeviceWindow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _load(self, model: str) -> _ModelLoad:
        return self.loads.setdefault(model, _ModelLoad())

    def _learn(self, load: _ModelLoad, implied: float, alpha: float, now: float) -> None:
        current = self._ratio(load, now)
        load.ratio = current + alpha * (min(4.0, max(0.25, implied)) - current)
        load.ratio_at = now

    def _observe(self, load: _ModelLoad, batch1_ms: float) -> None:
        prev = load.observed_ms
        load.observed_ms = batch1_ms if prev is None else prev + self.alpha * (batch1_ms - prev)

    def base_ms(self, model: str) -> float:
        """Profiled (or observed) batch-1 latency, before online correction."""
        prof = self.profile.models.get(model)
        if prof is not None:
            return prof.service_ms(1)
        load = self.loads.get(model)
        return load.observed_ms if load and load.observed_ms else UNKNOWN_SERVICE_MS

    def marginal_ms(self, model: str) -> float:
        prof = self.profile.models.get(model)
        return prof.marginal_ms() if prof is not None else self.base_ms(model)

    def _ratio(self, load: _ModelLoad, now: float | None = None) -> float:
        """The correction, relaxed towards 1.0 since its last update."""
        if load.ratio == 1.0 or self.decay_s <= 0:
            return load.ratio
        age = (time.monotonic() if now is None else now) - load.ratio_at
        keep = 0.5 ** (max(0.0, age) / self.decay_s)
        return 1.0 + (load.ratio - 1.0) * keep

    def service_ms(self, model: str) -> float:
        return self.base_ms(model) * self._ratio(self._load(model))

    def cost_ms(self, model: str) -> float:
        """Device time one more request of ``model`` adds when the device is busy."""
        return self.marginal_ms(model) * self._ratio(self._load(model))

    def _at(self, endpoint: str) -> list[Ticket]:
        """This gateway's requests in flight at ``endpoint`` (a snapshot)."""
        return [t for t in list(self.flight) if t.endpoint == endpoint]

    def inflight(self, endpoint: str = LOCAL) -> int:
        """This gateway's requests in flight at ``endpoint``."""
        return len(self._at(endpoint))

    def _report(self, endpoint: str) -> tuple[float, dict[str, int]] | None:
        report = self.queues.get(endpoint)
        if report is None or time.monotonic() - report[0] > QUEUE_MAX_AGE_S:
            return None
        return report

    def own_ms(self, endpoint: str = LOCAL, now: float | None = None) -> float:
        """This gateway's work left on ``endpoint``'s device: a clock that each
        admission moves on (by a whole batch-1 service on an idle device: a new
        request cannot join the batch that is running; by the request's batched
        cost behind others) and each completion resets to the cost of what is
        still in flight; in between it runs down, so a request half done counts
        half (FIFO: work ahead only shrinks)."""
        here = self._at(endpoint)
        if not here:
            return 0.0
        now = time.monotonic() if now is None else now
        left = (self.busy_until.get(endpoint, now) - now) * 1e3
        # Overdue (the device is slower than predicted right now): something is still
        # running, progress unknown; expect half of it, not nothing.
        return max(left, 0.5 * max(self.service_ms(t.model) for t in here))

    def backlog_ms(self, endpoint: str = LOCAL) -> float:
        """Work queued or running on ``endpoint``'s device: this gateway's own, or
        what Triton reported queued (all gateways') plus what this gateway sent
        since, whichever is more. Triton's count leaves out the batch it is
        running, so one's own work is a floor."""
        mine = self._at(endpoint)
        own = self.own_ms(endpoint)
        report = self._report(endpoint)
        if report is None:
            return own
        asked, pending = report
        shared = sum(n * self.cost_ms(m) for m, n in pending.items() if n > 0)
        waiting = [m for m, n in pending.items() if n > 0]
        if waiting:  # a batch is running ahead of them (not in the count): half of one
            shared += 0.5 * max(self.service_ms(m) for m in waiting)
        shared += sum(self.cost_ms(t.model) for t in mine if t.admitted_at > asked)
        shared += self.others_rate.get(endpoint, 0.0) * max(0.0, time.monotonic() - asked)
        return max(own, shared)

    def predict_ms(self, model: str, endpoint: str = LOCAL) -> float:
        """Triton time for a request admitted now (queue + service)."""
        return self.backlog_ms(endpoint) + self.service_ms(model)

    def observe_queues(self, queues: Mapping[str, tuple[float, QueueReport]]) -> None:
        """What each endpoint's Triton reported (``EndpointPool.queues``): its queue,
        and from its arrival count less ours, the rate of other clients' work.

        Triton may count a request of ours later than we do (ours is counted
        when sent), so arrivals less ours dips while ours are in flight and
        recovers when they land: only a new high of it is other clients' work,
        or every dip and recovery would show as phantom load on that endpoint."""
        with self._lock:
            for url, (asked, report) in queues.items():
                ours = {m: n for (e, m), n in self.sent.items() if e == url}
                others = {m: n - ours.get(m, 0) for m, n in report.arrived.items()}
                last = self._last.get(url)
                if last is not None and asked > last[0]:
                    high = {m: max(n, last[1].get(m, n)) for m, n in others.items()}
                    work = sum(self.cost_ms(m) * (n - last[1].get(m, n))
                               for m, n in high.items())
                    rate = work / (asked - last[0])
                    prev = self.others_rate.get(url)
                    self.others_rate[url] = rate if prev is None else prev + 0.3 * (rate - prev)
                    others = high
                self._last[url] = (asked, others)
                self._observe_device(url, asked, report.served)
            self.queues = {url: (asked, dict(report.pending))
                           for url, (asked, report) in queues.items()}

    def _observe_device(self, url: str, asked: float, served: Mapping[str, Served]) -> None:
        for model, now in served.items():
            before = self._served.get((url, model))
            self._served[url, model] = now
            if before is None or now.requests <= before.requests:
                continue  # nothing answered since: the last window stands until it ages
            requests = now.requests - before.requests
            executions = now.executions - before.executions
            batch = (now.images - before.images) / executions if executions > 0 else 1.0
            self.windows[url, model] = DeviceWindow(
                (now.queue_us - before.queue_us) / requests / 1e3, max(1.0, batch), asked)

    def _idle(self, endpoint: str) -> bool:
        if self._at(endpoint):
            return False
        report = self._report(endpoint)
        return report is None or not any(report[1].values())

    def admit(self, model: str, endpoint: str = LOCAL) -> Ticket:
        """Count a request as in flight at ``endpoint``."""
        with self._lock:
            now = time.monotonic()
            ticket = Ticket(model, self.predict_ms(model, endpoint), self._idle(endpoint),
                            self._ratio(self._load(model)), endpoint, now)
            ahead = self.own_ms(endpoint, now)
            cost = self.cost_ms(model) if ahead > 0 else self.service_ms(model)
            self.busy_until[endpoint] = now + (ahead + cost) / 1e3
            self.sent[endpoint, model] = self.sent.get((endpoint, model), 0) + 1
            self.flight.add(ticket)
            return ticket

    def finish(self, ticket: Ticket, observed_ms: float | None) -> None:
        """Release an admitted request; learn from its latency if it completed."""
        with self._lock:
            self.flight.discard(ticket)
            left = sum(self.cost_ms(t.model) for t in self._at(ticket.endpoint))
            self.busy_until[ticket.endpoint] = time.monotonic() + left / 1e3
            load = self._load(ticket.model)
            if observed_ms is None or ticket.predicted_ms <= 0:
                return
            now = time.monotonic()
            prof = self.profile.models.get(ticket.model)
            window = self.windows.get((ticket.endpoint, ticket.model))
            if window is not None and now - window.at <= WINDOW_MAX_AGE_S:
                # The device's own account: of the answer's time, Triton's recent
                # mean queue wait was not service; the rest is one execution at
                # its recent batch size. Every answer then reads the device's
                # speed, idle or busy, so a slower device is followed in a few
                # answers rather than the many that idle ones alone would take.
                served_ms = max(0.0, observed_ms - window.queue_ms)
                batch = max(1, round(window.batch))
                if prof is not None:
                    self._learn(load, served_ms / prof.service_ms(batch), self.alpha, now)
                else:  # no profile: take batches as a CPU runs them, image after image
                    self._observe(load, served_ms / batch)
            elif prof is not None:
                implied = ticket.ratio * observed_ms / ticket.predicted_ms
                self._learn(load, implied, self.alpha if ticket.idle else self.busy_alpha, now)
            elif ticket.idle:
                self._observe(load, observed_ms)


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
    """

    target: float = 0.85
    window_s: float = 2.0
    weight: float = 0.1
    rate: float = 0.0  # requests per second
    mean_cost_ms: float = 0.0
    last: float | None = None
    # (arrival time, budget) of recent requests: who an upgrade could push out.
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=512))
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

    def affordable(self, cost_ms: float, devices: int = 1) -> bool:
        mixed = self.weight * cost_ms + (1 - self.weight) * self.mean_cost_ms
        return self.rate * mixed / 1e3 <= self.target * max(1, devices)

    def admitted(self, cost_ms: float) -> None:
        with self._lock:
            self.mean_cost_ms += self.weight * (cost_ms - self.mean_cost_ms)


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
    ``quantile`` 0: the prior only.
    """

    prior: float = 1.15
    quantile: float = 0.95
    window: int = 400
    min_samples: int = 50
    band: float = 0.5
    ceiling: float = 3.0
    factor: float = 0.0  # set from prior in __post_init__
    ratios: deque[float] = field(default_factory=deque)
    _seen: int = 0

    def __post_init__(self) -> None:
        self.factor = self.prior

    def observe(self, predicted_ms: float, actual_ms: float, budget_ms: float) -> None:
        if self.quantile <= 0 or predicted_ms <= 0 or predicted_ms < self.band * budget_ms:
            return
        self.ratios.append(actual_ms / predicted_ms)
        if len(self.ratios) > self.window:
            self.ratios.popleft()
        self._seen += 1
        if len(self.ratios) >= self.min_samples and self._seen % 10 == 0:
            ranked = sorted(self.ratios)
            q = ranked[min(len(ranked) - 1, int(self.quantile * len(ranked)))]
            self.factor = min(self.ceiling, max(1.0, q))


class Router:
    """``ap``: model -> the AP (percent) it is ranked by; models not in it are never
    routed to. The catalog updates it as it learns what each model serves.
    ``label_sets``: model -> the name of its label set (absent: the default's)."""

    def __init__(self, ap: Mapping[str, float], tiers: TierConfig,
                 latency: LatencyModel, default_budget_ms: float,
                 margin_frac: float = 0.15, margin_ms: float = 5.0,
                 overhead_ms: float = 3.0, governor: LoadGovernor | None = None,
                 calibrate_quantile: float = 0.0, label_sets: Mapping[str, str] | None = None,
                 default_label_set: str = "coco") -> None:
        self.ap = dict(ap)
        self.label_sets = dict(label_sets or {})
        self.default_label_set = default_label_set
        self.tiers = tiers
        self.latency = latency
        self.default_budget_ms = default_budget_ms
        self.calibration = Calibration(1 + margin_frac, calibrate_quantile)
        self.margin_ms = margin_ms
        self.overhead_ms = overhead_ms
        self.governor = governor or LoadGovernor()
        self._picks = 0
        self._picked: dict[str, int] = {}  # endpoint -> when it was last chosen (pick count)

    @contextmanager
    def dispatch(self, model: str, endpoint: str = LOCAL) -> Iterator[Dispatch]:
        """Count work on the endpoint's device while the block runs; learn from
        what it observed."""
        run = Dispatch(self.latency.admit(model, endpoint))
        try:
            yield run
        finally:
            self.latency.finish(run.ticket, run.observed_ms)

    def fits(self, predicted_ms: float, budget_ms: float) -> bool:
        return predicted_ms * self.calibration.factor + self.margin_ms <= budget_ms

    def _budget(self, req: RouteRequest, tier: Tier | None) -> float:
        if req.sla_ms is not None:
            budget = req.sla_ms
        else:
            budget = tier.budget_ms if tier else self.default_budget_ms
        # A transport deadline (gRPC) is a hard limit: the client stops waiting.
        return budget if req.deadline_ms is None else min(budget, req.deadline_ms)

    def tier_for(self, req: RouteRequest) -> Tier | None:
        if req.tier is not None:
            tier = self.tiers.tiers.get(req.tier)
            if tier is None:
                raise ApiError(ErrorCode.UNKNOWN_TIER, f"unknown tier {req.tier!r}; tiers: "
                               f"{', '.join(sorted(self.tiers.tiers))}")
            return tier
        if req.model is not None or req.sla_ms is not None:
            return None  # pinned model or explicit budget: no tier applies
        return self.tiers.tiers[self.tiers.default]

    def _candidates(self, req: RouteRequest, tier: Tier | None, ready: Placement
                    ) -> list[str]:
        if req.model is not None:
            return [req.model]
        allowed = tier.models if tier and tier.models else tuple(ready)
        candidates = [m for m in allowed if m in ready and m in self.ap]
        if not candidates:
            raise ApiError(ErrorCode.MODEL_NOT_READY, "no model is ready for this request",
                           retry_after_s=2.0)
        return self._one_label_set(candidates)

    def _one_label_set(self, candidates: list[str]) -> list[str]:
        """The candidates whose APs compare: all of them when they share a label
        set, else the default set's (an ``invalid_option`` when it has none)."""
        def label_set(model: str) -> str:
            return self.label_sets.get(model, self.default_label_set)

        sets = {label_set(m) for m in candidates}
        if len(sets) == 1:
            return candidates
        if self.default_label_set in sets:
            return [m for m in candidates if label_set(m) == self.default_label_set]
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"models of different label sets ({', '.join(sorted(sets))}) could "
                       "answer, and their APs do not compare: name a model, or classes "
                       "that only one label set has")

    def _nearest(self, model: str, endpoints: Iterable[str]) -> tuple[str, float]:
        """The endpoint where ``model``'s work would start first, and its backlog.
        Ties (an idle pool) go to the one with the fewest of our requests, then
        to the one chosen least recently, so steady load spreads evenly."""
        ranked = [(self.latency.backlog_ms(e), self.latency.inflight(e),
                   self._picked.get(e, 0), e) for e in (list(endpoints) or [LOCAL])]
        backlog, _, _, best = min(ranked)
        return best, backlog

    def _pick(self, decision: Decision) -> Decision:
        self._picks += 1
        self._picked[decision.endpoint] = self._picks
        return decision

    def _predict(self, candidates: list[str], elapsed_ms: float, ready: Placement
                 ) -> tuple[dict[str, float], dict[str, str]]:
        """Predicted completion of each candidate at its nearest endpoint, and that
        endpoint."""
        predicted, where = {}, {}
        for m in candidates:
            where[m], backlog = self._nearest(m, ready.get(m, ()))
            predicted[m] = elapsed_ms + self.overhead_ms + backlog + self.latency.service_ms(m)
        return predicted, where

    def _displacement(self, pool: list[str], candidates: list[str], backlog: float
                      ) -> dict[str, float]:
        """AP expected to be lost to other requests if this one takes ``m``.

        On a shared device, a bigger model's extra work delays everything
        admitted after it. A request that arrives while that work is queued
        and whose budget would have fitted the fastest model, but no longer
        does, is shed. From the budgets seen in the governor's window: the
        rate of such requests, the chance one arrives while the extra work is
        queued, times the AP it would have got from the fastest model.
        Whether a budget "would have fitted" is judged on a free device, not
        on the current backlog: otherwise a backlog would make further
        upgrades look free and feed itself.
        """
        budgets = self.governor.recent_budgets()
        fastest = min(candidates, key=self.latency.service_ms)
        base = self.overhead_ms + self.latency.service_ms(fastest)
        base_cost = self.latency.cost_ms(fastest)
        loss: dict[str, float] = {}
        for m in pool:
            cost = self.latency.cost_ms(m)
            extra = cost - base_cost
            if extra <= 0 or not budgets:
                loss[m] = 0.0
                continue
            pushed = sum(1 for b in budgets
                         if self.fits(base, b) and not self.fits(base + extra, b))
            exposure_s = (backlog + cost) / 1e3
            chance = 1.0 - math.exp(-pushed / self.governor.window_s * exposure_s)
            loss[m] = chance * self.ap[fastest]
        return loss

    def _degradable(self, req: RouteRequest, tier: Tier | None) -> bool:
        return tier is not None and tier.degrade and req.sla_ms is None and req.deadline_ms is None

    def _shed(self, budget: float, fastest: str, predicted_ms: float) -> ApiError:
        wait_s = max(0.0, predicted_ms - budget) / 1e3
        return ApiError(ErrorCode.SLA_UNATTAINABLE,
                        f"no model can answer within {budget:.0f} ms now (fastest: {fastest}, "
                        f"predicted {predicted_ms:.0f} ms)",
                        retry_after_s=max(1.0, math.ceil(wait_s)))

    def precheck(self, req: RouteRequest, elapsed_ms: float,
                 ready: Placement | Iterable[str]) -> list[str]:
        """Shed before any decoding work when not even the fastest model could
        answer in time: refusals then cost microseconds, not a decode. Returns
        the models a decision may pick: those that fit now and the fastest (the
        degraded answer), or every candidate for a request without a budget."""
        tier = self.tier_for(req)
        ready = placement(ready)
        candidates = self._candidates(req, tier, ready)
        if self._degradable(req, tier):
            return candidates
        budget = self._budget(req, tier)
        predicted, _ = self._predict(candidates, elapsed_ms, ready)
        fastest = min(predicted, key=predicted.__getitem__)
        if not self.fits(predicted[fastest], budget):
            self.governor.saw_budget(budget)  # requests that reach decide() are seen there
            raise self._shed(budget, fastest, predicted[fastest])
        return [m for m in candidates if m == fastest or self.fits(predicted[m], budget)]

    def slot_wait_ms(self, req: RouteRequest, elapsed_ms: float,
                     ready: Placement | Iterable[str]) -> float | None:
        """How much longer the request may wait (for an image slot) before not
        even the fastest of ``ready`` could answer within its budget; None where
        a late answer is degraded rather than refused (waits like any other)."""
        tier = self.tier_for(req)
        if self._degradable(req, tier):
            return None
        ready = placement(ready)
        predicted, _ = self._predict(self._candidates(req, tier, ready), elapsed_ms, ready)
        latest = (self._budget(req, tier) - self.margin_ms) / self.calibration.factor
        return latest - min(predicted.values())

    def decide(self, req: RouteRequest, elapsed_ms: float,
               ready: Placement | Iterable[str]) -> Decision:
        """The model and the endpoint for this request (or an ApiError: shed)."""
        tier = self.tier_for(req)
        ready = placement(ready)
        budget = self._budget(req, tier)
        candidates = self._candidates(req, tier, ready)
        priority = tier.priority if tier else (1 if budget < self.default_budget_ms else 2)
        predicted, where = self._predict(candidates, elapsed_ms, ready)
        self.governor.arrival()
        fitting = [m for m in candidates if self.fits(predicted[m], budget)]
        if fitting:
            devices = len({e for m in candidates for e in ready.get(m, ())})
            affordable = ([m for m in fitting
                           if self.governor.affordable(self.latency.cost_ms(m), devices)]
                          if req.model is None else fitting)
            pool = affordable or [min(fitting, key=self.latency.cost_ms)]
            backlog = min(self.latency.backlog_ms(where[m]) for m in candidates)
            loss = self._displacement(pool, candidates, backlog)
            best = max(pool, key=lambda m: (self.ap[m] - loss[m], -predicted[m]))
            self.governor.admitted(self.latency.cost_ms(best))
            self.governor.saw_budget(budget)
            return self._pick(Decision(best, tier.name if tier else None, budget,
                                       predicted[best], False, priority, where[best]))
        self.governor.saw_budget(budget)
        fastest = min(candidates, key=lambda m: predicted[m])
        if tier is not None and self._degradable(req, tier):
            self.governor.admitted(self.latency.cost_ms(fastest))
            return self._pick(Decision(fastest, tier.name, budget, predicted[fastest], True,
                                       priority, where[fastest]))
        raise self._shed(budget, fastest, predicted[fastest])

    def reroute(self, decision: Decision, elapsed_ms: float, ready: Placement,
                tried: Iterable[str]) -> Decision | None:
        """The same model on another endpoint, after ``decision``'s endpoint failed
        (detection is idempotent): the nearest one not ``tried`` if the answer
        would still come in budget (a degraded answer: any), else None."""
        endpoints = [e for e in ready.get(decision.model, ()) if e not in set(tried)]
        if not endpoints:
            return None
        endpoint, backlog = self._nearest(decision.model, endpoints)
        predicted = (elapsed_ms + self.overhead_ms + backlog
                     + self.latency.service_ms(decision.model))
        if not decision.degraded and not self.fits(predicted, decision.budget_ms):
            return None
        return self._pick(replace(decision, endpoint=endpoint, predicted_ms=predicted))


def placement(ready: Placement | Iterable[str]) -> dict[str, list[str]]:
    """Model -> endpoints; a plain list of models means one endpoint (``LOCAL``)."""
    if isinstance(ready, Mapping):
        return {m: list(endpoints) for m, endpoints in ready.items()}
    return {m: [LOCAL] for m in ready}
