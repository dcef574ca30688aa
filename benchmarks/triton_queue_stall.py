"""Does Triton's dynamic batcher stall requests when priorities or a queue policy are set?

Serves one model from the local tritonserver four times, with the
``dynamic_batching`` block as rendered for the container targets (priority
levels + queue policy), with only one of the two, and as rendered for
``cpu-local`` (neither). Each time it sends rounds of 8 requests that arrive
spread over 30 ms (as a gateway's requests do, not all at once) through the
gateway's own async Triton client, and prints the latency median, p99 and
max. Measured here (pip tritonserver, damoyolo-ns-shapes): p99 ~570 ms with
either setting, ~90 ms with neither.

    python benchmarks/triton_queue_stall.py [--model damoyolo-ns-shapes] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tierdet.build.models import build_model, default_home
from tierdet.build.repository import render_config
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import start_triton
from tierdet.devstack.triton import API_KEY_ENV
from tierdet.registry.specs import SPECS
from tierdet.registry.trained import CHECKPOINTS
from tierdet.serving.triton import TritonClient

REPO = Path(__file__).resolve().parents[1]
POLICY = re.compile(r"  default_queue_policy \{[^}]*\}\n")
PRIORITY = re.compile(r"  priority_levels: \d+\n  default_priority_level: \d+\n")


def variants(container_config: str) -> dict[str, str]:
    return {"priorities + queue policy (container targets)": container_config,
            "queue policy only": PRIORITY.sub("", container_config),
            "priorities only": POLICY.sub("", container_config),
            "neither (cpu-local)": POLICY.sub("", PRIORITY.sub("", container_config))}


async def measure(url: str, model: str, tensor: np.ndarray, rounds: int) -> list[float]:
    client = TritonClient(url, api_key=os.environ.get(API_KEY_ENV))

    async def one() -> float:
        await asyncio.sleep(random.random() * 0.03)
        t0 = time.perf_counter()
        await client.infer(model, tensor[None], timeout_s=10.0)
        return (time.perf_counter() - t0) * 1e3

    latencies: list[float] = []
    for _ in range(rounds):
        latencies += await asyncio.gather(*(one() for _ in range(8)))
        await asyncio.sleep(0.3)  # idle between rounds, as real traffic is
    return latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="damoyolo-ns-shapes")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    spec = SPECS[args.model]
    weights = (str(REPO / CHECKPOINTS[spec.name]) if spec.name in CHECKPOINTS else "random")
    home = default_home()
    built = build_model(spec, WeightsSource.parse(weights), home, progress=False)
    tensor = np.random.default_rng(0).integers(0, 255, (spec.input_size,) * 2 + (3,), np.uint8)
    # cpu-local's config with the container targets' dynamic_batching block.
    local = render_config(spec, "cpu-local")
    block = re.search(r"dynamic_batching \{.*?\n\}\n", render_config(spec, "cpu"), re.S)[0]
    container_like = re.sub(r"dynamic_batching \{.*?\n\}\n", lambda _: block, local, flags=re.S)
    random.seed(0)
    print(f"{args.model}: {args.rounds} rounds of 8 requests spread over 30 ms")
    for label, text in variants(container_like).items():
        with tempfile.TemporaryDirectory() as tmp:
            server = start_triton([built], home, Path(tmp), threads=2)
            try:
                config = next(Path(server.repository).rglob(f"{spec.name}/config.pbtxt"))
                config.write_text(text.replace(
                    'parameters { key: "intra_op_threads" value { string_value: "0" } }',
                    'parameters { key: "intra_op_threads" value { string_value: "2" } }'))
                # Explicit model control: loading again re-reads the config.
                grpcclient.InferenceServerClient(server.grpc_url).load_model(
                    spec.name, headers=server.grpc_key_header())
                ms = sorted(asyncio.run(measure(server.grpc_url, spec.name, tensor,
                                                args.rounds)))
            finally:
                server.stop()
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        print(f"  {label:<46} median {statistics.median(ms):6.1f} ms  p99 {p99:6.1f} ms  "
              f"max {ms[-1]:6.1f} ms  (>300 ms: {sum(m > 300 for m in ms)}/{len(ms)})")


if __name__ == "__main__":
    main()
