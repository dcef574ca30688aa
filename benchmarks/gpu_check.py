"""GPU check (issue 15): what a borrowed GPU machine can tell without TensorRT or Triton.

Made for the one machine this project can borrow: one NVIDIA H200, 16 cores,
PyTorch with CUDA, torchvision, timm, onnx and onnxruntime (CPU) installed;
no TensorRT, no Triton, no network. It runs from a plain checkout (it puts
``service/`` on sys.path itself) plus one carried folder, and prints, within
a global deadline (default 420 s; a watchdog ends the process 45 s later, so
the run stays under 8 minutes; a section that would overrun is skipped and
says so):

1. **PyTorch fp16 latency with CUDA graphs** of efficientdet-d0/d1 and
   damoyolo-t/s at batch 1, 8 and 32, images/s, and the batching gain
   (images/s at batch 8 over batch 1; the GPU router's profile wants >= 3x).
   The graph holds what the exported ONNX graph holds before its detection
   head (uint8 NHWC pixels, normalise, network, box decode), channels-last,
   weights in fp16, anchors and decode in fp32. The detection head (top-k,
   class-aware NMS, top-K; ``tierdet.build.export.postprocess``) cannot be
   captured (torchvision's NMS syncs with the host): it runs eagerly, in
   fp32, and is timed beside the graph. Medians of CUDA-event timings.
2. **JPEG decode**: nvJPEG (``torchvision.io.decode_jpeg`` on the GPU, lists
   of 1, 8 and 32 images, host-to-device copy included) against the
   gateway's CPU decoders (``tierdet.serving.decoding``: simplejpeg in full
   and at the DCT scale the gateway picks for efficientdet-d0, OpenCV), one
   core and every core, for 1280x720 and 1920x1080 photographs. The
   photographs are mosaics of real photos at their native pixel density
   (640x360 crops of COCO val2017 photos, 2x2 for 720p, 3x3 for 1080p,
   JPEG quality 90, OpenCV's 4:2:0): enlarging one photo would make files
   smoother, and faster to decode, than a camera's.
3. **The exported ONNX against PyTorch**: each model exported by tierdet's
   own exporter (``export_onnx``; in a background process on the CPU that
   starts with the run, so the exports overlap section 1), run by ONNX
   Runtime on the CPU, against the same weights in PyTorch fp32 on the GPU
   (TF32 off) on the same real photographs (letterboxed or stretched by
   ``tierdet.serving.imaging``).
   Tolerance: that of tests/test_export.py, 2e-2 on every box coordinate
   (input pixels) and score, class exact; it passes when >= 99% of each
   side's detections have a match (random weights leave near-tied scores at
   the top-K cut). The fp16 path of section 1 against the same fp32 answer
   is printed too, as information (what ``--fp16`` may cost), with no verdict.

Weights are random (seed 0, tierdet's ``load_network``): official ones cannot
be downloaded here. Latency does not depend on them; agreement is checked on
them, which is the stricter case (near-tied scores).

What it cannot check (needs Triton's container on a GPU): the TensorRT build
itself, Triton's tensorrt backend, warm-up, priorities and queue policy.

What the GPU machine lacks and what therefore travels, in .cache/gpu_check
(git ignores .cache/): five wheels for CPython 3.12, 3.8 MiB (effdet 0.4.1,
omegaconf 2.4.0 and pycocotools 2.0.11, which effdet imports; simplejpeg
1.9.0, the gateway's decoder; timm 1.0.31, the build extra's <1.1), which the
script unzips onto sys.path (a wheel is a zip of its import tree; no pip
there), and 24 COCO val2017 photos, 3.0 MiB. Without the photos it falls
back to scikit-image's (installed there), and says so. Prepare it here
(network needed: ``pip download``, see ``pip_download_command``)::

    python benchmarks/gpu_check.py --prepare .cache/gpu_check

Run on the GPU machine through the device tool, from the repo root
(carry ``[".cache/gpu_check"]``, timeout_s 540)::

    set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --assets .cache/gpu_check --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.txt

Smoke test on a CPU (fp32, no graphs, torchvision's CPU decoder in place of
nvJPEG; figures mean nothing)::

    python benchmarks/gpu_check.py --device cpu --quick
"""  # noqa: E501 (the device tool's command, one line as it is run)

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-val2017-128" / "images"
MODELS = ("efficientdet-d0", "efficientdet-d1", "damoyolo-t", "damoyolo-s")
BATCHES = (1, 8, 32)
DECODE_BATCHES = (1, 8, 32)
# What tierdet's imports need beyond the GPU machine's image (effdet and its
# config library; effdet's import-time pycocotools; the gateway's JPEG
# decoder), and timm at the version pyproject's build extra allows (<1.1).
WHEELS = ("effdet==0.4.1", "omegaconf==2.4.0", "pycocotools==2.0.11", "simplejpeg==1.9.0",
          "timm==1.0.31")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PHOTOS = 24
