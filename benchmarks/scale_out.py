"""Scale-out benchmark (issue 13): several gateways, several Triton servers. Loopback only.

Two local tritonservers serve EfficientDet-D0's name and config, each one
device: by default an emulated accelerator (``--device emulated``: each batch
takes a fixed wall time and no CPU, see benchmarks/instant/model.py, so two
servers are two independent devices and the cores are left to the gateways),
or the real D0 graph (``--device d0``: random weights, one ONNX Runtime thread
per server, all sharing this machine's cores with the gateways). The gateways
get a latency profile measured at the start (as `tierdet profile` makes). One or
two gateways (`tierdet serve`) take open-loop Poisson arrivals of a real 1280x720
photograph in turn. Budgets are 4x and 10x D0's service time as the gateway
measured it (equal shares). Per deployment and load (multiples of the capacity
measured for that many servers): in-SLO (all requests, and each budget's
apart), admitted answered in budget, shed, p50/p99 of answers, p99 of
refusals by the client's clock, and the requests each Triton served (its own
count).

Also, in the same run:
- the two-gateway rows again with each gateway counting only its own work
  (no Triton queue read: how the router worked before the shared view);
- the same arrivals replayed with shedding off (D0 pinned, no budget sent):
  of the requests the router shed, how many would have made their budget;
- a run where one tritonserver is killed half-way and restarted: every
  request's outcome, and how soon the restarted server gets traffic again.

``--slow-b F`` (emulated devices) measures instead one gateway before two
Tritons whose devices differ: b's runs F times slower than a's (a neighbour
on b's node, or a smaller GPU). Rows: both alike, then b slowed, each at the
loads given, as multiples of the pair's capacity measured as it runs.

Bounded: at most --requests per row and --max-seconds of arrivals. Example:

    python benchmarks/scale_out.py                       # emulated devices (80 + 20 ms/image)
    python benchmarks/scale_out.py --device d0           # D0 on this machine's cores
    python benchmarks/scale_out.py --slow-b 3 --loads 0.5,0.8,1.0
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np
from load import Outcome, closed_loop, open_loop, pct
from native_tools import require
from tierdet.build.models import assemble, default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.profiling import measure
from tierdet.devstack.stack import GatewayProcess, free_port
from tierdet.devstack.triton import LocalTriton

MODEL = "efficientdet-d0"
HERE = Path(__file__).resolve().parent


def photo_720p() -> bytes:
    import skimage.data

    image = cv2.resize(skimage.data.astronaut()[..., ::-1], (1280, 720),
                       interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def served(server: LocalTriton) -> int:
    """Requests this Triton took in (its own count: answered, failed or waiting)."""
    return server.queue().arrived.get(MODEL, 0)


def start_server(repository: Path, work: Path) -> LocalTriton:
    work.mkdir(parents=True, exist_ok=True)
    server = LocalTriton(repository, work, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), models=[MODEL], log_path=work / "triton.log")
    server.start()
    server.wait_ready(180)
    return server


class Deployment:
    """``gateways`` gateway processes, each with ``servers`` in its pool."""

    def __init__(self, servers: list[LocalTriton], gateways: int, work: Path,
                 profile: Path, variant: str = "") -> None:
        """``variant``: "" (calibrated admission, p95), "own work only" (no Triton
        queue read) or "fixed margin" (the default: no calibration)."""
        self.servers = servers
        work.mkdir(parents=True, exist_ok=True)
        shared_view = variant != "own work only"
        urls = [s.endpoint if shared_view else s.grpc_url for s in servers]
        extra = {"profile_file": str(profile), "route_calibrate_quantile": "0.95"}
        if not shared_view:
            extra["triton_metrics_port"] = "0"
        if variant == "fixed margin":
            extra["route_calibrate_quantile"] = "0"
        self.gateways = [GatewayProcess.start(",".join(urls), work / f"gateway-{i}.log",
                                              models=MODEL, **extra)
                         for i in range(gateways)]
        self.name = f"{gateways} gw x {len(servers)} triton" + (f" ({variant})" if variant
                                                                  else "")

    @property
    def bases(self) -> list[str]:
        return [g.http for g in self.gateways]

    def stop(self) -> None:
        for g in self.gateways:
            g.stop()


def service_ms(gateway: str, image: bytes, runs: int = 12) -> float:
    """D0's Triton time per request at concurrency 1, as the gateway measures it."""
    times = []
    with httpx.Client(base_url=gateway, timeout=60) as client:
        for _ in range(runs):
            r = client.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")},
                            data={"model": MODEL})
            r.raise_for_status()
            times.append(r.json()["timing"]["infer_ms"])
    return statistics.median(times[2:])


