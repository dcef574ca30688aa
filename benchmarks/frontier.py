"""The accuracy-vs-budget frontier on real photographs (issue 26): does routing pay?

The real stack (local tritonserver, `tierdet serve`) serves the real COCO
ladder (the shipped cards, or --card). Measured in one run:

1. Each model alone, through the gateway, closed loop at batch 1 (pinned, no
   budget pressure): its service time and its labelled AP on the 128 COCO
   photographs. C = images/s of the most accurate model alone.
2. A budget mix relative to those service times: tight (only the fastest
   model fits an idle device), medium (the middle one), loose (the best one),
   one third each: budget = 1.5 x service + 10 ms.
3. Per load (multiples of C): open-loop Poisson arrivals, every request one of
   the 128 photographs with a budget from the mix (seeded: the same arrivals
   for every deployment). Deployments: routed (no model named), each model
   alone (pinned, the same budgets: the gateway sheds what that model cannot
   make), and the oracle (each request given the most accurate model whose
   measured service time fits its budget, idle device, no queue: a bound).
   Per row: in-SLO % of admitted (answered within the budget by the client's
   clock), shed %, refusal latency p50/p99 (a probe beside the load on a
   kept-alive connection of its own: 1 ms budgets, 10/s), and effective AP:
   COCO AP over all requests, a shed or late answer counting as no detections.
4. Optional: --hog starts `stress-ng --cpu 1` half-way through the routed row
   at --hog-load (the device slows) and prints in-SLO of admitted per second,
   and how long after the hog started it was back at >= 97% and stayed there.
   --gateways 2: two gateways share the Triton (the chart's default).

Bounded: at most --requests per row and --max-seconds of arrivals. Loopback
only. Prints a table, writes --json and a plot (--plot, PNG). Example:

    python benchmarks/frontier.py --seed 1 --plot docs/images/frontier.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from native_tools import require
from tierdet.build.models import default_home, ensure_cards
from tierdet.devstack.stack import GatewayProcess, start_triton
from tierdet.registry.cards import shipped_cards
from tierdet.training.datasets.coco import CocoSplit
from tierdet.training.evaluation import coco_ap

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-val2017-128"
FORM = {"score_threshold": "0.001", "max_detections": "100"}  # COCO practice, as tierdet eval


@dataclass(frozen=True)
class Photo:
    image_id: int
    jpeg: bytes


@dataclass
class Answer:
    status: int
    latency_ms: float
    budget_ms: float
    model: str | None = None
    code: str | None = None
    detections: list[dict] = field(default_factory=list)
    predicted_ms: float = 0.0  # the router's prediction at admission (200s)
    gateway_ms: float = 0.0  # the gateway's own clock (200s): the rest is the client's side
    message: str = ""  # the error's (a refusal says what was predicted)

    @property
    def in_budget(self) -> bool:
        return self.status == 200 and self.latency_ms <= self.budget_ms

    @property
    def admitted(self) -> bool:
        """Taken in (answered, or late): not shed at admission."""
        return self.status == 200 or self.code == "deadline_exceeded"


def _detections(body: dict) -> list[dict]:
    return [{"category_id": d["class_id"], "score": d["score"],
             "bbox": [d["x1"], d["y1"], d["x2"] - d["x1"], d["y2"] - d["y1"]]}
            for d in body.get("detections", [])]


async def _post(client: httpx.AsyncClient, photo: Photo, fields: dict[str, str],
                budget_ms: float) -> Answer:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/detect", data={**FORM, **fields},
                              files={"image": ("a.jpg", photo.jpeg, "image/jpeg")})
        body = r.json()
    except (httpx.HTTPError, ValueError):
        return Answer(599, (time.perf_counter() - start) * 1e3, budget_ms, code="no answer")
    latency = (time.perf_counter() - start) * 1e3
    if r.status_code != 200:
        return Answer(r.status_code, latency, budget_ms, code=body["error"]["code"],
                      message=body["error"]["message"])
    return Answer(200, latency, budget_ms, body["model"], detections=_detections(body),
                  predicted_ms=body["routing"]["predicted_ms"],
                  gateway_ms=body["routing"]["actual_ms"])


def lateness(answers: list[Answer]) -> str:
    """Where late answers lost their time: past the budget on the gateway's own
    clock (the prediction was short), or only on the client's (its side: HTTP,
    the load generator sharing the cores)."""
    late = [a for a in answers if a.status == 200 and not a.in_budget]
    timeouts = sum(a.code == "deadline_exceeded" for a in answers)
    if not late:
        return f"{timeouts} ended 504 at their deadline; no late answers"
    gateway = [a for a in late if a.gateway_ms > a.budget_ms]
    under = statistics.median(a.gateway_ms / a.predicted_ms for a in late if a.predicted_ms)
    gap = statistics.median(a.latency_ms - a.gateway_ms for a in late)
    return (f"{timeouts} ended 504 at their deadline; "
            f"{len(late)} late: {len(gateway)} past the budget at the gateway; median "
            f"gateway/predicted {under:.2f}, client-side gap {gap:.1f} ms")


def dump_answers(path: Path, load: float, deployment: str, plan: list[Arrival],
                 answers: list[Answer]) -> None:
    with path.open("a") as out:
        for arrival, answer in zip(plan, answers, strict=True):
            record = {k: v for k, v in asdict(answer).items() if k != "detections"}
            out.write(json.dumps({"load": load, "deployment": deployment,
                                  "at_s": arrival.at_s, **record}) + "\n")


def shed_by_budget(answers: list[Answer]) -> str:
    """Refused at admission, per budget of the mix: which requests a deployment
    turns away (a router's bigger models can push the tight ones out)."""
    budgets = sorted({round(a.budget_ms) for a in answers})
    parts = []
    for b in budgets:
        these = [a for a in answers if round(a.budget_ms) == b]
        parts.append(f"{b} ms {sum(not a.admitted for a in these)}/{len(these)}")
    return "shed by budget: " + ", ".join(parts)


@dataclass(frozen=True)
class Arrival:
    at_s: float
    photo: int
    budget_ms: float


def arrivals(rate: float, count: int, max_s: float, photos: int, budgets: list[float],
             seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out, at = [], 0.0
    for _ in range(count):
        at += rng.expovariate(rate)
        if at > max_s:
            break
        out.append(Arrival(at, rng.randrange(photos), rng.choice(budgets)))
    return out


async def open_loop(bases: list[str], photos: list[Photo], plan: list[Arrival],
                    pin: str | None) -> list[Answer]:
    """``plan`` sent as it says (gateways in turn); answers in arrival order."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    clients = [httpx.AsyncClient(base_url=b, timeout=60.0, limits=limits) for b in bases]
    try:
        tasks = []
        start = time.perf_counter()
        for i, arrival in enumerate(plan):
            delay = start + arrival.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            fields = {"sla_ms": str(round(arrival.budget_ms))}
            if pin:
                fields["model"] = pin
            tasks.append(asyncio.create_task(_post(clients[i % len(clients)],
                                                   photos[arrival.photo], fields,
                                                   arrival.budget_ms)))
        return list(await asyncio.gather(*tasks))
    finally:
        for client in clients:
            await client.aclose()


class RefusalProbe:
    """Requests no model can answer (1 ms budget, in the query string: refused
    before the body is read), 10 a second on one kept-alive connection, beside
    the load: how fast a refusal comes back while the gateway is busy."""

    def __init__(self, base: str, jpeg: bytes) -> None:
        self.base, self.jpeg = base, jpeg
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30.0) as client:
            while not self._stop.wait(0.1):
                start = time.perf_counter()
                r = client.post("/v1/detect", params={"sla_ms": "1"},
                                files={"image": ("a.jpg", self.jpeg, "image/jpeg")})
                if r.status_code == 503:
                    self.latencies.append((time.perf_counter() - start) * 1e3)

    def __enter__(self) -> RefusalProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def effective_ap(gt: dict, plan: list[Arrival], photos: list[Photo],
                 detections: list[list[dict]]) -> float:
    """COCO AP over all requests: each request its own image (a copy of its
    photograph's ground truth), a missing answer an image without detections."""
    by_photo: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        by_photo.setdefault(ann["image_id"], []).append(ann)
    info = {i["id"]: i for i in gt["images"]}
    images, annotations, results = [], [], []
    for n, (arrival, found) in enumerate(zip(plan, detections, strict=True)):
        photo = photos[arrival.photo]
        images.append({**info[photo.image_id], "id": n})
        annotations += [{**a, "id": len(annotations) + k + 1, "image_id": n}
                        for k, a in enumerate(by_photo.get(photo.image_id, []))]
        results += [{**d, "image_id": n} for d in found]
    return coco_ap({**gt, "images": images, "annotations": annotations}, results).ap * 100


@dataclass
class Row:
    load: float
    deployment: str
    requests: int
    in_slo_admitted: float
    shed: float
    refusal_p50_ms: float
    refusal_p99_ms: float
    effective_ap: float
    models: dict[str, int]
    late: dict[str, int] = field(default_factory=dict)  # model -> answers past the budget


def summarize(load: float, name: str, plan: list[Arrival], answers: list[Answer],
              refusals: list[float], ap: float) -> Row:
    admitted = [a for a in answers if a.admitted]
    models: dict[str, int] = {}
    late: dict[str, int] = {}
    for a in answers:
        if a.model:
            models[a.model] = models.get(a.model, 0) + 1
            if not a.in_budget:
                late[a.model] = late.get(a.model, 0) + 1
    return Row(load, name, len(answers),
               sum(a.in_budget for a in admitted) / len(admitted) if admitted else float("nan"),
               sum(a.code in ("sla_unattainable", "overloaded") for a in answers) / len(answers),
               float(np.percentile(refusals, 50)) if refusals else float("nan"),
               float(np.percentile(refusals, 99)) if refusals else float("nan"), ap, models,
               late)


def alone(base: str, photos: list[Photo], model: str) -> tuple[float, dict[int, list[dict]]]:
    """Each photograph once, pinned, one at a time: the median latency (the
    model's service time through the gateway) and its detections per photograph."""
    times, found = [], {}
    with httpx.Client(base_url=base, timeout=120.0) as client:
        for photo in photos:
            start = time.perf_counter()
            r = client.post("/v1/detect", data={**FORM, "model": model, "sla_ms": "60000"},
                            files={"image": ("a.jpg", photo.jpeg, "image/jpeg")})
            times.append((time.perf_counter() - start) * 1e3)
            r.raise_for_status()
            found[photo.image_id] = _detections(r.json())
    return statistics.median(times), found


def oracle(plan: list[Arrival], photos: list[Photo], service: dict[str, float],
           ap: dict[str, float], found: dict[str, dict[int, list[dict]]]) -> list[list[dict]]:
    """Each request answered by the most accurate model whose service time fits."""
    out = []
    for arrival in plan:
        fits = [m for m in service if service[m] <= arrival.budget_ms]
        best = max(fits, key=ap.__getitem__, default=None)
        out.append(found[best][photos[arrival.photo].image_id] if best else [])
    return out


def where_ap_went(gt: dict, plan: list[Arrival], photos: list[Photo], answers: list[Answer],
                  fastest: str, found: dict[int, list[dict]]) -> str:
    """What a row's effective AP would have been: the same requests answered in
    budget by the fastest model instead of the row's choices (did the choices
    add accuracy?), with its late answers kept, and with every refused one
    answered by the fastest model too (what its refusals cost)."""
    def ap(pick) -> float:
        return effective_ap(gt, plan, photos, [pick(arrival, a) for arrival, a
                                               in zip(plan, answers, strict=True)])

    def fast(arrival: Arrival) -> list[dict]:
        return found[photos[arrival.photo].image_id]

    same_by_fastest = ap(lambda x, a: fast(x) if a.in_budget else [])
    late_kept = ap(lambda x, a: a.detections if a.status == 200 else [])
    none_refused = ap(lambda x, a: a.detections if a.status == 200
                      else [] if a.admitted else fast(x))
    return (f"its in-budget requests answered by {fastest} instead {same_by_fastest:.1f}; "
            f"late answers kept {late_kept:.1f}; and refusals answered by {fastest} "
            f"{none_refused:.1f}")


def in_slo_by_second(plan: list[Arrival], answers: list[Answer]) -> list[tuple[int, float]]:
    bins: dict[int, list[bool]] = {}
    for arrival, answer in zip(plan, answers, strict=True):
        if answer.admitted:
            bins.setdefault(int(arrival.at_s), []).append(answer.in_budget)
    return [(s, sum(v) / len(v)) for s, v in sorted(bins.items())]


def hog_row(bases: list[str], photos: list[Photo], plan: list[Arrival], hog_at_s: float
            ) -> tuple[list[Answer], list[tuple[int, float]], float | None]:
    """The routed row with `stress-ng --cpu 1` from ``hog_at_s`` on."""
    def hog() -> None:
        time.sleep(hog_at_s)  # the fault is injected at this point of the run
        process = subprocess.Popen(["stress-ng", "--cpu", "1", "--timeout",
                                    f"{int(plan[-1].at_s - hog_at_s) + 30}s"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        holder.append(process)

    holder: list[subprocess.Popen] = []
    thread = threading.Thread(target=hog, daemon=True)
    thread.start()
    try:
        answers = asyncio.run(open_loop(bases, photos, plan, None))
    finally:
        thread.join()
        for process in holder:
            process.kill()
            process.wait()
    seconds = in_slo_by_second(plan, answers)
    start = int(hog_at_s)
    recovered = None
    for s, share in seconds:
        if s < start:
            continue
        if share >= 0.97 and all(v >= 0.97 for t, v in seconds if t >= s):
            recovered = s - hog_at_s
            break
    return answers, seconds, recovered


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name in dict.fromkeys(r.deployment for r in rows):
        mine = [r for r in rows if r.deployment == name]
        style = {"routed": "o-", "oracle": "k--"}.get(name, ".:")
        ax.plot([r.load for r in mine], [r.effective_ap for r in mine], style, label=name)
    ax.set_xscale("log")
    loads = sorted({r.load for r in rows})
    ax.set_xticks(loads, [f"{x:g}C" for x in loads])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("offered load (C: the most accurate model's images/s alone)")
    ax.set_ylabel("effective AP (late or shed = no detections)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", type=Path, action="append", help="default: the shipped cards")
    p.add_argument("--data", type=Path, default=COCO)
    p.add_argument("--loads", default="0.5,0.8,1.5,3", help="multiples of C")
    p.add_argument("--requests", type=int, default=150, help="max requests per row")
    p.add_argument("--max-seconds", type=float, default=30.0, help="max arrival span per row")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gateways", type=int, default=1)
    p.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                   help="the single-model rows")
    p.add_argument("--hog", action="store_true", help="a CPU hog half-way through a routed row")
    p.add_argument("--hog-load", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per model")
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--gateway-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the gateways (e.g. route_shared_device=true)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SETTING=VALUE,...",
                   help="another routed row beside the default one, from its own gateways "
                        "with these settings (side by side under the same arrivals)")
    p.add_argument("--plan-from", type=Path, metavar="REPORT",
                   help="take C and the budgets from an earlier run's --json report (its "
                        "models' service times), not from this run's: two runs of one seed "
                        "then send the same arrivals with the same budgets")
    p.add_argument("--json", type=Path)
    p.add_argument("--answers", type=Path, metavar="JSONL",
                   help="every request of every row, one JSON line each (to read refusals)")
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.hog:
        require("stress-ng")
    cards = args.card or shipped_cards()
    data = CocoSplit(args.data)
    gt = data.coco
    photos = [Photo(i["id"], (data.image_dir / i["file_name"]).read_bytes())
              for i in gt["images"]]
    built = ensure_cards(cards, args.home)
    names = [b.spec.name for b in built]
    with tempfile.TemporaryDirectory(prefix="tierdet-frontier-") as tmp:
        work = Path(tmp)
        triton = start_triton(built, args.home, work / "triton", threads=args.threads)
        gateways: list[GatewayProcess] = []
        variants: dict[str, list[str]] = {}
        common = dict(kv.split("=", 1) for kv in args.gateway_setting)
        try:
            for variant, settings in [("routed", {}), *map(_variant, args.variant)]:
                for g in range(args.gateways):
                    gateways.append(GatewayProcess.start(
                        triton.endpoint, work / f"gateway-{variant}-{g}.log", timeout_s=300.0,
                        cards=",".join(map(str, cards)), models=",".join(names),
                        **{**common, **settings}))
                    variants.setdefault(variant, []).append(gateways[-1].http)
            run(args, gt, photos, names, variants)
        finally:
            for gateway in gateways:
                gateway.stop()
            triton.stop()
    return 0


def _variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:SETTING=VALUE,...``: another routed row, from gateways with these settings."""
    name, _, settings = text.partition(":")
    return "routed " + name, dict(kv.split("=", 1) for kv in settings.split(",") if kv)


def run(args, gt: dict, photos: list[Photo], names: list[str],
        variants: dict[str, list[str]]) -> None:
    bases = variants["routed"]
    service, ap, found = {}, {}, {}
    for name in names:
        service[name], found[name] = alone(bases[0], photos, name)
        results = [{**d, "image_id": i} for i, ds in found[name].items() for d in ds]
        ap[name] = coco_ap(gt, results).ap * 100
    ladder = sorted(names, key=service.__getitem__)
    best = max(names, key=ap.__getitem__)
    planned = json.loads(args.plan_from.read_text())["service_ms"] if args.plan_from else service
    capacity = 1e3 / planned[best]
    by_speed = sorted(names, key=planned.__getitem__)
    budgets = [1.5 * planned[m] + 10 for m in (by_speed[0], by_speed[len(by_speed) // 2], best)]
    print(f"# frontier: {len(photos)} COCO photographs, seed {args.seed}, "
          f"{len(bases)} gateway(s), {sys.platform}")
    print("| model | service ms (alone, median) | labelled AP |")
    print("|---|---|---|")
    for m in ladder:
        print(f"| {m} | {service[m]:.1f} | {ap[m]:.1f} |")
    print(f"C = {capacity:.2f} images/s ({best} alone"
          + (f", as in {args.plan_from}" if args.plan_from else "") + "); budgets (ms): "
          + ", ".join(f"{b:.0f}" for b in budgets))
    rows: list[Row] = []
    jpeg = photos[0].jpeg
    for load in (float(x) for x in args.loads.split(",")):
        plan = arrivals(load * capacity, args.requests, args.max_seconds, len(photos), budgets,
                        args.seed)
        deployments = [(v, None, variants[v]) for v in variants] + (
            [(m, m, bases) for m in ladder] if args.static else [])
        for name, pin, targets in deployments:
            with RefusalProbe(targets[0], jpeg) as probe:
                answers = asyncio.run(open_loop(targets, photos, plan, pin))
            effective = effective_ap(gt, plan, photos, [a.detections if a.in_budget else []
                                                        for a in answers])
            rows.append(summarize(load, name, plan, answers, probe.latencies, effective))
            if args.answers:
                dump_answers(args.answers, load, name, plan, answers)
            if name in variants:
                print(f"{name} at {load:g}C: {lateness(answers)}", flush=True)
                print(f"{name} at {load:g}C: effective AP {effective:.1f}; "
                      + where_ap_went(gt, plan, photos, answers, ladder[0], found[ladder[0]]),
                      flush=True)
            print(f"{name} at {load:g}C: {shed_by_budget(answers)}", flush=True)
        rows.append(Row(load, "oracle", len(plan), float("nan"), 0.0, float("nan"),
                        float("nan"), effective_ap(gt, plan, photos,
                                                   oracle(plan, photos, service, ap, found)),
                        {}))
    print("\n| load | deployment | requests | in-SLO of admitted | shed | refusal p50 / p99 ms "
          "| effective AP | models (late: answered past the budget) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.load:g}C | {r.deployment} | {r.requests} | {r.in_slo_admitted:.1%} | "
              f"{r.shed:.1%} | {r.refusal_p50_ms:.1f} / {r.refusal_p99_ms:.1f} | "
              f"{r.effective_ap:.1f} | "
              + ", ".join(f"{m} {n}" + (f" ({r.late[m]} late)" if r.late.get(m) else "")
                          for m, n in sorted(r.models.items())) + " |")
    report: dict = {"seed": args.seed, "gateways": len(bases), "service_ms": service,
                    "labelled_ap": ap, "capacity": capacity, "budgets_ms": budgets,
                    "rows": [asdict(r) for r in rows]}
    if args.hog:
        plan = arrivals(args.hog_load * capacity, args.requests * 3, args.max_seconds * 2,
                        len(photos), budgets, args.seed)
        answers, seconds, recovered = hog_row(bases, photos, plan, plan[-1].at_s / 2)
        admitted = [a for a in answers if a.admitted]
        print(f"\n## CPU hog (stress-ng --cpu 1) from {plan[-1].at_s / 2:.0f} s of a routed row "
              f"at {args.hog_load:g}C ({len(plan)} requests)")
        print("in-SLO of admitted per second: "
              + " ".join(f"{s}:{v:.0%}" for s, v in seconds))
        print(f"overall {sum(a.in_budget for a in admitted) / len(admitted):.1%} of admitted; "
              + (f"back at >= 97% and held {recovered:.1f} s after the hog started"
                 if recovered is not None else "not back at >= 97% and held within the run"))
        report["hog"] = {"per_second": seconds, "recovered_s": recovered}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
