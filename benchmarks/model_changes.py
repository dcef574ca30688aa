"""Models that change under load (issue 23): ten add / replace / retire
operations through the admin API while Poisson arrivals at half the
gateway's capacity keep coming, against the same arrivals without changes.

Starts its own stack: the YOLOX-Nano card's models on a local tritonserver
(explicit model control), a gateway with an admin credential, a cards folder
holding the card's graph and a model home of its own. Then, with one seed
for every phase's arrivals:

1. capacity: routed requests one after another, C = 1 / their mean time;
2. **steady**: arrivals at ``--load`` x C for ``--seconds``, nothing changes;
3. **changes**: arrivals at the same rate (``--seconds`` / 10 at a time,
   until the last operation is done) while an admin thread adds, replaces
   and retires hot cards: ten operations, one every ``--seconds`` / 10 or
   as soon as the one before is done (a PUT answers once the model serves,
   a DELETE once it has drained);
4. **steady again**, to see the host's drift.

Every request is routed (the default tier, no model named): a change must
never fail one. Prints per phase: requests, statuses, transport errors,
p50 / p99 as this client saw them; the p99 ratio of the changes phase to
the steady phases; each operation and how long it took. Exit code 1 when a
request of any phase was not answered 200. Loopback only, bounded by
``--seconds``. Example:

    python benchmarks/model_changes.py --home .cache/test-home --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml
from tierdet.build.models import default_home, ensure_cards
from tierdet.devstack.stack import GatewayProcess, start_triton

sys.path.insert(0, str(Path(__file__).parent))
from load import Outcome, open_loop, pct, photo_jpeg

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "examples/cards/yolox-nano.yaml"
GRAPH = ROOT / "weights/yolox-nano/yolox_nano.onnx"
ADMIN_KEY = "admin-key-of-the-model-changes-benchmark"
# (method, hot card, card change): three adds, four replacements, three retirements.
OPERATIONS = [("PUT", "hot-1", {}), ("PUT", "hot-2", {}), ("PUT", "hot-1", {"nms_iou": 0.5}),
              ("PUT", "hot-2", {"nms_iou": 0.5}), ("DELETE", "hot-1", {}), ("PUT", "hot-3", {}),
              ("PUT", "hot-3", {"nms_iou": 0.5}), ("DELETE", "hot-2", {}),
              ("PUT", "hot-3", {"nms_iou": 0.65}), ("DELETE", "hot-3", {})]


def hot_card(name: str, changes: dict) -> str:
    """A card of the same graph at 320 px, served under another name."""
    return yaml.safe_dump({
        "name": name,
        "source": {"onnx": GRAPH.name, "sha256": hashlib.sha256(GRAPH.read_bytes()).hexdigest()},
        "input": {"size": 320, "channels": "BGR", "resize": "letterbox"},
        "output": {"format": "yolox", "strides": [8, 16, 32]},
        "classes": "coco80", "nms_iou": 0.6, "pre_nms_top_k": 1000,
        "licence": "Apache-2.0", "provenance": "benchmarks/model_changes.py", **changes})


def operate(base: str, period_s: float, log: list[str]) -> None:
    """The ten operations, one every ``period_s`` (or as soon as the last is done)."""
    start = time.perf_counter()
    with httpx.Client(base_url=base, headers={"X-Admin-Key": ADMIN_KEY}, timeout=600) as http:
        for i, (method, name, changes) in enumerate(OPERATIONS):
            wait = start + i * period_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # pacing the operations, not waiting for an event
            began = time.perf_counter()
            body = hot_card(name, changes) if method == "PUT" else None
            answer = http.request(method, f"/admin/models/{name}", content=body)
            took = time.perf_counter() - began
            what = "retire" if method == "DELETE" else "replace" if changes else "add"
            log.append(f"{i + 1:2d}. {what} {name}: {answer.status_code} in {took:.1f} s")
            if answer.status_code != 200:
                raise RuntimeError(f"{method} {name}: {answer.status_code} {answer.text}")


def phase(base: str, image: bytes, rate: float, seconds: float, seed: int
          ) -> list[Outcome]:
    count = int(rate * seconds * 2) + 10
    outcomes, _ = asyncio.run(open_loop(base, image, rate, count, seconds,
                                        lambda rng: ({}, 0.0), seed))
    return outcomes


def capacity(base: str, image: bytes, requests: int = 30) -> float:
    with httpx.Client(base_url=base, timeout=60) as http:
        times = []
        for _ in range(requests):
            began = time.perf_counter()
            answer = http.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")})
            answer.raise_for_status()
            times.append(time.perf_counter() - began)
    return 1 / statistics.mean(times[5:])


def row(name: str, outcomes: list[Outcome]) -> tuple[str, float]:
    statuses = collections.Counter(o.status for o in outcomes)
    codes = collections.Counter(o.code for o in outcomes if o.code)
    latencies = [o.latency_ms for o in outcomes]
    p99 = pct(latencies, 99)
    return (f"| {name} | {len(outcomes)} | {dict(statuses)} {dict(codes) or ''} | "
            f"{statuses.get(599, 0)} | {pct(latencies, 50):.0f} | {p99:.0f} |"), p99


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--seconds", type=float, default=60.0, help="each phase's arrivals")
    p.add_argument("--load", type=float, default=0.5, help="multiple of measured capacity")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    built = ensure_cards([CARD], args.home)
    work = Path(tempfile.mkdtemp(prefix="tierdet-changes-"))
    cards = work / "cards"
    cards.mkdir()
    shutil.copy(GRAPH, cards / GRAPH.name)
    triton = start_triton(built, work / "home", work / "triton")
    gateway = GatewayProcess.start(
        triton.endpoint, work / "gateway.log", cards=str(CARD),
        models=",".join(b.spec.name for b in built), cards_dir=str(cards),
        home=str(work / "home"), admin_key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest())
    image, log = photo_jpeg(), []
    try:
        rate = args.load * capacity(gateway.http, image)
        steady = phase(gateway.http, image, rate, args.seconds, args.seed)
        admin = threading.Thread(target=operate, args=(gateway.http, args.seconds / 10, log))
        admin.start()
        changing: list[Outcome] = []
        while admin.is_alive():  # arrivals until the last operation is done
            changing += phase(gateway.http, image, rate, args.seconds / 10, args.seed)
        admin.join()
        again = phase(gateway.http, image, rate, args.seconds, args.seed)
    finally:
        gateway.stop()
        triton.stop()
    print(f"== model changes under load: {args.load}x capacity = {rate:.1f} requests/s, "
          f"{args.seconds:.0f} s a phase, seed {args.seed} ==")
    print("| phase | requests | statuses | no answer | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    rows = {name: row(name, outcomes) for name, outcomes in
            (("steady", steady), ("ten changes", changing), ("steady again", again))}
    for text, _ in rows.values():
        print(text)
    changes_p99 = rows["ten changes"][1]
    print(f"p99 with changes / without: {changes_p99 / rows['steady'][1]:.2f}x against the "
          f"first steady phase, {changes_p99 / rows['steady again'][1]:.2f}x against the "
          f"second (target <= 1.2x)")
    print("operations:\n  " + "\n  ".join(log))
    failed = sum(o.status != 200 for o in steady + changing + again)
    if len(log) < len(OPERATIONS):
        print(f"only {len(log)} of {len(OPERATIONS)} operations ran; see {work}/gateway.log")
        return 1
    if failed:
        print(f"requests failed: see {work}/gateway.log")
        return 1
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
