"""Does shadow scoring order the ladder's models as their labelled AP does (issue 23)?

The real COCO ladder (YOLOX-Nano, PP-PicoDet-S, NanoDet-m at 320 and 416,
their real weights) served by Triton behind a gateway sampling every answer
(``TIERDET_SHADOW_SAMPLE=1``): the 128 COCO val2017 photographs of
../shared/data/coco-val2017-128 are sent pinned to each model in turn, one at
a time, each sample scored before the next request (so no sample finds the
device busy). Printed per model: the label-free estimate
(``tierdet_shadow_agreement``, against the most accurate model, PicoDet-S
416) beside the AP its card records as measured through the gateway on the
same photographs with their labels.

    python benchmarks/shadow_order.py --home .cache/test-home

``--fault channels``: instead, YOLOX-Nano 320 and the same card with its channel
order reversed (a wrong preprocessing flag), served beside it, each sent
``--samples`` photographs (the 128 in turn, again from the first), every answer
scored. Printed: both agreements, their ratio, and whether the shadow alert's
condition (``TierdetShadowAgreementDrop``: the level under its share of the
level before, on enough scored images) holds for a model that went from the
first to the second, as a rebuild with that flag would. Then canaries of
YOLOX-Nano 320, each at half its requests, judged by the rule on ``--samples``
pairs: the reversed card, then an identical rebuild; printed: each decision,
its pairs, the mean agreement drop, and the requests it took.

    python benchmarks/shadow_order.py --home .cache/test-home --fault channels --samples 200
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tierdet.artifacts.rules import SHADOW_DROP_RATIO, SHADOW_MIN_SAMPLES
from tierdet.build.models import default_home, ensure_cards

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-val2017-128"
CARDS = (REPO / "examples" / "cards" / "yolox-nano.yaml",
         REPO / "examples" / "cards" / "picodet-s.yaml",
         REPO / "examples" / "cards" / "more" / "nanodet-m.yaml")
HEALTHY = "yolox-nano-320"
ADMIN_KEY = "admin-key-of-the-shadow-benchmark"
ADMIN = {"X-Admin-Key": ADMIN_KEY}
ADMIN_SHA = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
FLIPPED = "yolox-nano-flipped"
ENDED = ("scored", "empty", "dropped_queue", "dropped_busy", "too_large", "failed")


def shadow_series(base: str, model: str) -> dict[str, float]:
    """The model's shadow samples by outcome, and its agreement and window."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "tierdet_shadow_samples_total":
                out[s.labels["outcome"]] = s.value
            elif s.name in ("tierdet_shadow_agreement", "tierdet_shadow_window_images"):
                out[s.name] = s.value
    return out


def settled(base: str, model: str, sampled: int, timeout_s: float = 120.0) -> dict[str, float]:
    """Poll /metrics until ``sampled`` samples of ``model`` were taken and all ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = shadow_series(base, model)
        if series.get("sampled", 0) >= sampled and \
                sum(series.get(k, 0) for k in ENDED) == series.get("sampled", 0):
            return series
        if time.monotonic() > deadline:
            raise RuntimeError(f"shadow samples of {model} did not end: {series}")
        time.sleep(0.01)


def yolox_card(name: str, onnx: str, flipped: bool) -> dict:
    """YOLOX-Nano's card at 320 px as ``name``, its graph at ``onnx``; ``flipped``:
    the channel order reversed. No recorded AP: the router does not rank it."""
    raw = yaml.safe_load(CARDS[0].read_text())
    channels = raw["input"]["channels"]
    if flipped:
        channels = "RGB" if channels == "BGR" else "BGR"
    for key in ("measured_ap", "published_ap", "score_calibration"):
        raw.pop(key, None)
    raw.update(name=name, source={**raw["source"], "onnx": onnx},
               input={**raw["input"], "size": 320, "channels": channels})
    return raw


def detect(client: httpx.Client, name: str, photo: Path) -> None:
    """One request pinned to ``name``, answered."""
    client.post("/v1/detect", data={"model": name},
                files={"image": (photo.name, photo.read_bytes(), "image/jpeg")}
                ).raise_for_status()


def send(client: httpx.Client, base: str, name: str, photos: list[Path], count: int,
         scored: bool) -> None:
    """``count`` requests pinned to ``name`` (the photographs in turn), each sample
    ended before the next request when ``scored``."""
    for n in range(1, count + 1):
        detect(client, name, photos[(n - 1) % len(photos)])
        if scored:
            settled(base, name, n)


def all_ended(base: str) -> None:
    """Until every shadow sample taken so far, of any model, has ended."""
    while True:
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(base + "/metrics").text):
            for sample in family.samples:
                if sample.name == "tierdet_shadow_samples_total":
                    outcome = sample.labels["outcome"]
                    counts[outcome] = counts.get(outcome, 0.0) + sample.value
        if sum(counts.get(k, 0.0) for k in ENDED) == counts.get("sampled", 0.0):
            return
        time.sleep(0.01)


def canary(client: httpx.Client, base: str, body: str, photos: list[Path]) -> dict:
    """Stage ``body`` as a canary of YOLOX-Nano 320 at half its requests, send it
    the photographs in turn, each one's samples ended before the next, until the
    rule decides; then wait until the decision is carried out: the canary's state."""
    staged = client.put(f"/admin/models/{HEALTHY}", params={"canary": 0.5}, headers=ADMIN,
                        content=body)
    staged.raise_for_status()
    requests = 0
    while True:
        detect(client, HEALTHY, photos[requests % len(photos)])
        requests += 1
        all_ended(base)
        models = client.get("/admin/models", headers=ADMIN).json()["models"]
        info = next(m for m in models if m["name"] == HEALTHY)["canary"]
        if info["state"] in ("promoted", "rolled_back", "failed"):
            return {**info, "requests": requests}


