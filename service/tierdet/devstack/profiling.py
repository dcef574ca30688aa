"""``tierdet profile``: measure latency per model and batch size through Triton."""

from __future__ import annotations

import statistics
import time

import numpy as np

from tierdet.registry.profile import LatencyProfile, ModelProfile, machine_id
from tierdet.serving.triton import TritonClient


async def measure(triton_url: str, models: dict[str, int], batches: tuple[int, ...] = (1, 2, 4, 8),
                  runs: int = 10, warmup: int = 2, api_key: str | None = None
                  ) -> LatencyProfile:
    """Median latency per (model, batch) through Triton, one request at a time.

    ``models`` maps model name -> input size. Inputs are mid-grey images:
    the graphs' cost does not depend on pixel values except for NMS, which
    is bounded by the fixed top-k. ``api_key``: Triton's restricted-API key, so
    inputs go through shared memory as the gateway sends them.
    """
    client = TritonClient(triton_url, api_key=api_key)
    profile = LatencyProfile(machine=machine_id())
    try:
        for name, size in models.items():
            timings: dict[int, float] = {}
            for batch in batches:
                images = np.full((batch, size, size, 3), 114, np.uint8)
                samples = []
                for i in range(warmup + runs):
                    start = time.perf_counter()
                    await client.infer(name, images, timeout_s=120.0)
                    if i >= warmup:
                        samples.append((time.perf_counter() - start) * 1e3)
                timings[batch] = statistics.median(samples)
            profile.models[name] = ModelProfile(timings)
    finally:
        await client.close()
    return profile
