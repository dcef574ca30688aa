"""Running a decided batch at Triton: the deadline and priority travel with the
call, and an endpoint found gone (unreachable, or without the model) leaves
the pool while the call goes to the next endpoint with the model, for as long
as the budget allows. The latency model learns from every answered call."""

from __future__ import annotations

import time

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving import tracing
from tierdet.serving.backend import Backend
from tierdet.serving.catalog import Catalog
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import EndpointPool
from tierdet.serving.routing import Decision, Router
from tierdet.serving.turns import DeviceTurns

# Errors after which the same call may go to another endpoint: the endpoint is
# gone (or lost the model); nothing was computed, detection is idempotent.
FAILOVER = {ErrorCode.TRITON_UNAVAILABLE, ErrorCode.MODEL_NOT_READY}


class Infer:
    def __init__(self, pool: EndpointPool, router: Router, catalog: Catalog, metrics: Metrics,
                 request_timeout_s: float, turns: DeviceTurns | None = None) -> None:
        self.pool = pool
        self.turns = turns or DeviceTurns(enabled=False)
        self.router = router
        self.catalog = catalog
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s

    def backend(self, decision: Decision) -> Backend:
        endpoint = self.pool.endpoints.get(decision.endpoint)
        if endpoint is None:  # left the pool since the decision (re-resolved away)
            raise ApiError(ErrorCode.TRITON_UNAVAILABLE, "the inference server left the pool",
                           retry_after_s=1.0)
        return endpoint.backend

    async def run(self, decision: Decision, batch: np.ndarray, start: float
                     ) -> tuple[np.ndarray, Decision]:
        """Run ``batch`` at the decision's endpoint; where that endpoint is gone,
        at the next one with the model while the budget allows. Returns the rows
        and the decision that answered."""
        tried: list[str] = []
        while True:
            timeout_s = (self.request_timeout_s if decision.degraded
                         else decision.timeout_s((time.perf_counter() - start) * 1e3))
            with self.router.dispatch(decision.model, decision.endpoint) as run, \
                    tracing.span("triton", model=decision.model, endpoint=decision.endpoint,
                                 timeout_ms=round(timeout_s * 1e3, 1)):
                try:
                    async with self.turns.turn(decision.endpoint, decision.model,
                                               timeout_s) as waited_s:
                        t0 = time.perf_counter()  # Triton's time: the turn's wait is not
                        rows = await self.backend(decision).infer(
                            decision.model, batch, timeout_s=timeout_s - waited_s,
                            priority=decision.priority)
                        took_ms = (time.perf_counter() - t0) * 1e3
                except ApiError as exc:
                    failure = exc
                else:
                    if len(batch) == 1:  # the latency model learns single images only
                        run.observe(took_ms)
                    self.metrics.triton_requests.labels(decision.endpoint, "ok").inc()
                    return rows, decision
            if failure.code not in FAILOVER:
                self.metrics.triton_requests.labels(decision.endpoint, "error").inc()
                raise failure
            self.metrics.triton_requests.labels(decision.endpoint, "unavailable").inc()
            if failure.code == ErrorCode.TRITON_UNAVAILABLE:
                self.pool.mark_down(decision.endpoint)
            else:
                self.pool.model_gone(decision.endpoint, decision.model)
            tried.append(decision.endpoint)
            retry = self.router.reroute(decision, (time.perf_counter() - start) * 1e3,
                                        self.catalog.placement([decision.model]), tried)
            if retry is None:
                raise failure
            decision = retry