TILE = (640, 360)  # a mosaic cell: COCO photos are 640 px wide, so no resampling
RESOLUTIONS = (("720p", 1280, 720), ("1080p", 1920, 1080))
ATOL = 2e-2  # tests/test_export.py's tolerance
AGREE = 0.99
SITE = Path(tempfile.gettempdir()) / "tierdet-gpu-check-site"
GRACE_S = 45


def say(text: str = "") -> None:
    print(text, flush=True)


def rate(per_s: float) -> str:
    """images/s, with three significant digits below 100 (a CPU's smoke figures)."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


# --- preparing the carried folder (here, with network) -------------------------------------


def pip_download_command(wheels_dir: Path, python_version: str) -> list[str]:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", *platforms,
            "-d", str(wheels_dir), *WHEELS]


def prepare(folder: Path, python_version: str, photos_from: Path) -> int:
    """Fill ``folder`` with wheels/ and photos/ (what travels to the GPU machine)."""
    wheels, photos = folder / "wheels", folder / "photos"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    command = pip_download_command(wheels, python_version)
    say("$ " + " ".join(command))
    subprocess.run(command, check=True)
    shutil.rmtree(photos, ignore_errors=True)
    photos.mkdir(parents=True)
    sources = sorted(photos_from.glob("*.jpg"))[:PHOTOS]
    if not sources:
        say(f"no photos under {photos_from}: the GPU run will use scikit-image's")
    for path in sources:
        shutil.copy(path, photos / path.name)
    for sub in (wheels, photos):
        files = sorted(p for p in sub.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files)
        say(f"{sub}: {len(files)} files, {size / 2**20:.1f} MiB")
        if sub is wheels:
            for p in files:
                say(f"  {p.name} ({p.stat().st_size / 2**10:.0f} KiB)")
    return 0


# --- bootstrap on the GPU machine -----------------------------------------------------------


def installable(wheel: Path) -> bool:
    """Whether this interpreter takes the wheel (its tags; True if ``packaging`` is
    missing, and the import will tell)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return True
    return not parse_wheel_filename(wheel.name)[3].isdisjoint(sys_tags())


def bootstrap(assets: Path | None) -> list[str]:
    """``service/`` and the carried wheels (unzipped: a wheel is a zip of its import
    tree) ahead of everything else on sys.path; what was unpacked."""
    unpacked = []
    wheels = sorted((assets / "wheels").glob("*.whl")) if assets else []
    if wheels:
        shutil.rmtree(SITE, ignore_errors=True)
        SITE.mkdir(parents=True)
        for wheel in wheels:
            if not installable(wheel):
                say(f"not unpacked (built for another Python or platform): {wheel.name}")
                continue
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(SITE)
            unpacked.append(wheel.name)
        sys.path.insert(0, str(SITE))
    sys.path.insert(0, str(ROOT / "service"))
    return unpacked


# --- deadline -------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self.end = self.start + seconds
        self.skipped: list[str] = []

    def left(self, until: float = 1.0) -> float:
        return min(self.end, self.start + until * self.seconds) - time.monotonic()

    def allows(self, need_s: float, what: str, until: float = 1.0) -> bool:
        """Whether ``need_s`` more seconds fit before ``until`` (a fraction of the
        budget: a section's share); if not, say so and remember the skip."""
        left = self.left(until)
        if left >= need_s:
            return True
        say(f"  SKIPPED (deadline): {what}: needs ~{need_s:.0f} s, {max(left, 0):.0f} s left")
        self.skipped.append(what)
        return False

    def elapsed(self) -> float:
        return time.monotonic() - self.start


CHILDREN: list[subprocess.Popen[bytes]] = []  # ended by the watchdog too


def watchdog(seconds: float) -> None:
    def stop() -> None:
        say(f"\nHARD DEADLINE: {seconds:.0f} s passed; exiting (later figures are missing)")
        for child in CHILDREN:
            child.kill()
        os._exit(3)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()


# --- settings -------------------------------------------------------------------------------


@dataclass
class Plan:
    device: str
    models: tuple[str, ...]
    batches: tuple[int, ...]
    decode_batches: tuple[int, ...]
    warmup: int
    iters: int
    seconds_per_timing: float
    decode_files: int
    agree_batch: int
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def plan_for(args: argparse.Namespace) -> Plan:
    models = tuple(args.models.split(",")) if args.models else MODELS
    if args.quick:
        return Plan(args.device, models if args.models else ("efficientdet-d0",), (1, 2),
                    (1, 2), warmup=1, iters=3, seconds_per_timing=3.0, decode_files=2,
                    agree_batch=2)
    return Plan(args.device, models, BATCHES, DECODE_BATCHES, warmup=5, iters=50,
                seconds_per_timing=3.0, decode_files=8, agree_batch=4)


