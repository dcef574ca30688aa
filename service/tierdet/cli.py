"""The ``tierdet`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tierdet import __version__, engines
from tierdet.config import ConfigError, default_home, load_settings
from tierdet.specs import DEFAULT_MODELS, SPECS, ZOO

if TYPE_CHECKING:
    from tierdet.client import DetectResult


def _models(text: str | None, all_models: bool = False) -> list[str]:
    if all_models:  # the published zoo; trained models have their own weights
        return list(ZOO)
    names = [m.strip() for m in (text or ",".join(DEFAULT_MODELS)).split(",") if m.strip()]
    unknown = [m for m in names if m not in SPECS]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(SPECS)}")
    return names


def _weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="official",
                   help="'official' (download from the spec URL, sha256-verified), "
                        "'random[:SEED]' (untrained, for tests), or a checkpoint path "
                        "(default: official)")


def cmd_build(args: argparse.Namespace) -> int:
    from tierdet.build import assemble, build_model
    from tierdet.specs import get_spec
    from tierdet.weights import WeightsSource

    source = WeightsSource.parse(args.weights)
    built = [build_model(get_spec(m), source, args.home) for m in _models(args.models, args.all)]
    for model in built:
        print(f"{model.spec.name}: {model.onnx} ({model.provenance['weights']})")
    repository = assemble(built, args.home, args.target, args.threads)
    print(f"repository: {repository}")
    return 0


def cmd_repo(args: argparse.Namespace) -> int:
    import tempfile

    from tierdet.repository import COMMITTED_ROOT, generate

    if not args.check:
        for path in generate(COMMITTED_ROOT):
            print(path.relative_to(COMMITTED_ROOT.parent))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p.read_text() for p in generate(Path(tmp))}
    drift = [str(rel) for rel, text in fresh.items()
             if not (COMMITTED_ROOT / rel).is_file() or (COMMITTED_ROOT / rel).read_text() != text]
    if drift:
        print("model_repository/ differs from the specs; run `tierdet repo generate`:\n  "
              + "\n  ".join(drift))
        return 1
    print(f"model_repository/ matches the specs ({len(fresh)} configs)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from tierdet.up import run_stack
    from tierdet.weights import WeightsSource

    settings = load_settings(http_port=args.port, grpc_port=args.grpc_port, http_host=args.host,
                             grpc_host=args.host)
    asyncio.run(run_stack(settings, _models(args.models), WeightsSource.parse(args.weights),
                          args.home, (args.triton_http_port, args.triton_grpc_port,
                                      args.triton_metrics_port), args.threads))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure latency per model and batch size through Triton; write the profile."""
    import tempfile

    from tierdet.build import ensure_built
    from tierdet.localstack import start_triton
    from tierdet.profile import measure
    from tierdet.specs import get_spec
    from tierdet.weights import WeightsSource

    names = _models(args.models)
    sizes = {name: get_spec(name).input_size for name in names}
    batches = tuple(int(b) for b in args.batches.split(","))
    server = None
    url = args.triton_url
    if url is None:
        built = ensure_built(names, WeightsSource.parse(args.weights), args.home)
        server = start_triton(built, args.home, Path(tempfile.mkdtemp(prefix="tierdet-")),
                              threads=args.threads)
        url = server.grpc_url
    try:
        profile = asyncio.run(measure(url, sizes, batches, runs=args.runs))
    finally:
        if server is not None:
            server.stop()
    out = args.out or args.home / "profile.json"
    profile.save(out)
    print(f"{'model':<18}" + "".join(f"{'b=' + str(b):>10}" for b in batches) + "  ms")
    for name, prof in profile.models.items():
        print(f"{name:<18}" + "".join(f"{prof.batch_ms[b]:>10.1f}" for b in batches))
    print(f"profile: {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tierdet.server import run_gateway

    asyncio.run(run_gateway(load_settings(http_port=args.port, grpc_port=args.grpc_port)))
    return 0


def _url_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("TIERDET_URL", "http://127.0.0.1:8080"),
                   help="the gateway's HTTP address (env TIERDET_URL; "
                        "default http://127.0.0.1:8080)")


def _client_error(exc: Exception, url: str) -> int:
    from tierdet.client import CONNECTION_FAILED

    code = getattr(exc, "code", "")
    print(f"error: {exc}", file=sys.stderr)
    if code == CONNECTION_FAILED:
        print(f"is the gateway running at {url}? (start it with `tierdet up`)", file=sys.stderr)
    return 1


