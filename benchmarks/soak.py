"""Soak tests (issues 7 and 27): the stack under load for a while, memory watched.

Loopback only, bounded by --minutes (with --mix also --requests). Every
--sample-s a line gives the gateway's and Triton's RSS (children included).

Default (issue 7): open-loop Poisson load on one zoo model (random weights)
at a multiple of its measured capacity; exit 1 if a request got no answer:

    python benchmarks/soak.py --minutes 30 --load 1.0
    python benchmarks/soak.py --minutes 5 --load 2.0

--mix (issue 27, finding 8): the real COCO ladder as `tierdet up` serves it by
default (the shipped cards and tiers); four closed-loop clients draw each
request: 80% a COCO val2017 photograph (../shared/data/coco-val2017-128) with
no tier, each named tier or an sla_ms; 10% a case of the v1 bad-input corpus
(tests/corpus.py), which must get its own 4xx and error code; 5% a 4000x3000
photograph with tile=auto; 5% a photograph over gRPC (Detector.Detect);
/healthz polled every second. It prints the outcomes per kind, transport
errors, and the RSS at rest after warm-up (at --warmup-fraction of the run the
clients hold until none has been in flight for 2 s) and at the end, min/max and the trend;
exit 1 if a request got no answer or a wrong one, a health poll failed, or the
gateway's RSS at the end is more than 5% from its RSS after warm-up. The
30-minute run (figures: docs/performance.md, from the run):

    python benchmarks/soak.py --mix --minutes 30
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
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import httpx
import numpy as np
from tierdet.build.models import default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import GatewayProcess, start_triton
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import BAD_REQUESTS, MAX_IMAGE_BYTES
from decode_scale import COCO
from load import (
    Sample,
    answer,
    closed_loop,
    health,
    ladder_stack,
    photo_jpeg,
    report_rss,
    rss_by_mapping,
    sample,
)

KINDS = {"photo": 0.80, "bad": 0.10, "tiled": 0.05, "grpc": 0.05}  # shares of --mix
CLIENTS = 4
RSS_TARGET = 0.05  # the gateway ends within 5% of its RSS after warm-up
# "At rest": no request in flight for this long (the gateway hands what its
# allocator kept back to the kernel after a second without requests).
REST_S = 2.0


async def soak(base: str, image: bytes, rate: float, seconds: float, sample_s: float,
               pids: dict[str, int], fields: dict[str, str]) -> dict:
    """Open-loop Poisson arrivals of one image at ``rate``/s for ``seconds``."""
    statuses: collections.Counter[int | str] = collections.Counter()
    answered = sent = 0
    samples: list[Sample] = []

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal answered
        try:
            r = await client.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")},
                                  data=fields)
            statuses[r.status_code] += 1
            answered += 1  # an HTTP answer: a transport error is none
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1

    rng = random.Random(0)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as client:
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        next_at, next_sample = 0.0, 0.0
        while next_at < seconds:
            if time.perf_counter() - start >= next_sample:
                sample(start, pids, samples, f"sent={sent} answered={answered} {dict(statuses)}")
                next_sample += sample_s
            next_at += rng.expovariate(rate)
            delay = start + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule, not a wait for an event
            task = asyncio.create_task(one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
        sample(start, pids, samples, f"sent={sent} answered={answered} {dict(statuses)}")
    return {"sent": sent, "answered": answered, "statuses": dict(statuses), "samples": samples}


class NoAnswerError(Exception):
    """The request got no answer from the gateway (a transport error)."""


@dataclass
class Mix:
    """The mixed soak's requests, and the tally of what each kind got."""

    http: httpx.AsyncClient
    stub: pb_grpc.DetectorStub
    photos: list[bytes]
    large: bytes  # a 4000x3000 photograph
    routes: list[tuple[str | None, float | None]]  # (tier, sla_ms); (None, None): default
    outcomes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    wrong: collections.Counter[str] = field(default_factory=collections.Counter)

    async def one(self, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        try:
            label = await getattr(self, kind)(rng)
        except (httpx.HTTPError, NoAnswerError) as exc:
            label = f"no answer ({type(exc).__name__}: {exc})"[:80]
        self.outcomes[kind][label] += 1

    async def photo(self, rng: random.Random) -> str:
        tier, sla_ms = rng.choice(self.routes)
        fields = {k: str(v) for k, v in (("tier", tier), ("sla_ms", sla_ms)) if v is not None}
        return answer(await self.http.post("/v1/detect", data=fields, files={
            "image": ("a.jpg", rng.choice(self.photos), "image/jpeg")}))

    async def tiled(self, rng: random.Random) -> str:
        r = await self.http.post("/v1/detect", data={"tile": "auto", "tier": "accurate"},
                                 files={"image": ("big.jpg", self.large, "image/jpeg")})
        tiles = r.json()["routing"]["tiles"] if r.status_code == 200 else None
        return answer(r) + ("" if tiles is None else f" ({tiles} tiles)")

    async def bad(self, rng: random.Random) -> str:
        case, kwargs, status, code = rng.choice(BAD_REQUESTS)
        label = answer(await self.http.post("/v1/detect", **kwargs))
        if label != f"{status} {code}":
            self.wrong[f"{case}: {label}"] += 1
        return label

    async def grpc(self, rng: random.Random) -> str:
        tier, sla_ms = rng.choice(self.routes)
        request = pb.DetectRequest(image=rng.choice(self.photos), tier=tier or "")
        if sla_ms is not None:
            request.sla_ms = sla_ms
        try:
            await self.stub.Detect(request, timeout=120)
        except grpc.aio.AioRpcError as exc:
            code = dict(exc.trailing_metadata() or ()).get("tierdet-error-code")
            if code is None:  # not the gateway's refusal: the call itself failed
                raise NoAnswerError(exc.code().name) from exc
            return f"{exc.code().name} {code}"
        return "OK"

    def no_answer(self) -> int:
        return sum(n for c in self.outcomes.values() for k, n in c.items()
                   if k.startswith("no answer"))

    def summary(self) -> str:
        return " ".join(f"{k}={sum(self.outcomes[k].values())}" for k in KINDS) + \
            f" no-answer={self.no_answer()} wrong={sum(self.wrong.values())}"


def large_photo(jpeg: bytes) -> bytes:
    """A 4000x3000 JPEG of a COCO photograph (upscaled: tiling's input size)."""
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    big = cv2.resize(image, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    assert len(data) < MAX_IMAGE_BYTES, len(data)
    return data


async def mixed(gateway: GatewayProcess, pids: dict[str, int], args: argparse.Namespace
                ) -> tuple[Mix, collections.Counter[str], list[Sample], dict[str, float], float]:
    photos = [path.read_bytes() for path in sorted((COCO / "images").glob("*.jpg"))]
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=gateway.http, timeout=120.0, limits=limits) as http, \
            grpc.aio.insecure_channel(gateway.grpc) as channel:
        tiers = [t["name"] for t in (await http.get("/v1/models")).json()["tiers"]]
        routes = [(None, None), *((t, None) for t in tiers), (None, 250.0), (None, 1000.0)]
        mix = Mix(http, pb_grpc.DetectorStub(channel), photos, large_photo(photos[0]), routes)
        print(f"mixed soak: {CLIENTS} clients, {args.minutes:g} min, {len(photos)} photographs, "
              f"routes {routes}", flush=True)
        stop, polls = asyncio.Event(), collections.Counter[str]()
        samples: list[Sample] = []
        start = time.perf_counter()
        deadline, left = time.monotonic() + args.minutes * 60, [args.requests]
        # The RSS after warm-up is taken at rest, as the end's is (after the last
        # answer): the clients hold until none is in flight, then go on. A sample
        # under load moves by a 12 MP image's buffers (~10%) from one to the next.
        go, idle, busy, rest = asyncio.Event(), asyncio.Event(), [0], []
        mappings: list[dict[str, float]] = []  # the gateway's at rest (load.rss_by_mapping)
        go.set()
        idle.set()

        async def client(n: int) -> None:
            rng = random.Random(args.seed * 100 + n)
            while time.monotonic() < deadline and left[0] > 0:
                await go.wait()
                left[0], busy[0] = left[0] - 1, busy[0] + 1
                idle.clear()
                await mix.one(rng)
                busy[0] -= 1
                if not busy[0]:
                    idle.set()

        async def at_rest_after_warmup() -> None:
            with contextlib.suppress(TimeoutError):  # until the warm-up's end
                await asyncio.wait_for(stop.wait(), args.minutes * 60 * args.warmup_fraction)
            if not stop.is_set():
                go.clear()
                await idle.wait()
                await asyncio.sleep(REST_S)  # the rest's length, by definition
                sample(start, pids, samples, "at rest after warm-up: " + mix.summary())
                rest.append(samples[-1][1])
                mappings.append(rss_by_mapping(pids["gateway"]))
                go.set()

        async def sampler() -> None:
            while not stop.is_set():
                sample(start, pids, samples, mix.summary())
                with contextlib.suppress(TimeoutError):  # the sampling pace
                    await asyncio.wait_for(stop.wait(), args.sample_s)

        watchers = [asyncio.create_task(task) for task in (
            sampler(), health(gateway.http, stop, polls), at_rest_after_warmup())]
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
        wall = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*watchers)
        await asyncio.sleep(REST_S)
        sample(start, pids, samples, "at rest at the end: " + mix.summary())
        mappings.append(rss_by_mapping(pids["gateway"]))
    print("  gateway at rest by mapping (MiB, after warm-up -> end): " + ", ".join(
        f"{kind} {mappings[0].get(kind, 0):.1f} -> {mappings[-1].get(kind, 0):.1f}"
        for kind in sorted(set(mappings[0]) | set(mappings[-1]))), flush=True)
    return mix, polls, samples, (rest or [samples[-1][1]])[0], wall


