"""How many tiles a request's budget leaves room for beside the whole view."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tierdet.registry.specs import get_spec
from tierdet.serving import decoding, tiling
from tierdet.serving.routing import Decision, Router


@dataclass
class TileBudget:
    router: Router
    prep_ms: float = 2.0  # letterbox of one tile, learnt from tiled requests

    def plan(self, decision: Decision, image: decoding.Decoded, elapsed_ms: float
             ) -> tuple[list[tiling.Tile], Decision]:
        """The tiles the budget leaves room for beside the whole view (one batch:
        at most the model's batch size), and the decision with their cost in its
        prediction. Each tile costs the model's marginal device time and its
        letterbox (measured, see ``learn``)."""
        if decision.degraded:
            return [], decision
        spec = get_spec(decision.model)
        room, per_tile = self.router.room_for_views(decision, elapsed_ms, self.prep_ms)
        height, width = image.pixels.shape[:2]
        tiles = tiling.plan(width, height, spec.input_size,
                            min(spec.batching.max_batch_size - 1, room))
        return tiles, replace(decision,
                              predicted_ms=decision.predicted_ms + len(tiles) * per_tile)

    def learn(self, prep_s: float, views: int) -> None:
        """What letterboxing ``views`` views took (one whole view and its tiles)."""
        if views > 1:
            self.prep_ms += 0.2 * (prep_s * 1e3 / views - self.prep_ms)