# --- photographs ----------------------------------------------------------------------------


def load_photos(assets: Path | None) -> tuple[list[Any], str]:
    """RGB uint8 photographs, and where they came from."""
    import cv2

    folders = [assets / "photos"] if assets else []
    folders.append(COCO)
    for folder in folders:
        files = sorted(folder.glob("*.jpg"))[:PHOTOS]
        if files:
            images = [cv2.imread(str(f))[..., ::-1].copy() for f in files]
            return images, f"{len(files)} COCO val2017 photographs from {folder}"
    import skimage.data

    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
              skimage.data.rocket()]
    return images, "scikit-image's 4 photographs (no COCO photos found)"


def cover_crop(image: Any, width: int, height: int) -> Any:
    """``image`` scaled to cover width x height (only if it must), centre-cropped."""
    import cv2

    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    if scale > 1 or min(w, h) == 0:
        image = cv2.resize(image, (max(width, round(w * scale)), max(height, round(h * scale))),
                           interpolation=cv2.INTER_CUBIC)
        h, w = image.shape[:2]
    y, x = (h - height) // 2, (w - width) // 2
    return image[y:y + height, x:x + width]


def mosaic_jpeg(photos: list[Any], width: int, height: int, index: int) -> bytes:
    """A width x height JPEG (quality 90) tiled from 640x360 crops of the photos."""
    import cv2
    import numpy as np

    cols, rows = width // TILE[0], height // TILE[1]
    canvas = np.zeros((height, width, 3), np.uint8)
    for k in range(cols * rows):
        photo = photos[(index * cols * rows + k) % len(photos)]
        r, c = divmod(k, cols)
        canvas[r * TILE[1]:(r + 1) * TILE[1], c * TILE[0]:(c + 1) * TILE[0]] = (
            cover_crop(photo, *TILE))
    ok, buf = cv2.imencode(".jpg", canvas[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def model_inputs(spec: Any, photos: list[Any], batch: int) -> Any:
    """[batch, S, S, 3] uint8: the photos resized as the gateway resizes them."""
    import numpy as np
    from tierdet.serving import imaging

    prepared = [imaging.prepare(p, spec.input_size, spec.preprocessing)[0] for p in photos]
    return np.stack([prepared[i % len(prepared)] for i in range(batch)])


# --- timing ---------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], plan: Plan, sync: Callable[[], None],
              events: bool) -> float:
    """Median time of ``fn`` in ms: CUDA events where ``events``, else the wall clock
    with ``sync`` after each call; at most plan.iters calls or plan.seconds_per_timing."""
    import torch

    for _ in range(plan.warmup):
        fn()
    sync()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < plan.iters and (len(times) < 3 or
                                       time.perf_counter() - began < plan.seconds_per_timing):
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# --- section 1: latency ---------------------------------------------------------------------


def build_networks(plan: Plan, deadline: Deadline, nets: dict[str, Any], names: Iterable[str],
                   until: float) -> None:
    from tierdet.build.export.onnx_export import load_network
    from tierdet.registry.specs import SPECS

    for name in names:
        if name in nets or not deadline.allows(15, f"build {name}", until):
            continue
        t = time.perf_counter()
        nets[name] = load_network(SPECS[name], checkpoint=None, seed=0)
        say(f"  built {name} (random weights, seed 0) in {time.perf_counter() - t:.1f} s")


class Fp16Front:
    """What the ONNX graph does before its head: uint8 NHWC -> (boxes, scores), both
    returned in fp32. On CUDA the weights are fp16 and channels-last; anchors (a
    buffer) stay fp32, so the box decode runs in fp32, as type promotion gives it. On
    a CPU (smoke test) everything stays fp32."""

    def __init__(self, spec: Any, network: Any, device: str) -> None:
        import torch

        half = torch.float16 if device.startswith("cuda") else torch.float32
        module = copy.deepcopy(network.module).to(device).to(half).eval()
        if device.startswith("cuda"):
            module = module.to(memory_format=torch.channels_last)
        anchors = getattr(module, "anchors", None)
        if isinstance(anchors, torch.Tensor):
            module.anchors = anchors.float()
        self.module, self.dtype = module, half
        prep = spec.preprocessing
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1).to(half)
        self.inv_std = (1.0 / torch.tensor(prep.std, device=device)).view(1, 3, 1, 1).to(half)

    def __call__(self, images: Any) -> tuple[Any, Any]:
        x = images.permute(0, 3, 1, 2).to(self.dtype)  # channels-last strides, for free
        boxes, scores = self.module((x - self.mean) * self.inv_std)
        return boxes.float(), scores.float()


