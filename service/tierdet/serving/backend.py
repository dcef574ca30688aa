"""What the use case needs from an inference server: the ``Backend`` protocol.

``tierdet.serving.triton.TritonClient`` is the real one (async gRPC to
Triton). Unit tests of the use case drive an in-process fake instead, so they
run in milliseconds; every test of the serving path itself runs a real
tritonserver. Every failure is an ``ApiError`` with a stable code.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class QueueReport:
    """One server's queue as it reports it, per model, from every client."""

    pending: dict[str, int]  # requests waiting in its scheduler now
    arrived: dict[str, int]  # requests taken in since it started (answered, failed, waiting)
    # Cumulative since it started, per model: what the device did with them.
    served: dict[str, Served] = field(default_factory=dict)


@dataclass(frozen=True)
class Served:
    """A model's cumulative counts at one server: requests answered, the time
    they waited in its queue, images inferred, executions (batches) run, and
    the time the device spent on them (each request counts its batch's run)."""

    requests: int = 0
    queue_us: float = 0.0
    images: int = 0
    executions: int = 0
    compute_us: float = 0.0


class Backend(Protocol):
    def input_buffer(self, shape: tuple[int, ...]) -> AbstractContextManager[np.ndarray]:
        """A writable uint8 array of ``shape`` to prepare one call's input in, for
        the block's duration; ``infer`` of it may then send it without a copy."""
        ...

    async def infer(self, model: str, images: np.ndarray, timeout_s: float,
                    priority: int = 0) -> np.ndarray:
        """uint8 [B, S, S, 3] -> detection rows [B, K, 6], within ``timeout_s``."""
        ...

    async def repository_models(self, timeout_s: float = 2.0) -> dict[str, tuple[str, str]]:
        """Model name -> (state, reason): READY, UNAVAILABLE (reason: the load error), ..."""
        ...

    async def load_model(self, model: str, timeout_s: float = 300.0) -> None:
        """Load (or reload, at its newest version) ``model`` from the server's repository."""
        ...

    async def unload_model(self, model: str, timeout_s: float = 30.0) -> None:
        """Unload ``model`` once the requests the server holds for it finish."""
        ...

    async def provenance(self, model: str, timeout_s: float = 2.0) -> dict[str, str]:
        """What the build recorded about the model (weights, digests, measured AP)."""
        ...

    async def batch_executions(self, model: str, timeout_s: float = 2.0) -> dict[int, int]:
        """Cumulative executions per batch size."""
        ...

    async def queued(self, metrics_url: str, timeout_s: float = 0.5) -> QueueReport:
        """The server's queue per model, every client's requests."""
        ...

    async def close(self) -> None: ...
