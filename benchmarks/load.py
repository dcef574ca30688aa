"""Open-loop load benchmark of budget routing (issue 4). Loopback only, bounded.

Starts its own stack (models built with the given weights, a local
tritonserver, the gateway with a freshly measured latency profile), then:

1. capacity: saturated closed-loop throughput of the gateway on the fastest
   model;
2. for each rate (a multiple of capacity): Poisson arrivals with a mix of
   budgets through the routed gateway, and the same arrivals against static
   single-model deployments (the fastest model; the most accurate model that
   fits the median budget) that have no routing and no admission control;
3. gateway overhead: concurrency-1 p50 and saturated throughput of the
   gateway vs Triton driven directly by tritonclient with the same tensor;
4. dynamic batching on vs off for one model, straight at Triton.

Every row is measured in this one run. The other benchmarks share its request
helpers, the real ladder's stack (``ladder_stack``) and RSS sampling. Example:

    python benchmarks/load.py --models damoyolo-ns,efficientdet-d0,damoyolo-t,efficientdet-d1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
from tierdet.build.models import assemble, default_home, ensure_built, ensure_cards
from tierdet.build.repository import install_model
from tierdet.build.weights import WeightsSource
from tierdet.devstack.profiling import measure
from tierdet.devstack.stack import GatewayProcess, free_port, running_stack, start_triton
from tierdet.devstack.triton import API_KEY_ENV, LocalTriton
from tierdet.registry.cards import shipped_cards, shipped_tiers
from tierdet.registry.profile import LatencyProfile
from tierdet.registry.specs import SPECS, Batching
from tierdet.serving.latency import LatencyModel
from tierdet.serving.routing import Router
from tierdet.serving.tiers import TierConfig
from tierdet.serving.triton import TritonClient


@dataclass
class Outcome:
    status: int
    latency_ms: float  # as this client saw it
    model: str | None
    budget_ms: float
    gateway_ms: float | None = None  # the gateway's own end-to-end time (routing.actual_ms)
    code: str | None = None  # the error code of a refusal


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@contextlib.contextmanager
def ladder_stack(home: Path, work: Path, threads: int = 0, **settings: str
                 ) -> Iterator[tuple[LocalTriton, GatewayProcess]]:
    """The real COCO ladder served as `tierdet up` serves it by default: the
    shipped cards (built into ``home`` if missing) and the shipped tiers;
    ``settings`` as for ``GatewayProcess.start``."""
    cards, tiers = shipped_cards(), shipped_tiers()
    if not cards or tiers is None:
        raise SystemExit("the shipped ladder (examples/cards, examples/tiers) is not here")
    built = ensure_cards(cards, home)
    with running_stack(built, home, work, threads=threads, cards=",".join(map(str, cards)),
                       models=",".join(b.spec.name for b in built), tiers_file=str(tiers),
                       **settings) as stack:
        yield stack


def rss_mb(pid: int) -> float:
    """RSS of a process and its children (Triton's python stubs), in MiB."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total / 2**20


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory field of ``/proc/PID/status`` (VmRSS, VmHWM, ...), in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/{pid}/status")
    return int(match.group(1)) * 1024


def rss_by_mapping(pid: int) -> dict[str, float]:
    """A process's resident MiB by kind of mapping (``/proc/PID/smaps``): the
    main heap, anonymous mappings (other allocator arenas, large ``mmap``
    allocations, thread stacks), shared memory and files: where a growth is."""
    kinds: collections.Counter[str] = collections.Counter()
    kind = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
            path = head[5] if len(head) > 5 else ""
            kind = ("heap" if path == "[heap]" else "anonymous" if not path or path == "[stack]"
                    else "shared memory" if path.startswith("/dev/shm") else "files")
        elif head[0] == "Rss:":
            kinds[kind] += int(head[1]) / 1024
    return dict(kinds)


# (seconds into the run, RSS MiB by process name)
Sample = tuple[float, dict[str, float]]


def sample(start: float, pids: dict[str, int], samples: list[Sample], counts: str) -> None:
    """Append one RSS sample of each process (``pids`` by name) and print it with
    ``counts`` (the outcomes so far)."""
    now, mem = time.perf_counter() - start, {name: rss_mb(pid) for name, pid in pids.items()}
    samples.append((now, mem))
    print(f"  t={now:6.0f}s " + " ".join(f"{k}={v:7.1f}MiB" for k, v in mem.items())
          + f" {counts}", flush=True)


def report_rss(samples: list[Sample], warm_s: float, warm: dict[str, float] | None = None
               ) -> float:
    """Print each process's RSS after warm-up (``warm``, or the first sample at
    ``warm_s`` or later), at the end, min/max over the run and the trend after
    warm-up (a least-squares line through those samples: growth, told apart
    from one sample's noise); return the gateway's end vs after warm-up."""
    warm = warm or next((m for t, m in samples if t >= warm_s), samples[-1][1])
    end = samples[-1][1]
    after = [(t, m) for t, m in samples if t >= warm_s] or samples[-1:]
    for name in end:
        run = [m[name] for _, m in samples]
        change = (end[name] - warm[name]) / warm[name]
        slope = (np.polyfit([t / 60 for t, _ in after], [m[name] for _, m in after], 1)[0]
                 if len(after) > 1 else 0.0)
        print(f"  {name}: RSS after warm-up {warm[name]:.1f} MiB, end {end[name]:.1f} MiB "
              f"({change:+.1%}), min {min(run):.1f}, max {max(run):.1f} MiB over the run; "
              f"trend after warm-up {slope:+.2f} MiB/min")
    return (end["gateway"] - warm["gateway"]) / warm["gateway"]


def answer(r: httpx.Response) -> str:
    """'200', or the status and the error code of a refusal."""
    if r.status_code == 200:
        return "200"
    try:
        return f"{r.status_code} {r.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} (not the gateway's error JSON)"


async def health(base: str, stop: asyncio.Event, counts: collections.Counter[str]) -> None:
    """Poll ``/healthz`` every second until ``stop``, counting each answer (or
    transport error) in ``counts``."""
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        while not stop.is_set():
            try:
                counts[str((await client.get("/healthz")).status_code)] += 1
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] += 1
            with contextlib.suppress(TimeoutError):  # the poll's pace
                await asyncio.wait_for(stop.wait(), 1.0)


