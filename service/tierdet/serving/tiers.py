"""Tiers: named latency budgets with the models they may use.

A request names a tier (or none: the default tier applies). The built-in
tiers are below; ``TIERDET_TIERS_FILE`` replaces them (YAML: ``tiers: {name:
{budget_ms, models, degrade, priority}}``, ``default: name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