def refusals(url: str, image: Path, seconds: float) -> list[float]:
    """Latencies (ms) of requests whose 1 ms budget no model can meet, paced at 10/s by
    a native client (hey) beside the load: the refusal path as a client sees it,
    without the Python load generator's own lag."""
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", "1", "-q", "10", "-m", "POST",
                          "-T", "image/jpeg", "-D", str(image), "-o", "csv",
                          url + "/v1/detect?sla_ms=1"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rows = [line.split(",") for line in out.splitlines()[1:] if line]
    statuses = {row[6] for row in rows}
    if statuses != {"503"}:
        raise RuntimeError(f"refusal probe saw {sorted(statuses)}")
    return [float(row[0]) * 1e3 for row in rows]


def row(name: str, outcomes: list[Outcome], wall_s: float, per_server: list[int]) -> dict:
    n = len(outcomes)
    ok = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    in_budget = [o for o in ok if o.latency_ms <= o.budget_ms]
    in_budget_gw = [o for o in ok if o.gateway_ms is not None and o.gateway_ms <= o.budget_ms]
    admitted = n - len(shed)
    budgets = sorted({o.budget_ms for o in outcomes})
    return {
        "name": name, "n": n, "in_slo": len(in_budget) / n if n else 0.0,
        # in-SLO of the requests with each budget, tightest first (4x, 10x)
        "by_budget": [sum(1 for o in in_budget if o.budget_ms == b)
                      / sum(1 for o in outcomes if o.budget_ms == b) for b in budgets],
        "admitted_in_budget": len(in_budget) / admitted if admitted else float("nan"),
        "admitted_in_budget_gw": len(in_budget_gw) / admitted if admitted else float("nan"),
        "shed": len(shed) / n if n else 0.0,
        "p50": pct([o.latency_ms for o in ok], 50), "p99": pct([o.latency_ms for o in ok], 99),
        "shed_p99": pct([o.latency_ms for o in shed], 99),
        "rate": n / wall_s, "per_server": per_server,
        "other": Counter(o.code or str(o.status) for o in outcomes
                         if o.status not in (200, 503)),
    }


def print_rows(rows: list[dict]) -> None:
    print(f"  {'deployment':<34}{'load':>6}{'n':>5}{'in-SLO':>8}{'4x':>7}{'10x':>7}"
          f"{'adm.in':>8}{'(gw)':>7}"
          f"{'shed':>7}{'p50 ms':>8}{'p99 ms':>8}{'shed p99':>9}{'hey p99':>8}"
          "  per triton   other")
    for r in rows:
        other = ", ".join(f"{k}:{v}" for k, v in r["other"].items()) or "-"
        tight, loose = (r["by_budget"] + [float("nan")] * 2)[:2]
        print(f"  {r['name']:<34}{r['load']:>6}{r['n']:>5}{r['in_slo']:>8.1%}"
              f"{tight:>7.1%}{loose:>7.1%}"
              f"{r['admitted_in_budget']:>8.1%}{r['admitted_in_budget_gw']:>7.1%}"
              f"{r['shed']:>7.1%}{r['p50']:>8.0f}{r['p99']:>8.0f}{r['shed_p99']:>9.1f}"
              f"{r['refusal_p99']:>8.1f}  {r['per_server']!s:<12}{other}")


def measure_row(deployment: Deployment, image: bytes, rate: float, mult: float,
                budgets: list[float], args, fields_of=None) -> tuple[dict, list[Outcome]]:
    def routed(rng):  # the budget in the query string: a refusal needs no body read
        b = rng.choice(budgets)
        return {}, b, {"sla_ms": str(round(b))}

    before = [served(s) for s in deployment.servers]
    probe = None
    if fields_of is None:  # a routed row: probe the refusal path beside it
        path = Path(tempfile.mkdtemp()) / "photo.jpg"
        path.write_bytes(image)
        probe = concurrent.futures.ThreadPoolExecutor(1).submit(
            refusals, deployment.bases[-1], path, args.max_seconds)
    outcomes, wall = asyncio.run(open_loop(deployment.bases, image, rate, args.requests,
                                           args.max_seconds, fields_of or routed,
                                           seed=int(mult * 100)))
    refused = probe.result() if probe is not None else []
    time.sleep(1.0)  # let the queues drain before the next row
    after = [served(s) for s in deployment.servers]
    r = row(deployment.name, outcomes, wall, [a - b for a, b in zip(after, before, strict=True)])
    r["load"] = f"{mult:.1f}x"
    r["refusal_p99"] = float(np.percentile(refused, 99)) if refused else float("nan")
    return r, outcomes