def capture(front: Fp16Front, static_in: Any) -> tuple[Any, tuple[Any, Any]]:
    """A CUDA graph of ``front`` on ``static_in`` (warmed up on a side stream)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            front(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = front(static_in)
    return graph, static_out


def measure_batch(plan: Plan, front: Fp16Front, head: Any, images: Any) -> dict[str, Any]:
    """One batch: the net eager and as a CUDA graph, then the eager head on its output."""
    import torch

    sync = torch.cuda.synchronize if plan.cuda else (lambda: None)
    batch = images.shape[0]
    row: dict[str, Any] = {"batch": batch}
    with torch.no_grad():
        row["eager_ms"] = median_ms(lambda: front(images), plan, sync, plan.cuda)
        outputs = front(images)
        if plan.cuda:
            try:
                graph, outputs = capture(front, images)
                row["graph_ms"] = median_ms(graph.replay, plan, sync, True)
            except Exception as error:  # report, and carry on eagerly
                row["graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                torch.cuda.synchronize()
                outputs = front(images)
        boxes, scores = outputs
        row["head_ms"] = median_ms(lambda: head(boxes, scores), plan, sync, False)
    net_ms = row.get("graph_ms", row["eager_ms"])
    row["net_img_s"] = batch / net_ms * 1e3
    row["total_ms"] = net_ms + row["head_ms"]
    row["total_img_s"] = batch / row["total_ms"] * 1e3
    return row


def section_latency(plan: Plan, deadline: Deadline, nets: dict[str, Any],
                    photos: list[Any]) -> None:
    import torch
    from tierdet.registry.specs import SPECS

    until = 0.55  # this section's share of the budget; the rest is for sections 2-3
    precision = "fp16, CUDA graphs" if plan.cuda else "fp32 eager (CPU smoke: no fp16, no graphs)"
    say(f"\n## 1. PyTorch latency ({precision}), {plan.device}")
    say("net = uint8 pixels -> normalise -> network -> box decode (the ONNX graph before its "
        "head); head = top-k + class-aware NMS + top-K, eager fp32 (torchvision NMS syncs with "
        "the host, so it is outside the graph). Medians.")
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in plan.models:
        build_networks(plan, deadline, nets, [name], until)
        if name not in nets:
            continue
        rows[name] = []
        try:
            latency_of(plan, deadline, SPECS[name], nets[name], photos, until, rows[name])
        except Exception as error:  # one model's failure must not cost the others' figures
            say(f"  FAILED {name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            plan.results.setdefault("errors", {})[f"latency {name}"] = repr(error)[:2000]
        if plan.cuda:
            torch.cuda.empty_cache()
    plan.results["latency"] = rows
    say("\n### images/s (net) and the batching gain")
    say("| model | " + " | ".join(f"batch {b}" for b in plan.batches)
        + " | gain, batch 8 / 1 (target >= 3x) | largest batch / 1 |")
    say("|---|" + "---|" * (len(plan.batches) + 2))
    for name, model_rows in rows.items():
        by_batch = {r["batch"]: r["net_img_s"] for r in model_rows}
        cells = [rate(by_batch[b]) if b in by_batch else "-" for b in plan.batches]
        one = by_batch.get(1)
        gain = f"{by_batch[8] / one:.2f}x" if one and 8 in by_batch else "-"
        big = max(by_batch, default=1)
        top = f"{by_batch[big] / one:.2f}x (batch {big})" if one and big != 1 else "-"
        say(f"| {name} | {' | '.join(cells)} | {gain} | {top} |")
        if one:
            plan.results.setdefault("batching_gain", {})[name] = {
                str(b): v / one for b, v in by_batch.items()}


def latency_of(plan: Plan, deadline: Deadline, spec: Any, network: Any, photos: list[Any],
               until: float, rows: list[dict[str, Any]]) -> None:
    """One model's table: every batch size the deadline allows."""
    import torch
    from tierdet.build.export.onnx_export import wrap_for_export

    front = Fp16Front(spec, network, plan.device)
    head = wrap_for_export(spec, network).head.to(plan.device)
    say(f"\n### {spec.name} ({spec.input_size} px)")
    say("| batch | net graph ms | net img/s | net eager ms | head ms | net+head ms | "
        "net+head img/s |")
    say("|---|---|---|---|---|---|---|")
    for batch in plan.batches:
        if not deadline.allows(8 if plan.cuda else 5, f"latency {spec.name} batch {batch}",
                               until):
            break
        images = torch.from_numpy(model_inputs(spec, photos, batch)).to(plan.device)
        row = measure_batch(plan, front, head, images)
        rows.append(row)
        graph_cell = (f"{row['graph_ms']:.2f}" if "graph_ms" in row else
                      f"failed ({row['graph_error']})" if "graph_error" in row else "-")
        say(f"| {batch} | {graph_cell} | {rate(row['net_img_s'])} | {row['eager_ms']:.2f} | "
            f"{row['head_ms']:.2f} | {row['total_ms']:.2f} | {rate(row['total_img_s'])} |")


