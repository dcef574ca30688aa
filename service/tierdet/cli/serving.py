"""``tierdet up``, ``tierdet serve`` and ``tierdet profile``."""

from __future__ import annotations

import argparse
import asyncio

from tierdet.cli.building import card_argument, model_names, weights_argument
from tierdet.serving.settings import load_settings


def cmd_up(args: argparse.Namespace) -> int:
    from tierdet.build.weights import WeightsSource
    from tierdet.devstack.up import run_stack
    from tierdet.registry.cards import shipped_cards, shipped_tiers

    settings = load_settings(http_port=args.port, grpc_port=args.grpc_port, http_host=args.host,
                             grpc_host=args.host)
    if settings.eval_dir is None:  # where `tierdet eval` writes by default: it refreshes
        settings = settings.model_copy(update={"eval_dir": args.home / "eval"})
    if settings.home is None:  # where the admin API builds the models it adds
        settings = settings.model_copy(update={"home": args.home})
    # Nothing asked for: the shipped real COCO ladder (examples/cards), no zoo model
    # (without downloadable official weights a zoo model would be untrained).
    ladder = args.card is None and not args.models
    cards = shipped_cards() if ladder else (args.card or [])
    models = model_names(args.models) if args.models else []
    if ladder and settings.tiers_file is None:  # its tiers, set for its models
        settings = settings.model_copy(update={"tiers_file": shipped_tiers()})
    asyncio.run(run_stack(settings, models, WeightsSource.parse(args.weights),
                          args.home, (args.triton_http_port, args.triton_grpc_port,
                                      args.triton_metrics_port), args.threads, cards))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tierdet.frontends.server import run_gateway

    asyncio.run(run_gateway(load_settings(http_port=args.port, grpc_port=args.grpc_port)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure latency per model and batch size through Triton; write the profile."""
    import tempfile
    from pathlib import Path

    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource
    from tierdet.devstack.profiling import measure
    from tierdet.devstack.stack import start_triton
    from tierdet.registry.specs import get_spec

    names = model_names(args.models)
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
        key = server.api_key if server is not None else load_settings().triton_api_key
        profile = asyncio.run(measure(url, sizes, batches, runs=args.runs, api_key=key))
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


def register(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    u = sub.add_parser("up", help="build if needed, start Triton and the gateway",
                       description="Build missing models, run tritonserver (from the "
                                   "nvidia-pytriton wheel) as a supervised child on loopback, "
                                   "wait until ready, then serve HTTP and gRPC. Ctrl-C or "
                                   "SIGTERM stops both.")
    u.add_argument("--models", help="comma-separated zoo model names (default: none, the "
                                     "shipped ladder's cards only)")
    weights_argument(u)
    card_argument(u, "; default without --models: examples/cards/*.yaml (the real COCO "
                     "ladder: YOLOX-Nano and PicoDet-S at 320 and 416)")
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

    s = sub.add_parser("serve", help="run the gateway against an existing Triton",
                       description="Serve HTTP and gRPC, forwarding to Triton at "
                                   "TIERDET_TRITON_URL. Configuration comes from TIERDET_* "
                                   "environment variables (see docs/configuration.md).")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default 8080)")
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    s.set_defaults(func=cmd_serve)

    pr = sub.add_parser("profile", help="measure latency per model and batch size",
                        description="Send batches of 1..N images to each model through "
                                    "Triton, one request at a time, and write the median "
                                    "latencies to a profile the router loads "
                                    "(default HOME/profile.json). Without --triton-url a "
                                    "local tritonserver is started for the measurement.")
    pr.add_argument("--models", help="comma-separated names (default: the default models)")
    weights_argument(pr)
    pr.add_argument("--batches", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    pr.add_argument("--runs", type=int, default=10, help="timed runs per batch size")
    pr.add_argument("--triton-url", help="profile this Triton (host:port gRPC) instead")
    pr.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (local)")
    pr.add_argument("--out", type=Path, help="output file (default HOME/profile.json)")
    pr.set_defaults(func=cmd_profile)
