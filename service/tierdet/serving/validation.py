"""Validation: the wire options, the caller's grant and what is served now,
made one frozen request before any byte of the image is decoded.

Front ends parse their wire formats into the contract's ``DetectOptions``;
``Validator.validate`` checks them and resolves, once, every choice that does
not depend on the image: the routing request inside the caller's grant (the
tier, the budget, the models it may use), the ready models that may answer
(a pinned model, the tier's list, the grant, the classes asked for), each
candidate's class filter, the score threshold and the detection limit, and
whether to tile. The use case then works on a ``ValidRequest`` and never
reads the raw options again (the access log still names what was asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import DetectOptions
from tierdet.registry.labels import LabelSet
from tierdet.registry.specs import ModelSpec
from tierdet.serving import postprocess
from tierdet.serving.catalog import Catalog
from tierdet.serving.routing import Router, RouteRequest
from tierdet.serving.security import ApiKey, KeyRing


@dataclass(frozen=True)
class ValidRequest:
    options: DetectOptions  # as asked: what the access log records
    route: RouteRequest  # inside the caller's grant
    candidates: tuple[str, ...]  # ready models that may answer it
    keep: dict[str, frozenset[int] | None]  # each candidate's class filter (None: all)
    threshold: float
    max_detections: int | None  # None: each model's own limit
    tiled: bool

    def limit(self, spec: ModelSpec) -> int:
        return min(self.max_detections or spec.max_detections, spec.max_detections)


class Validator:
    """Checks against the caller's grant (``keys``), the tiers (``router``) and
    what the ``catalog`` serves at the moment of the request."""

    def __init__(self, keys: KeyRing, router: Router, catalog: Catalog,
                 default_threshold: float) -> None:
        self.keys = keys
        self.router = router
        self.catalog = catalog
        self.default_threshold = default_threshold

    def confine(self, key: ApiKey | None, options: DetectOptions,
                deadline_ms: float | None) -> RouteRequest:
        """The routing request of ``options`` inside ``key``'s grant (or 403)."""
        request = RouteRequest(options.model, options.tier, options.sla_ms, deadline_ms)
        return self.keys.confine(key, request, self.router.tiers)

    def validate(self, key: ApiKey | None, options: DetectOptions,
                 deadline_ms: float | None = None) -> ValidRequest:
        route = self.confine(key, options, deadline_ms)
        served = {name: state.spec.labels for name, state in self.catalog.states.items()}
        if options.model is not None and not self.catalog.serves(options.model):
            raise ApiError(ErrorCode.UNKNOWN_MODEL, f"unknown model {options.model!r}; "
                           f"served: {', '.join(sorted(served)) or 'none'}")
        self.router.tier_for(route)  # raises on an unknown tier
        ready = self.catalog.ready_models()
        if options.model is not None and options.model not in ready:
            raise ApiError(ErrorCode.MODEL_NOT_READY, f"model {options.model} is not ready",
                           retry_after_s=2.0)
        # A pinned model is the only candidate: its classes must include those asked.
        candidates = ([options.model] if options.model is not None
                      else self._knowing(options.classes, ready, served))
        return ValidRequest(
            options, route, tuple(candidates),
            {m: postprocess.class_filter(options.classes, served[m]) for m in candidates},
            (options.score_threshold if options.score_threshold is not None
             else self.default_threshold),
            options.max_detections, options.tile == "auto")

    @staticmethod
    def _knowing(classes: Sequence[str] | None, ready: list[str],
                 served: dict[str, LabelSet]) -> list[str]:
        """Ready models whose classes include every class asked for."""
        if classes is None:
            return ready
        unknown = postprocess.unknown_classes(classes, served.values())
        if unknown:
            raise ApiError(ErrorCode.INVALID_OPTION, f"classes: unknown class(es) "
                           f"{', '.join(map(repr, unknown))}; no served model has them")
        knowing = [m for m in ready if postprocess.knows_classes(classes, served[m])]
        if not knowing and ready:
            raise ApiError(ErrorCode.INVALID_OPTION,
                           f"classes: no ready model has all of {', '.join(classes)}")
        return knowing