# --- section 2: JPEG decode -----------------------------------------------------------------


def all_cores(files: list[bytes], limit: int) -> float:
    """images/s of the gateway's full decode with a thread per core (simplejpeg lets go
    of the GIL), over at least four images per core."""
    from concurrent.futures import ThreadPoolExecutor

    from tierdet.serving import decoding

    cores = os.cpu_count() or 1
    count = max(4 * cores, 2 * len(files))
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(lambda d: decoding.decode(d, limit, limit), files))
        began = time.perf_counter()
        list(pool.map(lambda i: decoding.decode(files[i % len(files)], limit, limit),
                      range(count)))
        return count / (time.perf_counter() - began)


def one_by_one(decode: Callable[[bytes], object], files: list[bytes],
               plan: Plan) -> Callable[[], object]:
    """A call that decodes the next file each time (enough for every timed call)."""
    cycle = iter(files * (plan.iters + plan.warmup + 8))
    return lambda: decode(next(cycle))


def section_decode(plan: Plan, deadline: Deadline, photos: list[Any], source: str) -> None:
    import numpy as np
    import torch
    import torchvision
    from tierdet.registry.specs import SPECS
    from tierdet.serving import decoding, imaging
    from torchvision.io import ImageReadMode, decode_jpeg

    until = 0.75
    gpu = "nvJPEG (torchvision.io.decode_jpeg, device=cuda)" if plan.cuda else (
        "torchvision's CPU decode_jpeg (CPU smoke: no nvJPEG)")
    say(f"\n## 2. JPEG decode: {gpu} vs the gateway's CPU decoders")
    say(f"photographs: mosaics of 640x360 crops of {source}, JPEG quality 90 (OpenCV, 4:2:0)")
    limit = 1 << 31
    decoding.configure_decoders(limit)  # as the gateway: OpenCV single-threaded
    d0 = SPECS["efficientdet-d0"]

    def fits(width: int, height: int) -> bool:
        return imaging.covers(width, height, d0.input_size, d0.preprocessing)

    def opencv(data: bytes) -> Any:
        import cv2

        return imaging.to_rgb(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))

    sync = torch.cuda.synchronize if plan.cuda else (lambda: None)
    out: dict[str, Any] = {}
    for label, width, height in RESOLUTIONS:
        if not deadline.allows(10, f"decode {label}", until):
            continue
        files = [mosaic_jpeg(photos, width, height, k) for k in range(plan.decode_files)]
        kib = statistics.mean(len(f) for f in files) / 1024
        say(f"\n### {label} ({width}x{height}, {len(files)} files, mean {kib:.0f} KiB)")
        say("| decoder | ms/image (one core) | images/s |")
        say("|---|---|---|")
        row: dict[str, Any] = {"kib": kib}
        cpu_ways: list[tuple[str, Callable[[bytes], object]]] = [
            ("simplejpeg, full (gateway)", lambda d: decoding.decode(d, limit, limit)),
            ("simplejpeg, DCT scale for efficientdet-d0 (gateway)",
             lambda d: decoding.decode(d, limit, limit, fits)),
            ("OpenCV imdecode + RGB (gateway's fallback)", opencv),
        ]
        for way, fn in cpu_ways:
            ms = median_ms(one_by_one(fn, files, plan), plan, lambda: None, False)
            row[way] = {"ms": ms, "img_s": 1e3 / ms}
            say(f"| {way} | {ms:.2f} | {1e3 / ms:.0f} |")
        row["simplejpeg_all_cores_img_s"] = threads = all_cores(files, limit)
        say(f"| simplejpeg, full, {os.cpu_count()} threads | - | {threads:.0f} |")
        tensors = [torch.from_numpy(np.frombuffer(f, np.uint8).copy()) for f in files]
        for batch in plan.decode_batches:
            if not deadline.allows(5, f"decode {label} batch {batch}", until):
                break
            batch_in = [tensors[i % len(tensors)] for i in range(batch)]

            def gpu_decode(batch_in: list[Any] = batch_in) -> Any:
                return decode_jpeg(batch_in, mode=ImageReadMode.RGB, device=plan.device)

            ms = median_ms(gpu_decode, plan, sync, False)
            row[f"gpu_batch_{batch}"] = {"ms": ms, "img_s": batch * 1e3 / ms}
            say(f"| decode_jpeg {plan.device}, list of {batch} | {ms / batch:.2f} per image "
                f"({ms:.2f} per list) | {batch * 1e3 / ms:.0f} |")
        ours = decode_jpeg(tensors[0], mode=ImageReadMode.RGB, device=plan.device)
        theirs = decoding.decode(files[0], limit, limit).pixels
        diff = np.abs(ours.permute(1, 2, 0).cpu().numpy().astype(np.int16) - theirs)
        row["pixel_diff"] = {"mean": float(diff.mean()), "max": int(diff.max())}
        say(f"pixels, decode_jpeg vs simplejpeg: mean |diff| {diff.mean():.2f}, "
            f"max {diff.max()}" + (" (their IDCT and chroma upsampling differ)"
                                   if diff.max() else " (identical)"))
        best = max((k for k in row if k.startswith("gpu_batch_")), default=None,
                   key=lambda k: row[k]["img_s"])
        if best:
            fastest = row[best]["img_s"]
            one = row["simplejpeg, full (gateway)"]["img_s"]
            say(f"best decode_jpeg ({best.removeprefix('gpu_batch_')} per list): {fastest:.0f} "
                f"img/s = {fastest / one:.1f}x simplejpeg on one core, "
                f"{fastest / threads:.1f}x on {os.cpu_count()} threads")
        out[label] = row
    out["torchvision"] = torchvision.__version__
    plan.results["decode"] = out


