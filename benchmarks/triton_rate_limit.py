"""Does Triton's rate limiter serve a CPU's models one execution at a time without stalls?

Serves two ladder models (the shipped cards' yolox-nano-320 and picodet-s-416)
from the local tritonserver twice, with the rate limiter on (a global resource
of which the server has one, named in every model's instance group) and off,
and sends the same seeded Poisson arrivals (each request one of the two models)
through the gateway's own Triton client. Prints each model's latency alone
(median of 10) and under load (p50, p90, p99, max) for both servers. Measured
here (pip tritonserver, 2 cores): quiet, 25 requests/s, no stall (picodet-s-416
p99 100 ms with the rate limiter, 234 ms without; yolox-nano-320 119 and 53 ms);
with other heavy processes on the cores, 15 requests/s, p50 846 ms with it and
43 ms without (a first version of this script).

    python benchmarks/triton_rate_limit.py [--rate 15] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tierdet.build.models import BuiltModel, assemble, default_home, ensure_cards
from tierdet.devstack.stack import free_port
from tierdet.devstack.triton import LocalTriton, local_api_key
from tierdet.registry.cards import shipped_cards
from tierdet.serving.triton import TritonClient

MODELS = ("yolox-nano-320", "picodet-s-416")
RESOURCE = "cpu-device"
LIMITED = ["--rate-limit=execution_count", f"--rate-limit-resource={RESOURCE}:1"]


def rate_limited(config: Path) -> None:
    """Every instance of the model takes the one resource while it executes."""
    text = config.read_text()
    text = re.sub(r"instance_group \[ \{ kind: KIND_CPU count: (\d+) \} \]",
                  r"instance_group [ { kind: KIND_CPU count: \1 rate_limiter { resources "
                  rf'[ {{ name: "{RESOURCE}" global: true count: 1 }} ] }} }} ]', text)
    assert RESOURCE in text, "the config's instance group changed: update this script"
    config.write_text(text)


async def measure(url: str, sizes: dict[str, int], rate: float, count: int, seed: int
                  ) -> tuple[dict[str, float], dict[str, list[float]]]:
    client = TritonClient(url, api_key=local_api_key())
    images = {m: np.full((1, s, s, 3), 114, np.uint8) for m, s in sizes.items()}
    alone: dict[str, float] = {}
    for model, image in images.items():
        times = []
        for i in range(13):  # 3 to warm up
            start = time.perf_counter()
            await client.infer(model, image, timeout_s=60.0)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
        alone[model] = statistics.median(times)
    loaded: dict[str, list[float]] = {m: [] for m in sizes}

    async def one(model: str) -> None:
        start = time.perf_counter()
        await client.infer(model, images[model], timeout_s=60.0)
        loaded[model].append((time.perf_counter() - start) * 1e3)

    rng = random.Random(seed)
    tasks, start, at = [], time.perf_counter(), 0.0
    for _ in range(count):
        at += rng.expovariate(rate)
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rng.choice(list(sizes)))))
    await asyncio.gather(*tasks)
    await client.close()
    return alone, loaded


def serve(built: list[BuiltModel], home: Path, limited: bool, rate: float, count: int,
          seed: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="tierdet-rate-limit-") as tmp:
        work = Path(tmp)
        repository = assemble(built, work / "home", "cpu-local")
        if limited:
            for model in MODELS:
                rate_limited(repository / model / "config.pbtxt")
        server = LocalTriton(repository, work, http_port=free_port(), grpc_port=free_port(),
                             metrics_port=free_port(), models=list(MODELS),
                             log_path=work / "triton.log",
                             extra_args=LIMITED if limited else [])
        server.start()
        try:
            server.wait_ready(300)
            sizes = {b.spec.name: b.spec.input_size for b in built}
            return asyncio.run(measure(server.grpc_url, sizes, rate, count, seed))
        finally:
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=15.0, help="requests per second")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--home", type=Path, default=default_home())
    args = p.parse_args()
    built = [b for b in ensure_cards(shipped_cards(), args.home) if b.spec.name in MODELS]
    for limited in (True, False):
        alone, loaded = serve(built, args.home, limited, args.rate, args.requests, args.seed)
        print(f"rate limiter {'on ' if limited else 'off'} at {args.rate:g}/s: alone "
              + ", ".join(f"{m} {ms:.1f} ms" for m, ms in alone.items()) + " | "
              + " | ".join(f"{m} p50 {np.percentile(v, 50):.0f} p90 {np.percentile(v, 90):.0f}"
                           f" p99 {np.percentile(v, 99):.0f} max {max(v):.0f} ms"
                           for m, v in loaded.items()), flush=True)


if __name__ == "__main__":
    main()