def channel_fault(args: argparse.Namespace, photos: list[Path]) -> int:
    from tierdet.devstack.stack import GatewayProcess, start_triton

    with tempfile.TemporaryDirectory(prefix="tierdet-shadow-") as tmp:
        work = Path(tmp)
        (work / "cards").mkdir()
        graph = (CARDS[0].parent / yaml.safe_load(CARDS[0].read_text())["source"]["onnx"])
        shutil.copy(graph, work / "cards" / graph.name)
        flipped = work / f"{FLIPPED}.yaml"
        flipped.write_text(yaml.safe_dump(yolox_card(FLIPPED, str(graph.resolve()), True)))
        cards = (*CARDS, flipped)
        built = ensure_cards(cards, args.home)
        with contextlib.ExitStack() as stop:
            # The gateway builds the canaries into the home Triton serves.
            triton = start_triton(built, work / "home", work, threads=2)
            stop.callback(triton.stop)
            gateway = GatewayProcess.start(
                triton.endpoint, work / "gateway.log", cards=",".join(map(str, cards)),
                shadow_sample="1", shadow_window=str(args.samples),
                cards_dir=str(work / "cards"), home=str(work / "home"),
                admin_key_sha256=ADMIN_SHA, canary_min_samples=str(args.samples))
            stop.callback(gateway.stop)
            client = stop.enter_context(httpx.Client(base_url=gateway.http, timeout=300))
            agreement = {}
            for name in (HEALTHY, FLIPPED):
                send(client, gateway.http, name, photos, args.samples, scored=True)
                series = shadow_series(gateway.http, name)
                agreement[name] = series["tierdet_shadow_agreement"]
                print(f"{name}: agreement {agreement[name]:.3f} over {args.samples} samples "
                      f"({series.get('scored', 0):.0f} scored, {series.get('empty', 0):.0f} "
                      "empty)")
            ratio = agreement[FLIPPED] / agreement[HEALTHY]
            holds = ratio < SHADOW_DROP_RATIO and args.samples >= SHADOW_MIN_SAMPLES
            print(f"reversed / healthy: {ratio:.3f}; the alert's condition (under "
                  f"{SHADOW_DROP_RATIO} of the level before, >= {SHADOW_MIN_SAMPLES} scored): "
                  f"{'holds' if holds else 'does not hold'}")
            print(f"canaries of {HEALTHY} (half its requests; the rule: "
                  f"{args.samples} pairs):")
            print("| canary | decided | by | pairs | agreement drop | requests | reason |")
            print("|---|---|---|---|---|---|---|")
            for label, flip in (("channels reversed", True), ("identical rebuild", False)):
                body = yaml.safe_dump(yolox_card(HEALTHY, graph.name, flip))
                info = canary(client, gateway.http, body, photos)
                print(f"| {label} | {info['state']} | {info['decided_by']} | {info['pairs']} | "
                      f"{info['agreement_drop']} | {info['requests']} | {info['reason']} |")
                sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--dataset", type=Path, default=COCO)
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--fault", choices=["channels"], help="a broken model beside a healthy one")
    p.add_argument("--samples", type=int, default=200, help="with --fault: samples per model")
    args = p.parse_args(argv)
    from tierdet.devstack.stack import running_stack

    photos = sorted((args.dataset / "images").glob("*.jpg"))
    photos = photos[:args.limit] if args.limit else photos
    if args.fault:
        return channel_fault(args, photos)
    built = ensure_cards(CARDS, args.home)
    with tempfile.TemporaryDirectory(prefix="tierdet-shadow-") as tmp, \
            running_stack(built, args.home, Path(tmp), threads=2,
                          cards=",".join(map(str, CARDS)), shadow_sample="1",
                          shadow_window=str(len(photos))) as (_, gateway):
        infos = {m["name"]: m for m in httpx.get(gateway.http + "/v1/models").json()["models"]}
        names = sorted((m.spec.name for m in built), key=lambda n: -infos[n]["routing_ap"])
        print(f"{len(photos)} COCO val2017 photographs per model, every answer sampled; "
              f"reference: {names[0]}")
        print("| model | labelled AP (card, gateway) | shadow agreement | scored | empty |")
        print("|---|---|---|---|---|")
        with httpx.Client(base_url=gateway.http, timeout=60) as client:
            for name in names:  # the reference's own answers are not sampled
                send(client, gateway.http, name, photos, len(photos), name != names[0])
                series = shadow_series(gateway.http, name)
                labelled = infos[name]["measured_ap"].get("coco-val2017-128")
                agreement = series.get("tierdet_shadow_agreement")
                print(f"| {name} | {labelled * 100:.1f} | "
                      f"{'reference' if agreement is None else f'{agreement:.3f}'} | "
                      f"{series.get('scored', 0):.0f} | {series.get('empty', 0):.0f} |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