# --- section 3: ONNX agreement --------------------------------------------------------------


def agreement(got: Any, want: Any) -> dict[str, Any]:
    """Detections [B, K, 6] of two backends: the share of each side's rows (score > 0)
    that the other has (same class, every other column within ATOL), and the worst
    matched differences."""
    import numpy as np

    counts = [0, 0]
    matched = [0, 0]
    worst_box = worst_score = 0.0
    for a, b in zip(got, want, strict=True):
        sides = (a[a[:, 4] > 0], b[b[:, 4] > 0])
        for k, (rows, other) in enumerate((sides, sides[::-1])):
            counts[k] += len(rows)
            for row in rows:
                same = other[other[:, 5] == row[5]]
                if not len(same):
                    continue
                dist = np.abs(same[:, :5] - row[:5])
                best = dist.max(axis=1).argmin()
                if dist[best].max() <= ATOL:
                    matched[k] += 1
                    worst_box = max(worst_box, float(dist[best, :4].max()))
                    worst_score = max(worst_score, float(dist[best, 4]))
    share = [m / c if c else 1.0 for m, c in zip(matched, counts, strict=True)]
    return {"rows": counts, "matched": matched, "share": share, "worst_box_px": worst_box,
            "worst_score": worst_score, "passed": min(share) >= AGREE}


class Exports:
    """The ONNX exports, in a background process (CPU only, half the cores) while
    section 1 runs on the GPU: one export is tens of seconds of mostly single-threaded
    tracing, four in a row would not fit the budget after sections 1 and 2. The
    process builds each model (load_network, seed 0), exports it with tierdet's
    export_onnx and saves the weights it exported, which section 3 loads into its
    PyTorch model: both sides run the same weights to the bit (two builds differ in
    the last bits of their BatchNorm calibration where their thread counts differ)."""

    def __init__(self, models: tuple[str, ...], assets: Path | None, seconds: float) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tierdet-gpu-check-"))
        command = [sys.executable, str(Path(__file__).resolve()), "--export-worker",
                   str(self.folder), "--models", ",".join(models), "--budget", f"{seconds:.0f}"]
        if assets:
            command += ["--assets", str(assets)]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        self.log_path = self.folder / "worker.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        CHILDREN.append(self.process)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self, name: str, deadline: Deadline, reserve_s: float) -> dict[str, Any] | None:
        """The worker's record for ``name`` once written; None if the deadline (less
        ``reserve_s``) comes first."""
        record = self.folder / f"{name}.json"
        while not record.exists():
            if not self.running():
                if record.exists():
                    break
                return {"error": "the export process ended without it: "
                                 + self.log_tail()}
            if deadline.left() < reserve_s:
                return None
            time.sleep(0.5)
        return json.loads(record.read_text())

    def wait(self, deadline: Deadline, until: float, reserve_s: float) -> bool:
        """Wait for the worker to finish (so CPU figures are taken on idle cores), at
        most until ``reserve_s`` before the share ``until`` of the budget ends."""
        while self.running() and deadline.left(until) > reserve_s:
            time.sleep(0.5)
        return not self.running()

    def log_tail(self, lines: int = 6) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])[-600:]

    def close(self) -> None:
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def export_worker(folder: Path, models: tuple[str, ...]) -> int:
    """The background process of :class:`Exports`: build, export, record, model by model."""
    import torch
    from tierdet.build.export.onnx_export import export_onnx, load_network
    from tierdet.registry.specs import SPECS

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    for name in models:
        record: dict[str, Any] = {}
        try:
            t = time.perf_counter()
            network = load_network(SPECS[name], checkpoint=None, seed=0)
            record["build_s"] = time.perf_counter() - t
            t = time.perf_counter()
            path = export_onnx(SPECS[name], network, folder / f"{name}.onnx")
            record.update(export_s=time.perf_counter() - t, onnx=str(path),
                          onnx_mb=path.stat().st_size / 2**20)
            weights = folder / f"{name}.pt"
            torch.save(network.module.state_dict(), weights)
            record["weights"] = str(weights)
        except Exception as error:  # the exporter is being changed: report, carry on
            record["error"] = f"{type(error).__name__}: {error}"[:2000]
        tmp = folder / f"{name}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(folder / f"{name}.json")
        print(name, record, flush=True)
    return 0