def run_mix(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tierdet-soak-"))
    with ladder_stack(args.home, work, threads=args.threads,
                      max_image_bytes=str(MAX_IMAGE_BYTES)) as (triton, gateway):
        pids = {"gateway": gateway.process.pid, "triton": triton.process.pid}
        mix, polls, samples, warm, wall = asyncio.run(mixed(gateway, pids, args))
    total = sum(sum(c.values()) for c in mix.outcomes.values())
    print(f"\n== mixed soak result ({wall / 60:.1f} min, {total} requests, "
          f"{total / wall:.1f}/s) ==")
    for kind in KINDS:
        counts = mix.outcomes[kind]
        print(f"  {kind:<6} {sum(counts.values()):6d}: {dict(counts.most_common())}")
    print(f"  no answer (transport errors): {mix.no_answer()}; bad inputs answered otherwise "
          f"than the corpus says: {sum(mix.wrong.values())} {dict(mix.wrong)}")
    print(f"  /healthz polls: {dict(polls)}")
    change = report_rss(samples, args.minutes * 60 * args.warmup_fraction, warm)
    flat = abs(change) <= RSS_TARGET
    print(f"  gateway at rest, end vs after warm-up {change:+.1%}: target within {RSS_TARGET:.0%} "
          f"{'met' if flat else 'MISSED'}; every request answered: {mix.no_answer() == 0}")
    healthy = set(polls) == {"200"}
    return 0 if flat and healthy and mix.no_answer() == 0 and not mix.wrong else 1


def run_model(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="tierdet-soak-"))
    built = ensure_built([args.model], WeightsSource.parse(args.weights), args.home)
    triton = start_triton(built, args.home, work, threads=2)
    gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log")
    try:
        image = photo_jpeg()
        outcomes, wall = asyncio.run(closed_loop(gateway.http, image, {"model": args.model},
                                                 concurrency=4, count=60))
        rate = args.load * len(outcomes) / wall
        print(f"capacity {len(outcomes) / wall:.1f} req/s; soaking at {args.load:.1f}x = "
              f"{rate:.1f} req/s for {args.minutes:g} min, budget {args.sla_ms:g} ms", flush=True)
        pids = {"gateway": gateway.process.pid, "triton": triton.process.pid}
        result = asyncio.run(soak(gateway.http, image, rate, args.minutes * 60, args.sample_s,
                                  pids, {"sla_ms": str(args.sla_ms)}))
    finally:
        gateway.stop()
        triton.stop()
    print("\n== soak result ==")
    print(f"  sent {result['sent']}, answered {result['answered']} "
          f"(exactly one answer each: {result['sent'] == result['answered']}), "
          f"statuses {result['statuses']}")
    report_rss(result["samples"], args.minutes * 60 * args.warmup_fraction)
    return 0 if result["sent"] == result["answered"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mix", action="store_true", help="the mixed soak on the COCO ladder")
    p.add_argument("--model", default="efficientdet-d0", help="(without --mix)")
    p.add_argument("--weights", default="random:0", help="(without --mix)")
    p.add_argument("--load", type=float, default=1.0, help="x capacity (without --mix)")
    p.add_argument("--sla-ms", type=float, default=1000.0, help="budget (without --mix)")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--requests", type=int, default=1_000_000, help="at most (--mix)")
    p.add_argument("--seed", type=int, default=0, help="the clients' draws (--mix)")
    p.add_argument("--threads", type=int, default=0, help="per model (--mix; 0: all cores)")
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--home", type=Path, default=default_home())
    args = p.parse_args()
    return run_mix(args) if args.mix else run_model(args)


if __name__ == "__main__":
    sys.exit(main())
