"""Scale-up benchmark (issue 12): what one gateway costs per image, and what it serves.

All in one run, loopback only, every load bounded in time:

1. **Instant model**: Triton serves EfficientDet-D0's name and config with a
   model that answers at once (benchmarks/instant/model.py), so the figures are
   everything but the network. For 1280x720 and 1920x1080 JPEGs (quality 90),
   over HTTP and gRPC: gateway CPU ms per request (all its threads, from
   /proc, over a closed-loop load) and images/s, driven by native load
   generators (``hey`` for HTTP, ``h2load`` for gRPC) so that the generator's
   own Python does not set the figure. Side by side: the same gateway from
   ``--baseline REV`` (a git worktree), and tritonclient sending the same
   decoded, letterboxed tensors straight to the same Triton (sequential p50,
   with the decode and letterbox done the gateway's way).
2. **Real model**: EfficientDet-D0 (ONNX Runtime in Triton's python backend)
   through tierdet against the service a user writes by hand
   (benchmarks/handwritten_service.py: FastAPI + ONNX Runtime, the same ONNX
   file), closed loop at concurrency 1 and 4, two rounds interleaved.
3. **v2** (``--sections v2``, issue 24): on the instant model, one gateway,
   the 720p JPEG: gateway CPU ms per request on the Open Inference Protocol
   (REST with the binary tensor data extension, as tritonclient sends it;
   gRPC ModelInfer) against /v1/detect and Detector/Detect, rounds
   interleaved, medians and the v2/v1 ratio per protocol.

    apt-get install hey nghttp2-client   # the load generators
    python benchmarks/scale_up.py --baseline 62cdb2b
    python benchmarks/scale_up.py --sections v2 --rounds 3   # v2 vs v1 only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import tritonclient.grpc as triton_grpc
from native_tools import require
from tierdet.build.models import BuiltModel, assemble, default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import GatewayProcess, free_port, stop_process, wait_http
from tierdet.devstack.triton import LocalTriton
from tierdet.proto import detection_pb2 as pb
from tierdet.registry.specs import get_spec
from tierdet.registry.tensors import INPUT_NAME
from tierdet.serving import decoding, imaging

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "efficientdet-d0"
BUDGET_MS = "60000"


def photos() -> dict[str, bytes]:
    """Real photographs (scikit-image) at camera sizes, JPEG quality 90."""
    import skimage.data

    def jpeg(image: np.ndarray, size: tuple[int, int]) -> bytes:
        resized = cv2.resize(image[..., ::-1], size, interpolation=cv2.INTER_AREA)
        return cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()

    return {"720p": jpeg(skimage.data.astronaut(), (1280, 720)),
            "1080p": jpeg(skimage.data.coffee(), (1920, 1080))}


# -- measuring ------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (a
    gateway's workers), all their threads."""
    children = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit() and int(_stat(int(entry.name))[1]) == pid:
                children.append(int(entry.name))
    fields = _stat(pid)
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_s(child) for child in children)


@dataclass
class Load:
    rps: float
    requests: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms: float | None = None  # server CPU per request


