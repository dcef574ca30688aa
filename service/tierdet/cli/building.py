"""``tierdet build``, ``tierdet engines`` and ``tierdet generate``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tierdet.build import engines
from tierdet.registry.specs import DEFAULT_MODELS, SPECS, ZOO, lookup

if TYPE_CHECKING:
    from tierdet.build.models import BuiltModel
    from tierdet.build.weights import WeightsSource


def model_names(text: str | None, all_models: bool = False) -> list[str]:
    """Comma-separated model names (default: the default models), checked."""
    if all_models:  # the published zoo; trained models have their own weights
        return list(ZOO)
    names = [m.strip() for m in (text or ",".join(DEFAULT_MODELS)).split(",") if m.strip()]
    unknown = [m for m in names if lookup(m) is None]
    if unknown:
        raise SystemExit(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(SPECS)} "
                         "(your own: --card FILE)")
    return names


def weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="official",
                   help="'official' (download from the spec URL, sha256-verified), "
                        "'random[:SEED]' (untrained, for tests), or a checkpoint path "
                        "(default: official)")


def card_argument(p: argparse.ArgumentParser, default_help: str = "") -> None:
    p.add_argument("--card", type=Path, action="append", default=None, metavar="FILE",
                   help="a model card (YAML): your own detector, built and served beside the "
                        f"zoo; repeatable{default_help}")


def cmd_build(args: argparse.Namespace) -> int:
    from tierdet.build.models import assemble, build_card, build_model, ensure_cards
    from tierdet.build.repository import install_template
    from tierdet.build.weights import WeightsSource
    from tierdet.registry.specs import get_spec

    source = WeightsSource.parse(args.weights)
    names = [] if args.card and not args.models and not args.all else model_names(
        args.models, args.all)
    built = []
    for name in names:
        kept, installed = _kept(args, name, source) if args.keep_current else (None, False)
        if not installed:
            built.append(kept or build_model(get_spec(name), source, args.home))
    cards = args.card or []
    # --keep-current keeps a card whose file and graph are unchanged: a new export
    # would change the ONNX and so throw away its cached TensorRT plan.
    card_models = (ensure_cards(cards, args.home) if args.keep_current
                   else [m for card in cards for m in build_card(card, args.home)])
    for model in card_models:  # for the engine builder (the zoo's are committed)
        install_template(args.home, model.spec)
    built += card_models
    if not built:
        return 0
    for model in built:
        print(f"{model.spec.name}: {model.onnx} ({model.provenance['weights']})")
    repository = assemble(built, args.home, args.target, args.threads,
                          new_version=args.new_version)
    print(f"repository: {repository}")
    return 0


def _kept(args: argparse.Namespace, name: str, source: WeightsSource
          ) -> tuple[BuiltModel | None, bool]:
    """``--keep-current``: the build HOME holds of ``name`` if it is from ``source``
    and in the current export format (else None: build it), and whether it is
    installed in the target's repository already."""
    from tierdet.build.models import load_built, stale

    existing = load_built(args.home, name)
    why = stale(existing, source)
    if why is not None:
        print(f"{name}: {why}: building")
        return None, False
    if (args.home / "repository" / args.target / name / "config.pbtxt").is_file():
        print(f"{name}: already built, kept")
        return existing, True
    print(f"{name}: already built, installing it into the {args.target} repository")
    return existing, False


def cmd_generate(args: argparse.Namespace) -> int:
    from tierdet.artifacts import generate

    if not args.check:
        for path in generate.write_all():
            print(path)
        return 0
    drift = generate.drift()
    if drift:
        print("generated files differ from their sources; run `tierdet generate`:\n  "
              + "\n  ".join(drift))
        return 1
    print("every generated file matches its source")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="export models to ONNX and assemble a Triton repository",
                       description="Turn model specs + weights into ONNX files (normalise, "
                                   "network, decode, NMS in one graph) and install them into "
                                   "HOME/repository/TARGET.")
    b.add_argument("--models", help=f"comma-separated names (default: {','.join(DEFAULT_MODELS)})")
    b.add_argument("--all", action="store_true", help="build the 15 published models (the zoo)")
    weights_argument(b)
    card_argument(b, " (with --card alone, only the cards are built)")
    b.add_argument("--target", default="cpu-local", choices=["cpu-local", "cpu"],
                   help="repository flavour to assemble (gpu engines are built on the GPU host)")
    b.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per model (0: all cores)")
    b.add_argument("--keep-current", action="store_true",
                   help="keep a model HOME already holds, built from these weights in the "
                        "current export format (installing it into TARGET's repository if "
                        "missing there); build the others (the model builder's mode: an "
                        "unchanged ONNX keeps its cached TensorRT engines)")
    b.add_argument("--new-version", action="store_true",
                   help="install each model as its next version, beside the one a running "
                        "Triton serves (an explicit load then switches to it; what the "
                        "admin API does)")
    b.set_defaults(func=cmd_build)

    g = sub.add_parser("generate", help="rewrite every generated file from its source",
                       description="Rewrite what is generated from the registry and the "
                                   "contract: model_repository/ configs, Grafana dashboards, "
                                   "the Prometheus rules for compose and Helm, the tables "
                                   "of the README and docs/ and the protobuf code; --check "
                                   "reports drift.")
    g.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if any generated file differs")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("engines", help="TensorRT plans for the gpu repository (on a GPU host)",
                       description="Build fp16 TensorRT plans from the built ONNX models on "
                                   "this GPU (cached per GPU model and TensorRT version) and "
                                   "write HOME/repository/gpu. The same code runs as "
                                   "`python3 engines.py` inside NVIDIA's TensorRT container.")
    engines.add_arguments(e)
    e.set_defaults(func=engines.run)