def section_onnx(plan: Plan, deadline: Deadline, nets: dict[str, Any], photos: list[Any],
                 exports: Exports) -> None:
    import onnxruntime as ort
    import torch
    from tierdet.build.export.onnx_export import wrap_for_export
    from tierdet.registry.specs import SPECS
    from tierdet.registry.tensors import INPUT_NAME

    say(f"\n## 3. Exported ONNX (ONNX Runtime {ort.__version__}, CPU) vs PyTorch fp32 "
        f"({plan.device}{', TF32 off' if plan.cuda else ''})")
    say(f"{plan.agree_batch} real photographs per model; tolerance {ATOL} on box corners "
        f"(input px) and scores, class exact; passes at >= {AGREE:.0%} of each side's rows "
        "matched. Random weights (seed 0), exported by tierdet's export_onnx in a background "
        "process; PyTorch runs the weights that process exported.")
    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    say("| model | export s | ONNX MB | ORT ms | rows ONNX / PyTorch | matched ONNX / PyTorch | "
        "worst matched box px / score | verdict |")
    say("|---|---|---|---|---|---|---|---|")
    rows: dict[str, Any] = {}
    drift: dict[str, Any] = {}
    for name in plan.models:
        if not deadline.allows(20, f"ONNX agreement {name}"):
            continue
        record = exports.result(name, deadline, reserve_s=15)
        if record is None:
            say(f"  SKIPPED (deadline): ONNX agreement {name}: its export did not finish in time")
            deadline.skipped.append(f"ONNX agreement {name}")
            continue
        if "error" in record:
            say(f"| {name} | export failed: {record['error'].splitlines()[0][:300]} "
                "| | | | | | FAIL |")
            rows[name] = record
            continue
        build_networks(plan, deadline, nets, [name], 1.0)
        if name not in nets:
            continue
        spec, network = SPECS[name], nets[name]
        network.module.load_state_dict(torch.load(record["weights"], weights_only=True))
        session = ort.InferenceSession(record["onnx"], providers=["CPUExecutionProvider"])
        images = model_inputs(spec, photos, plan.agree_batch)
        t = time.perf_counter()
        got = session.run(None, {INPUT_NAME: images})[0]
        ort_ms = (time.perf_counter() - t) * 1e3
        wrapper = copy.deepcopy(wrap_for_export(spec, network)).to(plan.device)
        tensor = torch.from_numpy(images).to(plan.device)
        with torch.no_grad():
            want = wrapper(tensor).cpu().numpy()
        result = {**record, **agreement(got, want), "ort_ms": ort_ms}
        rows[name] = result
        verdict = "PASS" if result["passed"] else "FAIL"
        say(f"| {name} | {record['export_s']:.0f} | {record['onnx_mb']:.1f} | {ort_ms:.0f} | "
            f"{result['rows'][0]} / {result['rows'][1]} | "
            f"{result['share'][0]:.1%} / {result['share'][1]:.1%} | "
            f"{result['worst_box_px']:.4f} / {result['worst_score']:.5f} | {verdict} |")
        if plan.cuda:
            front = Fp16Front(spec, network, plan.device)
            with torch.no_grad():
                half = wrapper.head(*front(tensor)).cpu().numpy()
            drift[name] = agreement(half, want)
        Path(record["onnx"]).unlink(missing_ok=True)
        Path(record["weights"]).unlink(missing_ok=True)
    if drift:
        say("\nfp16 (section 1's net, fp32 head) vs PyTorch fp32, same photos, same tolerance; "
            "information only:")
        say("| model | matched fp16 / fp32 | worst matched box px / score |")
        say("|---|---|---|")
        for name, d in drift.items():
            say(f"| {name} | {d['share'][0]:.1%} / {d['share'][1]:.1%} | "
                f"{d['worst_box_px']:.3f} / {d['worst_score']:.4f} |")
    plan.results["onnx"] = rows
    plan.results["fp16_vs_fp32"] = drift