def multipart(jpeg: bytes, **fields: str) -> tuple[bytes, str]:
    boundary = "tierdetbenchboundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
             .encode() for k, v in fields.items()]
    body = b"".join(parts) + (f"--{boundary}\r\nContent-Disposition: form-data; "
                              f"name=\"image\"; filename=\"a.jpg\"\r\nContent-Type: "
                              "image/jpeg\r\n\r\n").encode() + jpeg + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def hey(url: str, body: Path, content_type: str, concurrency: int, seconds: float,
        headers: dict[str, str] | None = None) -> Load:
    """Closed loop for ``seconds``; latencies from hey's per-request CSV (its own
    summary leaves out the high percentiles of short runs)."""
    extra = [arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")]
    out = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST",
                          "-T", content_type, "-D", str(body), *extra, "-o", "csv", url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rows = [line.split(",") for line in out.splitlines()[1:] if line]
    statuses = {row[6] for row in rows}
    if statuses != {"200"}:
        raise RuntimeError(f"hey saw answers other than 200: {sorted(statuses)}")
    latency = np.array([float(row[0]) for row in rows]) * 1e3
    span = max(float(row[7]) + float(row[0]) for row in rows)
    return Load(len(rows) / span, len(rows), float(np.percentile(latency, 50)),
                float(np.percentile(latency, 99)))


def h2load(target: str, body: Path, concurrency: int, seconds: float,
           method: str = "tierdet.v1.Detector/Detect") -> Load:
    """gRPC Detect calls as raw HTTP/2 (h2load cannot read gRPC status trailers:
    the call is checked once with a real client before). One call at a time on
    each of ``concurrency`` connections: the kernel spreads connections, not
    calls, over a gateway's workers."""
    out = subprocess.run(["h2load", "-D", str(int(seconds)), "-c", str(concurrency),
                          "-m", "1", "-d", str(body),
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          f"http://{target}/{method}"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if done is None or done.group(1) != done.group(2):
        raise RuntimeError(f"h2load: not every call succeeded\n{out}")
    rps = float(re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    return Load(rps, int(done.group(1)))


def with_cpu(pid: int, run: Callable[[], Load]) -> Load:
    before = cpu_s(pid)
    load = run()
    load.cpu_ms = (cpu_s(pid) - before) / load.requests * 1e3
    return load


def p50_ms(call: Callable[[], object], n: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# -- the stacks -------------------------------------------------------------------


def triton_serving(built: BuiltModel, work: Path, instant: bool) -> LocalTriton:
    repository = assemble([built], work / "home", intra_op_threads=2)
    if instant:
        shutil.copy(HERE / "instant" / "model.py", repository / MODEL / "1" / "model.py")
    server = LocalTriton(repository, work, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), models=[MODEL],
                         log_path=work / "triton.log")
    server.start()
    if not server.wait_ready(120).get(MODEL):
        raise RuntimeError(f"{MODEL} did not load; see {server.log_path}")
    return server


@contextlib.contextmanager
def gateway(triton: LocalTriton, log: Path, service: Path | None = None,
            **settings: str) -> Iterator[GatewayProcess]:
    """``tierdet serve`` (``workers="2"``: two worker processes); from another
    checkout's service/ folder with ``service``."""
    saved = os.environ.get("PYTHONPATH")
    if service is not None:
        os.environ["PYTHONPATH"] = str(service)
    try:
        process = GatewayProcess.start(triton.endpoint, log, models=MODEL, **settings)
    finally:
        if service is not None:
            os.environ.pop("PYTHONPATH")
            if saved is not None:
                os.environ["PYTHONPATH"] = saved
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def baseline_checkout(rev: str | None, work: Path) -> Iterator[Path | None]:
    if rev is None:
        yield None
        return
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)
    try:
        yield tree / "service"
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=False, capture_output=True)


@contextlib.contextmanager
def handwritten(onnx: Path, log: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "TIERDET_BENCH_ONNX": str(onnx.resolve())}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "handwritten_service:app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level",
                             "warning"], cwd=HERE, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/docs", 60, proc)
        yield url
    finally:
        stop_process(proc)


# -- sections ---------------------------------------------------------------------


def instant_section(built: BuiltModel, jpegs: dict[str, bytes], work: Path,
                    baseline: Path | None, args: argparse.Namespace) -> None:
    triton = triton_serving(built, work / "instant", instant=True)
    spec = get_spec(MODEL)
    try:
        direct = triton_grpc.InferenceServerClient(triton.grpc_url)

        def straight(jpeg: bytes) -> Callable[[], object]:
            def call() -> object:  # the gateway's decode and letterbox, then tritonclient
                image = decoding.decode(jpeg, 1 << 30, 1 << 30, lambda w, h: imaging.covers(
                    w, h, spec.input_size, spec.preprocessing))
                tensor, _ = imaging.prepare(image.pixels, spec.input_size, spec.preprocessing,
                                            image.step, (image.width, image.height))
                x = triton_grpc.InferInput(INPUT_NAME, [1, *tensor.shape], "UINT8")
                x.set_data_from_numpy(tensor[None])
                return direct.infer(MODEL, [x])
            return call

        straight_p50 = {name: p50_ms(straight(jpeg), args.sequential)
                        for name, jpeg in jpegs.items()}
        direct.close()
        rows = []
        sides = [(f"tierdet {n}w", None, n) for n in args.workers] + (
            [("baseline", baseline, 1)] if baseline else [])
        for side, service, workers in sides:
            settings = {"workers": str(workers)} if workers > 1 else {}
            with gateway(triton, work / f"gateway-{side}.log", service, **settings) as gw:
                rows += measure_gateway(side, gw, jpegs, work, args)
        print(f"\n## Instant model ({MODEL}'s config, answers at once), "
              f"closed loop c={args.concurrency}, {args.seconds:.0f} s each\n")
        print("| gateway | image | protocol | CPU ms / request | images/s | p50 seq ms | "
              "p50 vs tritonclient |")
        print("|---|---|---|---|---|---|---|")
        for side, name, protocol, load, seq in rows:
            print(f"| {side} | {name} | {protocol} | {load.cpu_ms:.1f} | {load.rps:.0f} | "
                  f"{seq:.1f} | {seq / straight_p50[name]:.2f}x |")
        for name, ms in straight_p50.items():
            print(f"| tritonclient straight | {name} | gRPC | | | {ms:.1f} | 1.00x |")
        print()
        ours = [side for side, _, _ in sides if side != "baseline"]
        references = ours[:1] + (["baseline"] if baseline else [])
        for reference in references:
            for side in (s for s in ours if s != reference):
                for _, name, protocol, load, _ in (r for r in rows if r[0] == side):
                    ref = next(r[3] for r in rows if r[0] == reference and r[1:3] ==
                               (name, protocol))
                    print(f"{name} {protocol}: {side} vs {reference}: images/s "
                          f"{load.rps / ref.rps:.2f}x, CPU per request {load.cpu_ms:.1f} "
                          f"vs {ref.cpu_ms:.1f} ms")
    finally:
        triton.stop()


def measure_gateway(side: str, gw: GatewayProcess, jpegs: dict[str, bytes], work: Path,
                    args: argparse.Namespace) -> list[tuple]:
    from tierdet.client import GrpcClient

    rows = []
    pid = gw.process.pid
    with httpx.Client(base_url=gw.http, timeout=60) as http, GrpcClient(gw.grpc) as grpc:
        for name, jpeg in jpegs.items():
            # A budget no answer misses: throughput, with the router still routing.
            body, content_type = multipart(jpeg, sla_ms=BUDGET_MS)
            (work / "body.http").write_bytes(body)
            message = pb.DetectRequest(image=jpeg, sla_ms=float(BUDGET_MS)).SerializeToString()
            (work / "body.grpc").write_bytes(b"\x00" + len(message).to_bytes(4, "big")
                                             + message)
            assert grpc.detect(jpeg).model == MODEL  # h2load cannot check answers

            def post(data: bytes = jpeg) -> object:
                r = http.post("/v1/detect", files={"image": ("a.jpg", data, "image/jpeg")},
                              data={"sla_ms": BUDGET_MS})
                r.raise_for_status()
                return r

            seq_http = p50_ms(post, args.sequential)
            seq_grpc = p50_ms(lambda data=jpeg: grpc.detect(data, sla_ms=float(BUDGET_MS)),
                              args.sequential)
            load_http = with_cpu(pid, lambda ct=content_type: hey(
                gw.http + "/v1/detect", work / "body.http", ct, args.concurrency, args.seconds))
            load_grpc = with_cpu(pid, lambda: h2load(gw.grpc, work / "body.grpc",
                                                     args.concurrency, args.seconds))
            rows += [(side, name, "HTTP", load_http, seq_http),
                     (side, name, "gRPC", load_grpc, seq_grpc)]
    return rows


def real_model_section(built: BuiltModel, jpeg: bytes, work: Path,
                       args: argparse.Namespace) -> None:
    # A budget no answer misses (the hand-written service has none): both are
    # measured on throughput alone.
    body, content_type = multipart(jpeg, sla_ms=BUDGET_MS)
    (work / "body.http").write_bytes(body)
    (work / "body.hand").write_bytes(multipart(jpeg)[0])
    results: dict[tuple[str, int], list[Load]] = {}
    triton = triton_serving(built, work / "real", instant=False)
    most = max(args.workers)
    try:
        with gateway(triton, work / "gateway-real.log") as gw, \
                gateway(triton, work / "gateway-real-workers.log", workers=str(most)) as many, \
                handwritten(built.onnx, work / "handwritten.log") as hand:
            sides = [("tierdet", gw.http + "/v1/detect", "body.http"),
                     ("hand-written", hand + "/detect", "body.hand")]
            if most > 1:
                sides.insert(1, (f"tierdet {most}w", many.http + "/v1/detect", "body.http"))
            for _ in range(args.rounds):
                for concurrency in (1, 4):
                    for side, url, sent in sides:
                        load = hey(url, work / sent, content_type, concurrency, args.seconds)
                        results.setdefault((side, concurrency), []).append(load)
    finally:
        triton.stop()
    print(f"\n## {MODEL} (random weights, ONNX Runtime on the CPU): tierdet vs the "
          f"hand-written FastAPI + ONNX Runtime service, 720p JPEG, {args.rounds} rounds "
          f"interleaved, {args.seconds:.0f} s each (medians of rounds)\n")
    print("| concurrency | service | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for (side, concurrency), loads in sorted(results.items(), key=lambda kv: kv[0][1]):
        print(f"| {concurrency} | {side} | {statistics.median(x.rps for x in loads):.1f} | "
              f"{statistics.median(x.p50_ms for x in loads):.0f} | "  # type: ignore[misc]
              f"{statistics.median(x.p99_ms for x in loads):.0f} |")  # type: ignore[misc]
    for concurrency in (1, 4):
        theirs = statistics.median(x.rps for x in results[("hand-written", concurrency)])
        for side, _, _ in sides[:-1]:
            ours = statistics.median(x.rps for x in results[(side, concurrency)])
            print(f"concurrency {concurrency}: {side} {ours / theirs:.2f}x the hand-written "
                  "service's images/s")


def grpc_frame(message: bytes) -> bytes:
    """One gRPC message on the wire (uncompressed), as h2load sends it."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def v2_bodies(jpeg: bytes, work: Path) -> dict[str, str]:
    """The v2 requests a tritonclient user sends, written for the load generators;
    returns the REST request's headers."""
    import tritonclient.http as triton_http
    from tritonclient.grpc import service_pb2

    tensor = triton_http.InferInput("IMAGE", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg], dtype=np.object_))  # binary, as by default
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [tensor], parameters={"sla_ms": int(BUDGET_MS)})
    (work / "body.v2http").write_bytes(body)
    # What tritonclient.grpc sends: the BYTES tensor as raw_input_contents.
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.parameters["sla_ms"].int64_param = int(BUDGET_MS)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(jpeg).to_bytes(4, "little") + jpeg)
    (work / "body.v2grpc").write_bytes(grpc_frame(request.SerializeToString()))
    return {"Inference-Header-Content-Length": str(json_size)}