def capacity(deployment: Deployment, image: bytes) -> float:
    n = len(deployment.servers)
    outcomes, wall = asyncio.run(closed_loop(deployment.bases[0], image, {"model": MODEL},
                                             concurrency=4 * n, count=24 * n))
    return sum(1 for o in outcomes if o.status == 200) / wall


def replay_unshed(deployment: Deployment, image: bytes, rate: float, mult: float,
                  budgets: list[float], routed_outcomes: list[Outcome], args) -> str:
    """The same arrivals with D0 pinned and no budget sent (nothing shed)."""
    def pinned(rng):
        return {"model": MODEL}, rng.choice(budgets)

    r, plain = measure_row(deployment, image, rate, mult, budgets, args, pinned)
    pairs = list(zip(routed_outcomes, plain, strict=False))
    shed = [p for r_, p in pairs if r_.status == 503]
    made = sum(1 for p in shed if p.status == 200 and p.latency_ms <= p.budget_ms)
    return (f"  replayed with shedding off: in-SLO {r['in_slo']:.1%}; of the {len(shed)} "
            f"requests shed, {made} would have made their budget")


def kill_run(servers: list[LocalTriton], image: bytes, rate: float, budgets: list[float],
             work: Path, profile: Path, args) -> None:
    victim = servers[0]
    deployment = Deployment(servers, 1, work / "kill", profile)
    events: dict[str, float] = {}

    def served_now() -> int | None:
        """The victim's count, or None while its metrics port does not answer yet."""
        try:
            return served(victim)
        except (OSError, httpx.HTTPError):
            return None

    def killer(start: float) -> None:
        time.sleep(args.max_seconds / 2)  # the fault is injected at this point of the run
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        events["killed"] = time.perf_counter() - start
        victim.start()
        victim.wait_ready(180)
        events["ready"] = time.perf_counter() - start
        count = None
        while time.perf_counter() - start < args.max_seconds + 30:
            now = served_now()
            if count is None:
                count = now
            elif now is not None and now > count:
                events["traffic"] = time.perf_counter() - start
                return
            time.sleep(0.05)

    def guarded(start: float) -> None:
        try:
            killer(start)
        except Exception as error:  # reported with the run, never a dead thread's traceback
            events["error"] = repr(error)

    def routed(rng):  # the budget in the query string: a refusal needs no body read
        b = rng.choice(budgets)
        return {}, b, {"sla_ms": str(round(b))}

    try:
        start = time.perf_counter()
        thread = threading.Thread(target=guarded, args=(start,), daemon=True)
        thread.start()
        outcomes, wall = asyncio.run(open_loop(deployment.bases, image, rate, args.requests * 2,
                                               args.max_seconds, routed, seed=7))
        thread.join(timeout=60)
    finally:
        deployment.stop()
    statuses = Counter(f"{o.status} {o.code or ''}".strip() for o in outcomes)
    print(f"\n== one tritonserver SIGKILLed at {events.get('killed', float('nan')):.1f} s of "
          f"{wall:.1f} s, restarted (ready at {events.get('ready', float('nan')):.1f} s) ==")
    print(f"  {len(outcomes)} requests at {rate:.1f} req/s: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    lost = sum(1 for o in outcomes if o.status == 599)
    back = (f"{events['traffic'] - events['ready']:.2f} s after it was ready"
            if "traffic" in events else "never within the run")
    print(f"  unanswered: {lost}; traffic back on the restarted server {back}"
          + (f"; the fault injector failed: {events['error']}" if "error" in events else ""))


def repository_for(device: str, device_ms: str, home: Path, work: Path) -> Path:
    """The server's model repository; an emulated device's is its own (its speed
    is a file in it: ``set_device``)."""
    (built,) = ensure_built([MODEL], WeightsSource.parse("random:0"), home)
    if device == "d0":
        return assemble([built], home / "scale-out", "cpu-local", intra_op_threads=1)
    repository = assemble([built], work / "home", "cpu-local", intra_op_threads=1)
    shutil.copy(HERE / "instant" / "model.py", repository / MODEL / "1" / "model.py")
    set_device(repository, device_ms)
    return repository


def set_device(repository: Path, device_ms: str, factor: float = 1.0) -> None:
    """The emulated device's speed from its next batch on: ``device_ms`` x ``factor``."""
    base, per_image = (float(x) * factor for x in device_ms.split(","))
    path = repository / MODEL / "1" / "device.json"
    path.with_suffix(".tmp").write_text(json.dumps({"base_ms": base, "per_image_ms": per_image}))
    path.with_suffix(".tmp").replace(path)


def slow_b_rows(servers: list[LocalTriton], repositories: list[Path], image: bytes,
                budgets: list[float], work: Path, profile: Path, args) -> list[dict]:
    """One gateway before both servers: alike, then b's device ``--slow-b`` x slower."""
    rows = []
    for factor in (1.0, args.slow_b):
        set_device(repositories[1], args.device_ms, factor)
        deployment = Deployment(servers, 1, work / f"slow-b-{factor}", profile)
        deployment.name = f"1 gw x 2 triton, b at {factor:g}x"
        try:
            cap = capacity(deployment, image)
            print(f"capacity (closed loop), b at {factor:g}x: {cap:.1f} img/s")
            for mult in (float(x) for x in args.loads.split(",")):
                rows.append(measure_row(deployment, image, mult * cap, mult, budgets, args)[0])
        finally:
            deployment.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("emulated", "d0"), default="emulated")
    p.add_argument("--device-ms", default="80,20",
                   help="emulated device: ms per batch, plus ms per image in it")
    p.add_argument("--loads", default="0.8,1.0,2.0", help="multiples of measured capacity")
    p.add_argument("--requests", type=int, default=120, help="max requests per row")
    p.add_argument("--max-seconds", type=float, default=15.0, help="max arrival span per row")
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--slow-b", type=float, metavar="F",
                   help="only: one gateway, b's emulated device F x slower than a's")
    args = p.parse_args()
    if args.slow_b and args.device != "emulated":
        p.error("--slow-b slows an emulated device")
    require("hey")
    work = Path(tempfile.mkdtemp(prefix="tierdet-scale-out-"))
    repositories = [repository_for(args.device, args.device_ms, args.home, work / name)
                    for name in ("a", "b")]
    servers = [start_server(r, work / name) for r, name in zip(repositories, ("a", "b"),
                                                               strict=True)]
    image = photo_720p()
    try:
        profile = work / "profile.json"
        asyncio.run(measure(servers[0].grpc_url, {MODEL: 512}, batches=(1, 2, 4, 8),
                            runs=5, api_key=servers[0].api_key)).save(profile)
        print(f"device: {args.device}" + (f" ({args.device_ms} ms)" if args.device == "emulated"
                                          else ""))
        probe = Deployment(servers[:1], 1, work / "probe", profile)
        try:
            s_ms = service_ms(probe.bases[0], image)
            caps = {1: capacity(probe, image)}
        finally:
            probe.stop()
        pair = Deployment(servers, 1, work / "probe2", profile)
        try:
            caps[2] = capacity(pair, image)
        finally:
            pair.stop()
        budgets = [4 * s_ms, 10 * s_ms]
        print(f"D0 service time (gateway's infer_ms, median): {s_ms:.1f} ms; budgets "
              f"{budgets[0]:.0f} / {budgets[1]:.0f} ms (4x / 10x), equal shares")
        print(f"capacity (closed loop): 1 triton {caps[1]:.1f} img/s, "
              f"2 tritons {caps[2]:.1f} img/s")
        if args.slow_b:
            print()
            print_rows(slow_b_rows(servers, repositories, image, budgets, work, profile, args))
            return 0
        rows, notes = [], []
        for i, (gateways, n_servers, variant) in enumerate((
                (1, 1, ""), (2, 1, ""), (2, 1, "own work only"), (2, 1, "fixed margin"),
                (1, 2, ""), (2, 2, ""))):
            deployment = Deployment(servers[:n_servers], gateways, work / f"deployment-{i}",
                                    profile, variant)
            try:
                for mult in (float(x) for x in args.loads.split(",")):
                    rate = mult * caps[n_servers]
                    r, outcomes = measure_row(deployment, image, rate, mult, budgets, args)
                    rows.append(r)
                    if mult == 0.8 and not variant and r["shed"] > 0:
                        notes.append(f"{deployment.name} at 0.8x:" + replay_unshed(
                            deployment, image, rate, mult, budgets, outcomes, args)[1:])
            finally:
                deployment.stop()
        print()
        print_rows(rows)
        for note in notes:
            print("  " + note)
        kill_run(servers, image, 0.8 * caps[2], budgets, work, profile, args)
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