# --- main -----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (or docs/performance.md, "
                                       "'GPU check').")
    p.add_argument("--prepare", type=Path, metavar="DIR",
                   help="here, with network: download the wheels and copy the photos into DIR "
                        "(DIR/wheels, DIR/photos), then exit")
    p.add_argument("--python-version", default="3.12",
                   help="CPython version of the wheels --prepare fetches (the GPU machine's)")
    p.add_argument("--photos-from", type=Path, default=COCO,
                   help="where --prepare takes its photos")
    p.add_argument("--assets", type=Path, metavar="DIR",
                   help="the prepared folder: its wheels are unpacked onto sys.path, its photos "
                        "used")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke test)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: one model (efficientdet-d0 unless --models), batches 1-2, "
                        "few iterations")
    p.add_argument("--models", help=f"comma-separated; default {','.join(MODELS)}")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds before remaining sections are skipped (a watchdog exits "
                        f"{GRACE_S} s later)")
    p.add_argument("--sections", default="1,2,3", help="which of 1 (latency), 2 (decode), "
                                                      "3 (ONNX agreement) to run")
    p.add_argument("--json", type=Path, help="write every figure here too")
    p.add_argument("--export-worker", type=Path, help=argparse.SUPPRESS)  # see Exports
    return p.parse_args(argv)


def timed(key: str, deadline: Deadline, plan: Plan, run: Callable[[], None]) -> None:
    """Run one section; a failure is reported and the next section runs."""
    began = deadline.elapsed()
    try:
        run()
    except Exception as error:
        import traceback

        say(f"SECTION {key} FAILED: {type(error).__name__}: {error}")
        say("".join(traceback.format_exc().splitlines(keepends=True)[-8:]))
        plan.results.setdefault("errors", {})[f"section {key}"] = repr(error)[:2000]
    say(f"(section {key}: {deadline.elapsed() - began:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.prepare:
        return prepare(args.prepare, args.python_version, args.photos_from)
    deadline = Deadline(args.budget)
    watchdog(args.budget + GRACE_S)
    if args.export_worker:
        if args.assets and SITE.is_dir():  # unpacked by the parent
            sys.path.insert(0, str(SITE))
        sys.path.insert(0, str(ROOT / "service"))
        return export_worker(args.export_worker, plan_for(args).models)
    unpacked = bootstrap(args.assets)
    sections = set(args.sections.split(","))
    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision

    plan = plan_for(args)
    if plan.cuda and not torch.cuda.is_available():
        say("no CUDA device: run with --device cpu for a smoke test")
        return 2
    if plan.cuda:
        torch.backends.cudnn.benchmark = True
    import effdet
    import pycocotools
    import simplejpeg
    import timm

    device_name = torch.cuda.get_device_name() if plan.cuda else "CPU"
    say(f"# tierdet GPU check ({'quick, ' if args.quick else ''}{device_name}, "
        f"{os.cpu_count()} cores, budget {args.budget:.0f} s, hard stop at "
        f"{args.budget + GRACE_S:.0f} s)")
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
        f"{torchvision.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"timm {timm.__version__}")
    for module in (effdet, timm, simplejpeg, pycocotools):
        say(f"  {module.__name__} from {Path(str(module.__file__)).parent.parent}")
    say(f"unpacked wheels: {', '.join(unpacked) or 'none'}")
    say("weights: random (seed 0, tierdet's load_network): latency does not depend on them; "
        "accuracy (AP) is not measured here")
    photos, source = load_photos(args.assets)
    say(f"photographs: {source}")
    plan.results.update(device=device_name, torch=torch.__version__, quick=args.quick,
                        photos=source)
    nets: dict[str, Any] = {}
    # On a GPU, now: the exports run on the CPU while section 1 runs on the GPU. On a
    # CPU (smoke test) they would only share its cores: they start at section 3.
    exports = None
    if "3" in sections and plan.cuda:
        exports = Exports(plan.models, args.assets, deadline.left())

    def save() -> None:  # after every section: a hard stop keeps what was measured
        plan.results["skipped"] = deadline.skipped
        plan.results["elapsed_s"] = deadline.elapsed()
        if args.json:
            args.json.write_text(json.dumps(plan.results, indent=1, default=str))

    try:
        if "1" in sections:
            timed("1", deadline, plan, lambda: section_latency(plan, deadline, nets, photos))
            save()
        if "2" in sections:
            if exports and not exports.wait(deadline, until=0.62, reserve_s=0):
                say("\n(the export process still runs: section 2's CPU figures share the "
                    "cores with it)")
            timed("2", deadline, plan, lambda: section_decode(plan, deadline, photos, source))
            save()
        if "3" in sections:
            started = exports or Exports(plan.models, args.assets, deadline.left())
            exports = started
            timed("3", deadline, plan,
                  lambda: section_onnx(plan, deadline, nets, photos, started))
    finally:
        if exports:
            exports.close()
    save()
    say(f"\ndone in {deadline.elapsed():.0f} s; skipped for the deadline: "
        f"{', '.join(deadline.skipped) or 'nothing'}")
    say("not checked here (needs Triton's container on a GPU): the TensorRT build itself, "
        "Triton's tensorrt backend, warm-up, priorities and queue policy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
