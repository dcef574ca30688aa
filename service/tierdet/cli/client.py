"""``tierdet detect`` and ``tierdet models``: the service through its HTTP API.

The detect flags are the request options, derived from
``tierdet.contract.options.DetectOptions`` (name, type and help).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, get_args

from tierdet.contract.options import LIST_OPTIONS, DetectOptions

if TYPE_CHECKING:
    from tierdet.contract.results import DetectResult


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option_type(name: str) -> Any:
    """The argparse type of option ``name``: its annotation without None."""
    annotation = DetectOptions.model_fields[name].annotation
    kinds = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    return kinds[0] if kinds[0] in (int, float) else str


def add_option_flags(p: argparse.ArgumentParser) -> None:
    for name, info in DetectOptions.model_fields.items():
        extra = " (comma-separated)" if name in LIST_OPTIONS else ""
        p.add_argument(_flag(name), dest=name, type=_option_type(name),
                       help=(info.description or name) + extra)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, name) for name in DetectOptions.model_fields
              if getattr(args, name) is not None}
    for name in LIST_OPTIONS & values.keys():
        values[name] = [v for v in values[name].split(",") if v.strip()]
    return values


def _url_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("TIERDET_URL", "http://127.0.0.1:8080"),
                   help="the gateway's HTTP address (env TIERDET_URL; "
                        "default http://127.0.0.1:8080)")


def _client_error(exc: Exception, url: str) -> int:
    from tierdet.client import CONNECTION_FAILED

    print(f"error: {exc}", file=sys.stderr)
    if getattr(exc, "code", "") == CONNECTION_FAILED:
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
            result = client.detect(data, **options_from_args(args))
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
        from tierdet.serving import decoding, render

        image = decoding.decode_image(data, 1 << 62, 1 << 62)  # the server took it
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
            served = client.models_info()
    except TierdetError as exc:
        return _client_error(exc, args.url)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps({"models": [asdict(m) for m in served.models],
                          "tiers": [asdict(t) for t in served.tiers]}, indent=2))
        return 0
    print(f"{'model':<24}{'ready':<7}{'AP':>6}{'input':>7}  weights")
    for m in served.models:
        print(f"{m.name:<24}{'yes' if m.ready else 'no':<7}{m.routing_ap:>6.1f}"
              f"{m.input_size:>7}  {m.weights}")
    print(f"\n{'tier':<24}{'budget':>9}  models")
    for t in served.tiers:
        name = t.name + (" (default)" if t.default else "")
        print(f"{name:<24}{t.budget_ms:>6.0f} ms  {', '.join(t.models) or 'all served'}"
              f"{'; late answers allowed' if t.degrade else ''}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    d = sub.add_parser("detect", help="detect objects in an image through a running gateway",
                       description="Send IMAGE to the gateway's HTTP API, print the detections "
                                   "as a table, and with --out write the image with boxes, "
                                   "class names and scores drawn (PNG if OUT ends in .png, "
                                   "else JPEG).",
                       epilog="example: tierdet detect photo.jpg --out boxed.jpg --tier realtime")
    d.add_argument("image", type=Path, help="the image file (JPEG, PNG, WebP, BMP, TIFF)")
    d.add_argument("--out", type=Path, help="write the annotated image here")
    _url_argument(d)
    add_option_flags(d)
    d.add_argument("--json", action="store_true", help="print the full answer as JSON")
    d.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout (default 30)")
    d.set_defaults(func=cmd_detect)

    m = sub.add_parser("models", help="list a running gateway's models and tiers",
                       description="Ask the gateway (GET /v1/models) which models it serves, "
                                   "whether each is ready, where its weights come from and "
                                   "the AP the router ranks it by; then its latency tiers.")
    _url_argument(m)
    m.add_argument("--json", action="store_true", help="print JSON instead of tables")
    m.add_argument("--timeout-s", type=float, default=10.0, help="HTTP timeout (default 10)")
    m.set_defaults(func=cmd_models)