def photo_jpeg() -> bytes:
    import skimage.data

    ok, buf = cv2.imencode(".jpg", skimage.data.astronaut()[..., ::-1])
    assert ok
    return buf.tobytes()


async def post(client: httpx.AsyncClient, image: bytes, fields: dict[str, str],
               budget_ms: float, query: dict[str, str] | None = None) -> Outcome:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")},
                              data=fields, params=query)
        status = r.status_code
        try:
            body = r.json()
        except ValueError:  # not the gateway's JSON (a proxy's or the server's own page)
            body = {"error": {"code": "not json"}}
        model = body.get("model")
        gateway_ms = (body.get("routing") or {}).get("actual_ms")
        code = None if status == 200 else (body.get("error") or {}).get("code")
    except httpx.HTTPError:
        status, model, gateway_ms, code = 599, None, None, "no answer"
    return Outcome(status, (time.perf_counter() - start) * 1e3, model, budget_ms, gateway_ms,
                   code)


async def open_loop(base: str | list[str], image: bytes, rate: float, count: int, max_s: float,
                    make_fields, seed: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at ``rate``/s, at most ``count`` requests or ``max_s`` seconds;
    several gateways (``base`` a list) take the arrivals in turn. Outcomes in
    arrival order: the same seed replays the same arrivals. ``make_fields(rng)``
    gives (form fields, budget) or (form fields, budget, query parameters)."""
    rng = random.Random(seed)
    bases = [base] if isinstance(base, str) else list(base)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    clients = [httpx.AsyncClient(base_url=b, timeout=60.0, limits=limits) for b in bases]
    try:
        tasks = []
        start = time.perf_counter()
        next_at = 0.0
        for i in range(count):
            next_at += rng.expovariate(rate)
            if next_at > max_s:
                break
            delay = start + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            fields, budget, *query = make_fields(rng)
            client = clients[i % len(clients)]
            tasks.append(asyncio.create_task(post(client, image, fields, budget, *query)))
        outcomes = await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - start
    finally:
        for client in clients:
            await client.aclose()


async def closed_loop(base: str, image: bytes, fields: dict[str, str], concurrency: int,
                      count: int) -> tuple[list[Outcome], float]:
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
        remaining = count
        results: list[Outcome] = []

        async def worker():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                results.append(await post(client, image, fields, 1e9))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def summarize(name: str, outcomes: list[Outcome], wall_s: float, ap: dict[str, float]) -> dict:
    n = len(outcomes)
    ok = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    in_slo = [o for o in ok if o.latency_ms <= o.budget_ms]
    # The same by the gateway's clock: on a 2-core box the load generator's
    # own CPU time (and its event loop's lag) lands in the client's figure.
    in_slo_gw = [o for o in ok if o.gateway_ms is not None and o.gateway_ms <= o.budget_ms]
    admitted = n - len(shed)
    lat = [o.latency_ms for o in ok]
    return {
        "name": name, "n": n,
        "in_slo": len(in_slo) / n if n else 0.0,
        "admitted_in_slo": len(in_slo) / admitted if admitted else float("nan"),
        "admitted_in_slo_gw": len(in_slo_gw) / admitted if admitted else float("nan"),
        "shed": len(shed) / n if n else 0.0,
        "p50": pct(lat, 50), "p99": pct(lat, 99),
        "shed_p99": pct([o.latency_ms for o in shed], 99),
        "throughput": len(ok) / wall_s,
        "eff_ap": sum(ap[o.model] for o in in_slo) / n if n else 0.0,
        "models": {m: sum(1 for o in ok if o.model == m) for m in ap},
    }


def print_rows(rows: list[dict]) -> None:
    print(f"  {'deployment':<30}{'n':>5}{'in-SLO':>8}{'adm.SLO':>8}{'(gw)':>7}{'shed':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'shed p99':>9}{'img/s':>7}{'eff AP':>8}  models")
    for r in rows:
        used = ", ".join(f"{m}:{c}" for m, c in r["models"].items() if c)
        print(f"  {r['name']:<30}{r['n']:>5}{r['in_slo']:>8.1%}{r['admitted_in_slo']:>8.1%}"
              f"{r['admitted_in_slo_gw']:>7.1%}{r['shed']:>7.1%}{r['p50']:>8.0f}{r['p99']:>8.0f}{r['shed_p99']:>9.1f}"
              f"{r['throughput']:>7.1f}{r['eff_ap']:>8.2f}  {used}")


@dataclass
class Payload:
    """What the gateway is sent, and the tensor Triton gets for it."""

    name: str
    data: bytes
    content_type: str
    tensor: np.ndarray  # uint8 [S, S, 3], exactly what the gateway sends Triton


def payloads(model: str) -> list[Payload]:
    """(a) a real JPEG photo (the gateway decodes and resizes it; Triton gets the
    prepared tensor); (b) a BMP holding the model input itself (same tensor both
    ways: what is left is the gateway's own overhead)."""
    from tierdet.serving import decoding, imaging

    spec = SPECS[model]
    jpeg = photo_jpeg()
    tensor, _ = imaging.prepare(decoding.decode_image(jpeg, 1 << 30, 1 << 30),
                                spec.input_size, spec.preprocessing)
    same = np.random.default_rng(0).integers(0, 255, tensor.shape, dtype=np.uint8)
    ok, bmp = cv2.imencode(".bmp", same[..., ::-1])
    assert ok
    return [Payload("JPEG photo 512x512", jpeg, "image/jpeg", tensor),
            Payload("BMP of the model input", bmp.tobytes(), "image/bmp", same)]


async def direct_vs_gateway(triton_url: str, gateway: str, model: str, runs: int,
                            concurrency: int) -> None:
    """p50 at concurrency 1 (interleaved runs) and saturated throughput, gateway vs
    Triton straight from tritonclient, for each payload."""
    client = TritonClient(triton_url, api_key=os.environ.get(API_KEY_ENV))
    fields = {"model": model}
    print(f"\n== gateway vs direct Triton, {model}, {runs} interleaved runs each ==")
    async with httpx.AsyncClient(base_url=gateway, timeout=60.0) as http:
        for payload in payloads(model):
            batch = payload.tensor[None]
            files = {"image": ("x", payload.data, payload.content_type)}

            async def call_direct(batch=batch):
                await client.infer(model, batch, timeout_s=60.0)

            async def call_gateway(files=files):
                r = await http.post("/v1/detect", files=files, data=fields)
                assert r.status_code == 200, r.text

            direct, via = [], []
            for i in range(runs + 5):  # interleaved: both see the same machine state
                t0 = time.perf_counter()
                await call_direct()
                t1 = time.perf_counter()
                await call_gateway()
                t2 = time.perf_counter()
                if i >= 5:
                    direct.append((t1 - t0) * 1e3)
                    via.append((t2 - t1) * 1e3)
            sat_direct = await saturate(call_direct, runs, concurrency)
            sat_gateway = await saturate(call_gateway, runs, concurrency)
            d50, g50 = statistics.median(direct), statistics.median(via)
            print(f"  {payload.name}: concurrency 1 p50 direct {d50:.1f} ms, gateway "
                  f"{g50:.1f} ms, ratio {g50 / d50:.3f}; saturated (concurrency "
                  f"{concurrency}) direct {sat_direct:.1f} img/s, gateway {sat_gateway:.1f} "
                  f"img/s, ratio {sat_gateway / sat_direct:.3f}")
    await client.close()
    print("  targets (same tensor): p50 ratio <= 1.05, saturated ratio >= 0.95")


async def saturate(call, count: int, concurrency: int) -> float:
    """Images per second with ``concurrency`` callers until ``count`` calls are done."""
    remaining = count

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


async def batching_on_off(triton_url: str, names: dict[str, int], size: int, requests: int,
                          concurrency: int) -> None:
    client = TritonClient(triton_url, api_key=os.environ.get(API_KEY_ENV))
    image = np.full((1, size, size, 3), 114, np.uint8)
    print(f"\n== dynamic batching, direct to Triton, {requests} requests at concurrency "
          f"{concurrency} ==")
    for name, delay_us in names.items():
        lat: list[float] = []
        remaining = requests

        async def worker(model=name, sink=lat):
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                await client.infer(model, image, timeout_s=120.0)
                sink.append((time.perf_counter() - t0) * 1e3)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        print(f"  {name:<28} queue delay {delay_us:>5} us: {requests / wall:6.1f} img/s, "
              f"p50 {pct(lat, 50):6.0f} ms, p99 {pct(lat, 99):6.0f} ms")
    await client.close()


def budget_mix(profile: LatencyProfile, models: list[str]) -> list[float]:
    """Tight / medium / loose budgets scaled to this machine's measured latencies."""
    singles = sorted(profile.models[m].service_ms(1) for m in models)
    return [round(2.0 * singles[0] + 10), round(2.0 * singles[len(singles) // 2] + 10),
            round(2.5 * singles[-1] + 10)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="damoyolo-ns,efficientdet-d0,damoyolo-t,efficientdet-d1")
    p.add_argument("--weights", default="random:0")
    p.add_argument("--rates", default="0.5,0.8,1.0,1.5,2.0", help="multiples of capacity")
    p.add_argument("--requests", type=int, default=300, help="max requests per run")
    p.add_argument("--max-seconds", type=float, default=40.0, help="max arrival span per run")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per model")
    p.add_argument("--overhead-runs", type=int, default=60)
    p.add_argument("--sections", default="routing,overhead,batching",
                   help="what to run: routing (rates x deployments), overhead (gateway vs "
                        "direct Triton), batching (on vs off)")
    p.add_argument("--twin", default=None, help="model for overhead and batching "
                   "(default: the second of --models, or the only one)")
    p.add_argument("--home", type=Path, default=default_home())
    args = p.parse_args()
    models = args.models.split(",")
    work = Path(tempfile.mkdtemp(prefix="tierdet-load-"))
    built = ensure_built(models, WeightsSource.parse(args.weights), args.home)
    twin_spec = SPECS[args.twin or (models[1] if len(models) > 1 else models[0])]
    triton = start_triton(built, args.home, work, threads=args.threads)
    gateway = None
    try:
        profile = asyncio.run(measure(triton.grpc_url, {m: SPECS[m].input_size for m in models},
                                      batches=(1, 4), runs=20, api_key=triton.api_key))
        profile_path = work / "profile.json"
        profile.save(profile_path)
        print("== latency profile (ms) ==")
        for m, prof in profile.models.items():
            print(f"  {m:<18} b=1 {prof.service_ms(1):7.1f}   b=4 {prof.service_ms(4):7.1f}")
        # Restart Triton with queue delays tuned from the profile, plus the
        # batching-off twin of one model for the on/off comparison.
        triton.stop()
        repo = assemble(built, args.home, "cpu-local", intra_op_threads=args.threads,
                        profile=profile)
        twin_built = next(b for b in built if b.spec.name == twin_spec.name)
        off = dataclasses.replace(twin_spec, name=f"{twin_spec.name}-nobatch",
                                  batching=Batching(max_batch_size=1, max_queue_delay_us=0))
        on = dataclasses.replace(twin_spec, name=f"{twin_spec.name}-batch",
                                 batching=Batching(max_batch_size=8, max_queue_delay_us=5000))
        for variant in (off, on):
            install_model(repo, variant, "cpu-local", twin_built.onnx, twin_built.provenance,
                          args.threads, variant.batching)
        triton = LocalTriton(repo, work, http_port=free_port(), grpc_port=free_port(),
                             metrics_port=free_port(), models=[*models, off.name, on.name],
                             log_path=work / "triton.log")
        triton.start()
        triton.wait_ready(180)
        # Random weights rank 0 unless pinned: route by the published AP here.
        gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log",
                                       profile_file=str(profile_path),
                                       models=",".join(models), pin_published_ap="true")
        run(args, models, profile, gateway, triton, off, on)
    finally:
        if gateway is not None:
            gateway.stop()
        triton.stop()
    return 0


def run(args, models, profile, gateway, triton, off, on) -> None:
    sections = set(args.sections.split(","))
    twin = off.name.removesuffix("-nobatch")
    if "routing" in sections:
        routing_rows(args, models, profile, gateway)
    if "overhead" in sections:
        asyncio.run(direct_vs_gateway(triton.grpc_url, gateway.http, twin, args.overhead_runs,
                                      concurrency=4))
    if "batching" in sections:
        asyncio.run(batching_on_off(triton.grpc_url, {off.name: 0, on.name: 5000},
                                    SPECS[twin].input_size, requests=48, concurrency=8))


def routing_rows(args, models, profile, gateway) -> None:
    image = photo_jpeg()
    ap = {m: SPECS[m].published_ap or 0.0 for m in models}
    budgets = budget_mix(profile, models)
    router = Router(ap, TierConfig.load(None, "balanced"), LatencyModel(profile), 10_000)
    fastest = min(models, key=lambda m: profile.models[m].service_ms(1))
    median = sorted(budgets)[1]
    fits = [m for m in models if router.fits(profile.models[m].service_ms(1) + 5, median)]
    best_static = max(fits or [fastest], key=lambda m: ap[m])
    print(f"\nbudget mix (ms, equal shares): {budgets}; fastest: {fastest}; "
          f"most accurate fitting the median budget ({median} ms): {best_static}")

    outcomes, wall = asyncio.run(closed_loop(gateway.http, image, {"model": fastest},
                                             concurrency=4, count=80))
    capacity = len(outcomes) / wall
    print(f"capacity (closed loop, concurrency 4, {fastest}): {capacity:.1f} img/s")

    def routed(rng):
        b = rng.choice(budgets)
        return {"sla_ms": str(b)}, b

    def static(model):
        def fields(rng):
            b = rng.choice(budgets)
            return {"model": model}, b  # no budget sent: no routing, no shedding
        return fields

    for mult in (float(x) for x in args.rates.split(",")):
        rate = mult * capacity
        rows, runs = [], []
        for name, make in (("routed", routed), (f"static {fastest}", static(fastest)),
                           (f"static {best_static}", static(best_static))):
            outcomes, wall = asyncio.run(open_loop(gateway.http, image, rate, args.requests,
                                                   args.max_seconds, make, seed=int(mult * 100)))
            rows.append(summarize(name, outcomes, wall, ap))
            runs.append(outcomes)
            time.sleep(2.0)  # let queues drain between runs
        print(f"\n== {mult:.1f}x capacity = {rate:.1f} req/s ==")
        print_rows(rows)
        # The same seed replays the same arrivals and budgets: request by request,
        # which of those the router shed the fastest model (shedding off) answered
        # in their budget.
        pairs = list(zip(runs[0], runs[1], strict=False))
        shed = [plain for routed_, plain in pairs if routed_.status == 503]
        made = sum(1 for o in shed if o.status == 200 and o.latency_ms <= o.budget_ms)
        print(f"  of the {len(shed)} requests routing shed, static {fastest} (the same "
              f"arrivals, shedding off) answered {made} in budget")
        best = max(r["eff_ap"] for r in rows[1:])
        print(f"  effective AP routed / best static: {rows[0]['eff_ap'] / best:.2f}x"
              if best > 0 else "  best static effective AP is 0")


if __name__ == "__main__":
    sys.exit(main())
