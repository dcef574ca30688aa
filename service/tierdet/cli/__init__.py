"""The ``tierdet`` command line, one module per product:

- ``serving``: ``up``, ``serve``, ``profile`` (the gateway and the local stack);
- ``building``: ``build``, ``engines``, ``generate`` (models and generated files);
- ``accuracy``: ``dataset``, ``train``, ``eval``;
- ``client``: ``detect``, ``models`` (through a running gateway);
- ``admin``: ``admin models list|put|delete`` (a running gateway's admin API).

May import any tierdet package, lazily inside the commands: ``tierdet --help``
and the client commands must not pay for torch or the gateway.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tierdet import __version__
from tierdet.build.models import default_home
from tierdet.build.weights import WeightsError
from tierdet.cli import accuracy, admin, building, client, serving
from tierdet.registry.cards import CardError
from tierdet.serving.settings import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierdet", description="Object detection that answers "
                                "within your latency budget: build, serve, use and measure it.")
    p.add_argument("--version", action="version", version=f"tierdet {__version__}")
    p.add_argument("--home", type=Path, default=default_home(),
                   help="folder for weights, built models and the Triton repository "
                        "(env TIERDET_HOME; default ~/.cache/tierdet)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (building, serving, client, admin, accuracy):
        module.register(sub)
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
    except (ConfigError, WeightsError, CardError) as exc:
        # A problem the user can fix: one line (or a short list), no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


__all__ = ["main", "parser"]
