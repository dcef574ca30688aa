"""How one image went: the decision, the result or the error, for its
access-log line, its span and the metrics a failure is counted under."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import DetectOptions
from tierdet.contract.results import DetectResult
from tierdet.registry.specs import lookup
from tierdet.serving import imaging
from tierdet.serving.routing import Decision


@dataclass
class Outcome:
    """How one image went, for its access-log line and its metrics."""

    options: DetectOptions
    decision: Decision | None = None
    result: DetectResult | None = None
    code: ErrorCode | None = None
    view: tuple[np.ndarray, imaging.Geometry] | None = None  # the whole view's rows

    def labels(self) -> tuple[str | None, str]:
        """(tier, model) to count a failure under: the decision's, else what was
        asked (a model only if it exists: callers do not make metric labels)."""
        if self.decision is not None:
            return self.decision.tier, self.decision.model
        model = self.options.model
        return self.options.tier, model if model and lookup(model) else "none"

    def access_fields(self, http: bool, item: int | None, latency_ms: float,
                      image_bytes: int) -> dict[str, object]:
        """The image's access-log line (and span attributes): the decision's
        facts where there was one, else what was asked."""
        code, decision, result, options = self.code, self.decision, self.result, self.options
        if code is None:
            status: int | str = 200 if http else "OK"
        else:
            status = code.kind.http_status if http else code.kind.grpc_status
        return dict(
            item=item, code=code.value if code else "ok", status=status,
            tier=decision.tier if decision else options.tier,
            budget_ms=decision.budget_ms if decision else options.sla_ms,
            model=decision.model if decision else options.model,
            endpoint=decision.endpoint if decision else None,
            predicted_ms=round(decision.predicted_ms, 1) if decision else None,
            latency_ms=round(latency_ms, 1), image_bytes=image_bytes,
            width=result.width if result else None, height=result.height if result else None,
            tiles=result.routing.tiles if result else None)


def code_of(exc: BaseException) -> ErrorCode:
    if isinstance(exc, ApiError):
        return exc.code
    return ErrorCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else ErrorCode.INTERNAL