def cmd_detect(args: argparse.Namespace) -> int:
    """Detect through the HTTP API; print a table; optionally write the image with boxes."""
    from tierdet.client import Client, TierdetError

    try:
        data = args.image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, timeout_s=args.timeout_s) as client:
            result = client.detect(data, model=args.model, tier=args.tier, sla_ms=args.sla_ms,
                                   score_threshold=args.score_threshold,
                                   max_detections=args.max_detections)
    except TierdetError as exc:
        return _client_error(exc, args.url)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps(asdict(result), indent=2))
    else:
        print(detections_table(result))
    if args.out is not None:
        # Drawn here from the same answer, not by a second render=true call:
        # one inference, and the picture always matches the printed table.
        from tierdet import render, validation

        image = validation.decode_image(data, 1 << 62, 1 << 62)  # the server took it
        fmt: render.ImageFormat = "png" if args.out.suffix.lower() == ".png" else "jpeg"
        args.out.write_bytes(render.encode(render.draw(image, result.detections), fmt))
        if not args.json:
            print(f"wrote {args.out}")
    return 0


def detections_table(result: DetectResult) -> str:
    r, t = result.routing, result.timing
    route = f"tier {r.tier}, " if r.tier else ""
    lines = [f"{result.model}: {len(result.detections)} detection(s) in "
             f"{result.width}x{result.height}, {t.total_ms:.0f} ms "
             f"({route}budget {r.budget_ms:.0f} ms{', degraded' if r.degraded else ''})"]
    if result.detections:
        lines.append(f"{'#':>3}  {'class':<16}{'score':>7}{'x1':>8}{'y1':>8}{'x2':>8}{'y2':>8}")
        for i, d in enumerate(result.detections, 1):
            lines.append(f"{i:>3}  {d.class_name[:15]:<16}{d.score:>7.3f}{d.x1:>8.1f}"
                         f"{d.y1:>8.1f}{d.x2:>8.1f}{d.y2:>8.1f}")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    """The gateway's models (readiness, weights, AP) and tiers, via the HTTP API."""
    from tierdet.client import Client, TierdetError

    try:
        with Client(args.url, timeout_s=args.timeout_s) as client:
            models, tiers = client.models(), client.tiers()
    except TierdetError as exc:
        return _client_error(exc, args.url)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps({"models": [asdict(m) for m in models],
                          "tiers": [asdict(t) for t in tiers]}, indent=2))
        return 0
    print(f"{'model':<18}{'ready':<7}{'AP':>6}{'input':>7}  weights")
    for m in models:
        print(f"{m.name:<18}{'yes' if m.ready else 'no':<7}{m.published_coco_ap:>6.1f}"
              f"{m.input_size:>7}  {m.weights}")
    print(f"\n{'tier':<18}{'budget':>9}  models")
    for t in tiers:
        name = t.name + (" (default)" if t.default else "")
        print(f"{name:<18}{t.budget_ms:>6.0f} ms  {', '.join(t.models) or 'all served'}"
              f"{'; late answers allowed' if t.degrade else ''}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierdet", description=__doc__)
    p.add_argument("--version", action="version", version=f"tierdet {__version__}")
    p.add_argument("--home", type=Path, default=default_home(),
                   help="folder for weights, built models and the Triton repository "
                        "(env TIERDET_HOME; default ~/.cache/tierdet)")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export models to ONNX and assemble a Triton repository",
                       description="Turn model specs + weights into ONNX files (normalise, "
                                   "network, decode, NMS in one graph) and install them into "
                                   "HOME/repository/TARGET.")
    b.add_argument("--models", help=f"comma-separated names (default: {','.join(DEFAULT_MODELS)})")
    b.add_argument("--all", action="store_true", help="build the 15 published models (the zoo)")
    _weights_arg(b)
    b.add_argument("--target", default="cpu-local", choices=["cpu-local", "cpu"],
                   help="repository flavour to assemble (gpu engines are built on the GPU host)")
    b.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per model (0: all cores)")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("repo", help="regenerate the committed model_repository/ configs",
                       description="Rewrite model_repository/<target>/<model>/config.pbtxt "
                                   "from the specs; --check reports drift instead.")
    r.add_argument("repo_command", choices=["generate"],
                   help="generate: write the configs (or check them with --check)")
    r.add_argument("--check", action="store_true", help="exit 1 if the files differ")
    r.set_defaults(func=cmd_repo)

    u = sub.add_parser("up", help="build if needed, start Triton and the gateway",
                       description="Build missing models, run tritonserver (from the "
                                   "nvidia-pytriton wheel) as a supervised child on loopback, "
                                   "wait until ready, then serve HTTP and gRPC. Ctrl-C or "
                                   "SIGTERM stops both.")
    u.add_argument("--models", help=f"comma-separated names (default: {','.join(DEFAULT_MODELS)})")
    _weights_arg(u)
    u.add_argument("--host", default=None, help="gateway bind address (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=None, help="gateway HTTP port (default 8080)")
    u.add_argument("--grpc-port", type=int, default=None, help="gateway gRPC port (default 50051)")
    u.add_argument("--triton-http-port", type=int, default=8000,
                   help="Triton's HTTP port on loopback (default 8000)")
    u.add_argument("--triton-grpc-port", type=int, default=8001,
                   help="Triton's gRPC port on loopback (default 8001)")
    u.add_argument("--triton-metrics-port", type=int, default=8002,
                   help="Triton's metrics port on loopback (default 8002)")
    u.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per model (0: all cores)")
    u.set_defaults(func=cmd_up)

    pr = sub.add_parser("profile", help="measure latency per model and batch size",
                        description="Send batches of 1..N images to each model through "
                                    "Triton, one request at a time, and write the median "
                                    "latencies to a profile the router loads "
                                    "(default HOME/profile.json). Without --triton-url a "
                                    "local tritonserver is started for the measurement.")
    pr.add_argument("--models", help="comma-separated names (default: the default models)")
    _weights_arg(pr)
    pr.add_argument("--batches", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    pr.add_argument("--runs", type=int, default=10, help="timed runs per batch size")
    pr.add_argument("--triton-url", help="profile this Triton (host:port gRPC) instead")
    pr.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (local)")
    pr.add_argument("--out", type=Path, help="output file (default HOME/profile.json)")
    pr.set_defaults(func=cmd_profile)

    s = sub.add_parser("serve", help="run the gateway against an existing Triton",
                       description="Serve HTTP and gRPC, forwarding to Triton at "
                                   "TIERDET_TRITON_URL. Configuration comes from TIERDET_* "
                                   "environment variables (see README).")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8080)")
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("detect", help="detect objects in an image through a running gateway",
                       description="Send IMAGE to the gateway's HTTP API, print the detections "
                                   "as a table, and with --out write the image with boxes, "
                                   "class names and scores drawn (PNG if OUT ends in .png, "
                                   "else JPEG).",
                       epilog="example: tierdet detect photo.jpg --out boxed.jpg --tier realtime")
    d.add_argument("image", type=Path, help="the image file (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    d.add_argument("--out", type=Path, help="write the annotated image here")
    _url_arg(d)
    d.add_argument("--tier", help="a named tier, e.g. realtime, balanced, accurate "
                                  "(`tierdet models` lists them)")
    d.add_argument("--sla-ms", type=float, help="latency budget in ms, end to end at the gateway")
    d.add_argument("--model", help="pin a model instead of letting the router choose")
    d.add_argument("--score-threshold", type=float,
                   help="drop detections scoring below this (0..1; default: server's)")
    d.add_argument("--max-detections", type=int, help="return at most this many detections")
    d.add_argument("--json", action="store_true", help="print the full answer as JSON")
    d.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout (default 30)")
    d.set_defaults(func=cmd_detect)

    m = sub.add_parser("models", help="list a running gateway's models and tiers",
                       description="Ask the gateway (GET /v1/models) which models it serves, "
                                   "whether each is ready, where its weights come from and "
                                   "its published COCO AP; then its latency tiers.")
    _url_arg(m)
    m.add_argument("--json", action="store_true", help="print JSON instead of tables")
    m.add_argument("--timeout-s", type=float, default=10.0, help="HTTP timeout (default 10)")
    m.set_defaults(func=cmd_models)

    e = sub.add_parser("engines", help="TensorRT plans for the gpu repository (on a GPU host)",
                       description="Build fp16 TensorRT plans from the built ONNX models on "
                                   "this GPU (cached per GPU model and TensorRT version) and "
                                   "write HOME/repository/gpu. The same code runs as "
                                   "`python3 engines.py` inside NVIDIA's TensorRT container.")
    engines.add_arguments(e)
    e.set_defaults(func=engines.run)

    from tierdet import accuracy_cli  # dataset synth, train, eval

    accuracy_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The ONNX exporter narrates every optimisation pass at INFO.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