def v2_section(built: BuiltModel, jpeg: bytes, work: Path, args: argparse.Namespace) -> None:
    """Gateway CPU per request, v2 against v1, HTTP and gRPC, rounds interleaved."""
    from tierdet.client import GrpcClient

    body, content_type = multipart(jpeg, sla_ms=BUDGET_MS)
    (work / "body.http").write_bytes(body)
    message = pb.DetectRequest(image=jpeg, sla_ms=float(BUDGET_MS)).SerializeToString()
    (work / "body.grpc").write_bytes(grpc_frame(message))
    v2_headers = v2_bodies(jpeg, work)
    triton = triton_serving(built, work / "v2", instant=True)
    loads: dict[tuple[str, str], list[Load]] = {}
    try:
        with gateway(triton, work / "gateway-v2.log") as gw:
            with GrpcClient(gw.grpc) as client:  # h2load cannot check answers
                assert client.detect(jpeg).model == MODEL
            with triton_grpc.InferenceServerClient(gw.grpc) as v2_client:
                x = triton_grpc.InferInput("IMAGE", [1], "BYTES")
                x.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
                assert v2_client.infer(MODEL, [x]).as_numpy("COUNTS").shape == (1,)
            url = f"{gw.http}/v2/models/{MODEL}/infer"
            runs: dict[tuple[str, str], Callable[[], Load]] = {
                ("HTTP", "v1"): lambda: hey(gw.http + "/v1/detect", work / "body.http",
                                            content_type, args.concurrency, args.seconds),
                ("HTTP", "v2"): lambda: hey(url, work / "body.v2http",
                                            "application/octet-stream", args.concurrency,
                                            args.seconds, v2_headers),
                ("gRPC", "v1"): lambda: h2load(gw.grpc, work / "body.grpc",
                                               args.concurrency, args.seconds),
                ("gRPC", "v2"): lambda: h2load(gw.grpc, work / "body.v2grpc",
                                               args.concurrency, args.seconds,
                                               "inference.GRPCInferenceService/ModelInfer"),
            }
            for _ in range(args.rounds):
                for key, run in runs.items():
                    loads.setdefault(key, []).append(with_cpu(gw.process.pid, run))
    finally:
        triton.stop()
    print(f"\n## Open Inference Protocol (v2) vs tierdet's own API (v1): instant model, "
          f"720p JPEG, c={args.concurrency}, {args.rounds} rounds interleaved, "
          f"{args.seconds:.0f} s each (medians)\n")
    print("| protocol | API | CPU ms / request | images/s |")
    print("|---|---|---|---|")
    cpu = {k: statistics.median(x.cpu_ms for x in v) for k, v in loads.items()}  # type: ignore[misc]
    for (protocol, api), runs_ in loads.items():
        print(f"| {protocol} | {api} | {cpu[(protocol, api)]:.2f} | "
              f"{statistics.median(x.rps for x in runs_):.0f} |")
    for protocol in ("HTTP", "gRPC"):
        print(f"{protocol}: v2 CPU per request {cpu[(protocol, 'v2')] / cpu[(protocol, 'v1')]:.2f}x"
              " v1's")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--weights", default="random:0")
    p.add_argument("--baseline", help="a git revision whose gateway runs side by side")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--sequential", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sections", default="instant,real,v2")
    p.add_argument("--workers", default="1,2", type=lambda v: [int(n) for n in v.split(",")],
                   help="gateway worker counts measured side by side (the first is the "
                        "reference of the ratios)")
    args = p.parse_args(argv)
    require("hey", "h2load")
    (built,) = ensure_built([MODEL], WeightsSource.parse(args.weights), args.home,
                            progress=False)
    jpegs = photos()
    print(f"{socket.gethostname()}: {os.cpu_count()} CPUs; "
          + ", ".join(f"{k} {len(v) // 1024} KiB" for k, v in jpegs.items()))
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="tierdet-scale-") as tmp:
        work = Path(tmp)
        with baseline_checkout(args.baseline, work) as baseline:
            if "instant" in sections:
                instant_section(built, jpegs, work, baseline, args)
            if "real" in sections:
                real_model_section(built, jpegs["720p"], work, args)
            if "v2" in sections:
                v2_section(built, jpegs["720p"], work, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
