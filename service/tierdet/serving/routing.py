"""Route each request to the most accurate model that can answer within its budget.

For every candidate the router predicts when the answer would be ready:

    predicted = elapsed (decode so far)
              + backlog (work queued on the endpoint's device, all models)
              + service time of this model at batch 1 on that device
              + fixed gateway overhead

and picks the highest-AP model whose prediction, with a safety margin,
fits the budget, on the endpoint (Triton server) where it would finish
first. Each endpoint's device is treated as shared: on a CPU (and largely on
one GPU) every model's requests compete for the same cores, so a long D1
backlog slows a D0 answer too. Backlogs and service times are the latency
model's (``latency``: every gateway's work at Triton, each device's speed).
When nothing fits the request is shed at once (or, where its tier allows,
served by the fastest model and marked degraded): work that cannot make its
deadline is never queued.

Among the models that fit, each is worth its AP times the chance that its
answer comes in budget, read from how recent answers ran against their
predictions: a model that only just fits is worth less than a slightly less
accurate one with room to spare. A bigger one is worth its accuracy only if its
extra device time does not push other requests out of their budgets: each
candidate's AP is discounted by the AP expected to be lost to requests with
tighter budgets that would arrive while its work is queued (from the budgets
seen recently). A load governor also keeps the projected device utilization
under a target.

AP measured on different data sets does not compare (a model fine-tuned on
six shapes scores 85 where a COCO detector scores 30): the router ranks only
models of one label set against each other. A request that several label
sets could answer goes to the default one's models (COCO's, unless the
gateway says otherwise); one that classes or a pinned model confine to
another set is routed within that set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.backend import QueueReport
from tierdet.serving.calibration import Calibration
from tierdet.serving.governor import LoadGovernor
from tierdet.serving.latency import LOCAL, Dispatch, LatencyModel
from tierdet.serving.tiers import Tier, TierConfig

Placement = Mapping[str, Iterable[str]]  # model -> endpoints that have it ready
# Two endpoints' estimates for a model closer than this ratio read like devices.
LIKE_DEVICES = 1.25


@dataclass(frozen=True)
class RouteRequest:
    """What the client asked for; every field optional."""

    model: str | None = None
    tier: str | None = None
    sla_ms: float | None = None
    deadline_ms: float | None = None  # e.g. the gRPC call deadline, from now
    # The only models it may be routed to (an API key's grant); None: any.
    allowed: tuple[str, ...] | None = None


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


class Router:
    """``ap``: model -> the AP (percent) it is ranked by; models not in it are never
    routed to. The catalog updates it as it learns what each model serves.
    ``label_sets``: model -> the name of its label set (absent: the default's)."""

    def __init__(self, ap: Mapping[str, float], tiers: TierConfig,
                 latency: LatencyModel, default_budget_ms: float,
                 margin_frac: float = 0.15, margin_ms: float = 5.0,
                 overhead_ms: float = 3.0, governor: LoadGovernor | None = None,
                 calibrate_quantile: float = 0.0, label_sets: Mapping[str, str] | None = None,
                 default_label_set: str = "coco", shared_device: bool = False) -> None:
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
        self.shared_device = shared_device
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

    # -- what the router learns, and what it tells ------------------------

    def observe_queues(self, queues: Mapping[str, tuple[float, QueueReport]]) -> None:
        """Every endpoint's Triton queue and device account (the queue watcher's)."""
        self.latency.observe_queues(queues)

    def learn(self, decision: Decision, actual_ms: float) -> float:
        """How an admitted decision's answer turned out (a degraded one was never
        predicted to fit); the calibration factor predictions are scaled by now."""
        if not decision.degraded:
            self.calibration.observe(decision.predicted_ms, actual_ms, decision.budget_ms)
        return self.calibration.factor

    def rank(self, model: str, ap: float) -> None:
        """The AP (percent) ``model`` is ranked by from now on."""
        self.ap[model] = ap

    def label_set(self, model: str) -> str:
        """The name of ``model``'s label set (its APs compare only within it)."""
        return self.label_sets.get(model, self.default_label_set)

    def idle(self, endpoint: str = LOCAL) -> bool:
        """Whether ``endpoint``'s device has nothing queued or running that the
        gateway knows of (its own work, Triton's last queue report)."""
        return self.latency.idle(endpoint)

    def service_ms(self, model: str, endpoint: str | None = None) -> float:
        """The current estimate of one request's Triton time at batch 1 on
        ``endpoint`` (None: the mean over the endpoints that serve it)."""
        return self.latency.service_ms(model, endpoint)

    def profiled(self, model: str) -> bool:
        return model in self.latency.profile.models

    def room_for_views(self, decision: Decision, elapsed_ms: float, view_extra_ms: float
                       ) -> tuple[int, float]:
        """How many more views of the decided model (tiles, in the same batch) fit
        in what its budget leaves beside the prediction, and what each adds:
        the model's marginal device time plus ``view_extra_ms`` (its letterbox)."""
        per_view = self.latency.cost_ms(decision.model, decision.endpoint) + view_extra_ms
        factor = self.calibration.factor
        spare = decision.budget_ms - elapsed_ms - self.margin_ms - decision.predicted_ms * factor
        return (int(spare / factor // per_view) if spare > 0 else 0), per_view

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
            if req.allowed is not None and req.model not in req.allowed:
                raise ApiError(ErrorCode.FORBIDDEN, f"model {req.model} is outside the grant")
            return [req.model]
        allowed = tier.models if tier and tier.models else tuple(ready)
        candidates = [m for m in allowed if m in ready and m in self.ap
                      and (req.allowed is None or m in req.allowed)]
        if not candidates:
            raise ApiError(ErrorCode.MODEL_NOT_READY, "no model is ready for this request",
                           retry_after_s=2.0)
        return self._one_label_set(candidates)

    def _one_label_set(self, candidates: list[str]) -> list[str]:
        """The candidates whose APs compare: all of them when they share a label
        set, else the default set's (an ``invalid_option`` when it has none)."""
        sets = {self.label_set(m) for m in candidates}
        if len(sets) == 1:
            return candidates
        if self.default_label_set in sets:
            return [m for m in candidates if self.label_set(m) == self.default_label_set]
        raise ApiError(ErrorCode.INVALID_OPTION,
                       f"models of different label sets ({', '.join(sorted(sets))}) could "
                       "answer, and their APs do not compare: name a model, or classes "
                       "that only one label set has")

    def _nearest(self, model: str, endpoints: Iterable[str]) -> tuple[str, float]:
        """The endpoint where ``model``'s answer would come first, and the device time
        until then (backlog + service). Among devices alike for it (``LIKE_DEVICES``:
        reads apart by noise) the work that starts first wins; ties (an idle pool) go
        to the fewest of our requests, then the least recently chosen: load spreads."""
        service = {e: self.latency.service_ms(model, e) for e in list(endpoints) or [LOCAL]}
        fastest = min(service.values())
        _, _, _, best, device_ms = min(
            (backlog + (fastest if ms <= LIKE_DEVICES * fastest else ms),
             self.latency.inflight(e), self._picked.get(e, 0), e, backlog + ms)
            for e, ms in service.items() for backlog in [self.latency.backlog_ms(e)])
        return best, device_ms

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
            where[m], device_ms = self._nearest(m, ready.get(m, ()))
            predicted[m] = (elapsed_ms + self.overhead_ms
                            + device_ms * self._stretch(m, candidates, ready))
        return predicted, where

    def _stretch(self, model: str, candidates: Iterable[str], ready: Placement) -> float:
        """How much longer ``model``'s work takes while other models' arrive and
        run beside it (``shared_device``: a CPU, where Triton runs each model's
        executions on the same cores at once): with a share u of the device
        taken by them, the work gets 1 - u of it (processor sharing). 1.0
        without ``shared_device`` or other work."""
        if not self.shared_device:
            return 1.0
        others = self.governor.others_load(model, len(_endpoints(candidates, ready)))
        return 1.0 / (1.0 - min(0.75, others))

    def _displacement(self, pool: list[str], candidates: list[str], backlog: float,
                      where: Mapping[str, str]) -> dict[str, float]:
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
        fastest = min(candidates, key=lambda m: self.latency.service_ms(m, where[m]))
        base = self.overhead_ms + self.latency.service_ms(fastest, where[fastest])
        base_cost = self.latency.cost_ms(fastest, where[fastest])
        loss: dict[str, float] = {}
        for m in pool:
            cost = self.latency.cost_ms(m, where[m])
            extra = cost - base_cost
            if extra <= 0 or not budgets:
                loss[m] = 0.0
                continue
            pushed = sum(1 for b in budgets
                         if self.fits(base, b) and not self.fits(base + extra, b))
            exposure_s = (backlog + cost) / 1e3
            chance = 1.0 - math.exp(-pushed / self.governor.window_s * exposure_s)
            loss[m] = chance * self.ap.get(fastest, 0.0)
        return loss

    def _expected_ap(self, model: str, predicted_ms: float, budget_ms: float,
                     req: RouteRequest) -> float:
        """``model``'s AP times the chance its answer comes in budget, from how
        recent answers ran against their predictions: a model that fits with
        room to spare is worth more than a slightly more accurate one that
        just fits (a late answer is worth nothing). A pinned model: its AP."""
        if req.model is not None:
            return self.ap.get(model, 0.0)
        chance = self.calibration.chance_within(predicted_ms, budget_ms - self.margin_ms)
        return self.ap.get(model, 0.0) * chance

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
            # Demand counts (decide() counts the rest): else refusing more reads as less load.
            self.governor.arrival()
            self.governor.saw_budget(budget)
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
            endpoints = _endpoints(candidates, ready)
            others = self.latency.others_share(endpoints)
            cost = {m: self.latency.cost_ms(m, where[m]) for m in candidates}
            affordable = [m for m in fitting if req.model is not None or self.governor.affordable(
                cost[m], len(endpoints), others)]
            pool = affordable or [min(fitting, key=cost.__getitem__)]
            backlog = min(self.latency.backlog_ms(where[m]) for m in candidates)
            loss = self._displacement(pool, candidates, backlog, where)
            # A pinned model may not be ranked (yet): it is the only candidate anyway.
            best = max(pool, key=lambda m: (self._expected_ap(m, predicted[m], budget, req)
                                            - loss[m], -predicted[m]))
            self.governor.admitted(cost[best], best)
            self.governor.saw_budget(budget)
            return self._pick(Decision(best, tier.name if tier else None, budget,
                                       predicted[best], False, priority, where[best]))
        self.governor.saw_budget(budget)
        fastest = min(candidates, key=lambda m: predicted[m])
        if tier is not None and self._degradable(req, tier):
            self.governor.admitted(self.latency.cost_ms(fastest, where[fastest]), fastest)
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
        endpoint, device_ms = self._nearest(decision.model, endpoints)
        predicted = elapsed_ms + self.overhead_ms + device_ms * self._stretch(
            decision.model, [decision.model], ready)
        if not decision.degraded and not self.fits(predicted, decision.budget_ms):
            return None
        return self._pick(replace(decision, endpoint=endpoint, predicted_ms=predicted))


def _endpoints(models: Iterable[str], ready: Placement) -> set[str]:
    """The endpoints whose devices ``models`` share."""
    return {e for m in models for e in ready.get(m, ())}


def placement(ready: Placement | Iterable[str]) -> dict[str, list[str]]:
    """Model -> endpoints; a plain list of models means one endpoint (``LOCAL``)."""
    if isinstance(ready, Mapping):
        return {m: list(endpoints) for m, endpoints in ready.items()}
    return {m: [LOCAL] for m in ready}
