"""Soak test (issue 7): run the stack at a fixed load for a while, watch memory.

Open-loop Poisson load (loopback only; bounded by --minutes and the rate)
through the gateway. Every ``--sample-s`` it prints the gateway's and
Triton's RSS, requests sent/answered and errors by status. At the end it
checks that every request got exactly one answer and reports RSS growth
after warm-up. Run at capacity (1x) and at 2x overload:

    python benchmarks/soak.py --minutes 30 --load 1.0
    python benchmarks/soak.py --minutes 5 --load 2.0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from tierdet.build.models import default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import GatewayProcess, start_triton

sys.path.insert(0, str(Path(__file__).parent))
from load import closed_loop, photo_jpeg


def rss_mb(pid: int) -> float:
    """RSS of a process and its children (Triton's python stubs), in MiB."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total / 2**20


async def soak(base: str, image: bytes, rate: float, seconds: float, sample_s: float,
               pids: dict[str, int], fields: dict[str, str]) -> dict:
    statuses: collections.Counter[int] = collections.Counter()
    answered = 0
    sent = 0
    samples: list[tuple[float, dict[str, float]]] = []

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal answered
        try:
            r = await client.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")},
                                  data=fields)
            statuses[r.status_code] += 1
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1
        answered += 1

    rng = random.Random(0)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as client:
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        next_at, next_sample = 0.0, 0.0
        while next_at < seconds:
            now = time.perf_counter() - start
            if now >= next_sample:
                mem = {name: rss_mb(pid) for name, pid in pids.items()}
                samples.append((now, mem))
                print(f"  t={now:6.0f}s sent={sent:6d} answered={answered:6d} "
                      + " ".join(f"{k}={v:7.1f}MiB" for k, v in mem.items())
                      + f" statuses={dict(statuses)}", flush=True)
                next_sample += sample_s
            next_at += rng.expovariate(rate)
            delay = start + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
    samples.append((time.perf_counter() - start, {n: rss_mb(p) for n, p in pids.items()}))
    return {"sent": sent, "answered": answered, "statuses": dict(statuses), "samples": samples}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientdet-d0")
    p.add_argument("--weights", default="random:0")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--load", type=float, default=1.0, help="multiple of measured capacity")
    p.add_argument("--sla-ms", type=float, default=1000.0, help="budget sent with each request")
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--home", type=Path, default=default_home())
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tierdet-soak-"))
    built = ensure_built([args.model], WeightsSource.parse(args.weights), args.home)
    triton = start_triton(built, args.home, work, threads=2)
    gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log")
    try:
        image = photo_jpeg()
        outcomes, wall = asyncio.run(closed_loop(gateway.http, image, {"model": args.model},
                                                 concurrency=4, count=60))
        capacity = len(outcomes) / wall
        rate = args.load * capacity
        print(f"capacity {capacity:.1f} req/s; soaking at {args.load:.1f}x = {rate:.1f} req/s "
              f"for {args.minutes:g} min, budget {args.sla_ms:g} ms", flush=True)
        pids = {"gateway": gateway.process.pid, "triton": triton.process.pid}
        result = asyncio.run(soak(gateway.http, image, rate, args.minutes * 60, args.sample_s,
                                  pids, {"sla_ms": str(args.sla_ms)}))
    finally:
        gateway.stop()
        triton.stop()
    samples = result["samples"]
    warm = [m for t, m in samples if t >= args.minutes * 60 * args.warmup_fraction]
    print("\n== soak result ==")
    print(f"  sent {result['sent']}, answered {result['answered']} "
          f"(exactly one answer each: {result['sent'] == result['answered']}), "
          f"statuses {result['statuses']}")
    for name in ("gateway", "triton"):
        first, last = warm[0][name], warm[-1][name]
        peak = max(m[name] for m in warm)
        print(f"  {name}: RSS after warm-up {first:.1f} MiB -> end {last:.1f} MiB "
              f"({(last - first) / first:+.1%}), peak {peak:.1f} MiB")
    return 0 if result["sent"] == result["answered"] else 1


if __name__ == "__main__":
    sys.exit(main())
