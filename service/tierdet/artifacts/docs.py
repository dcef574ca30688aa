"""The generated tables of the README and the docs site: options, error codes,
settings, alerts, the model zoo, trained models.

Each lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers, in
one or more of ``PAGES``, and is rendered from its one source: the contract's
options and error table, the settings, the alerting rules, the registry with the
latency measurement ``benchmarks/model_zoo.py`` records in ``docs/model-zoo.json``,
and the trained checkpoints' sidecars in ``weights/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from tierdet.artifacts.rules import COMPOSE, Alert, groups
from tierdet.contract.errors import KINDS
from tierdet.contract.options import DetectOptions
from tierdet.registry.specs import ZOO
from tierdet.registry.trained import CHECKPOINTS, sidecar_path, trained_spec

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
DOCS = REPO / "docs"
ZOO_MEASUREMENT = DOCS / "model-zoo.json"
# The pages that hold generated tables (the README keeps options and errors, the
# site has every table where its topic is).
PAGES = (README, DOCS / "api" / "options.md", DOCS / "configuration.md",
         DOCS / "operations.md", DOCS / "performance.md", DOCS / "models.md")


def error_table() -> str:
    lines = ["| code | HTTP | gRPC | when |", "|---|---|---|---|"]
    lines += [f"| `{code.value}` | {kind.http_status} | {kind.grpc_status} | {kind.when} |"
              for code, kind in KINDS.items()]
    return "\n".join(lines)


def options_table() -> str:
    lines = ["| option | type | meaning |", "|---|---|---|"]
    for name, schema in DetectOptions.model_json_schema()["properties"].items():
        kinds = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
        kind = kinds[0]["type"]
        if kind == "array":
            kind = f"list of {kinds[0]['items']['type']}"
        bounds = [f"{sym} {kinds[0][key]:g}" for key, sym in
                  (("exclusiveMinimum", ">"), ("minimum", ">="), ("maximum", "<="))
                  if key in kinds[0]]
        kind += f" ({', '.join(bounds)})" if bounds else ""
        lines.append(f"| `{name}` | {kind} | {schema['description']} |")
    return "\n".join(lines)


def settings_table() -> str:
    from tierdet.serving.settings import ENV_PREFIX, Settings

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = ("(none)" if default in (None, ()) else
                 ",".join(map(str, default)) if isinstance(default, tuple) else
                 str(default).lower() if isinstance(default, bool) else str(default))
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {info.description} |")
    lines.append(f"| `{ENV_PREFIX}HOME` | ~/.cache/tierdet | weights, built models and the "
                 "runnable Triton repository (`tierdet build`, `tierdet up`) |")
    return "\n".join(lines)


def alerts_table() -> str:
    lines = ["| alert | for | severity | summary |", "|---|---|---|---|"]
    for _, rules in groups(COMPOSE):
        for rule in rules:
            if isinstance(rule, Alert):
                # A pipe in the summary's template would end the table cell.
                summary = rule.summary.replace("|", r"\|")
                lines.append(f"| `{rule.alert}` | {rule.for_ or 'at once'} | {rule.severity} "
                             f"| {summary} |")
    return "\n".join(lines)


def zoo_table() -> str:
    m = json.loads(ZOO_MEASUREMENT.read_text())
    lines = [f"Measured {m['measured_on']} on {m['machine']} with `{m['command']}` "
             f"(`docs/model-zoo.json`): ONNX Runtime {m['onnxruntime']}, {m['threads']} "
             f"intra-op threads, {m['runs']} runs; {m['method']}.", "",
             "| model | input | params (M) | published COCO AP | ONNX (MB) | CPU median (ms) "
             "| CPU p90 (ms) |", "|---|---|---|---|---|---|---|"]
    for name, spec in ZOO.items():
        r = m["models"][name]
        lines.append(f"| {name} | {spec.input_size} | {r['params_m']:.2f} | "
                     f"{spec.published_ap:.1f} | {r['onnx_mb']:.1f} | {r['median_ms']:.0f} | "
                     f"{r['p90_ms']:.0f} |")
    return "\n".join(lines)


def trained_table() -> str:
    lines = ["| model | input | AP through the gateway | AP bare ONNX | weights |",
             "|---|---|---|---|---|"]
    for name, rel in CHECKPOINTS.items():
        spec, checkpoint = trained_spec(name), REPO / rel
        records = json.loads(sidecar_path(checkpoint).read_text())["serving_eval"]["records"]
        ap = {r["source"]: r["ap"] for r in records if not r.get("tier")}
        lines.append(f"| {name} | {spec.input_size}, {spec.preprocessing.resize} | "
                     f"{ap['gateway']:.3f} | {ap['onnx']:.3f} | `{rel}` "
                     f"({checkpoint.stat().st_size / 1e6:.1f} MB) |")
    return "\n".join(lines)


SECTIONS: dict[str, Callable[[], str]] = {
    "options": options_table, "error-codes": error_table, "settings": settings_table,
    "alerts": alerts_table, "model-zoo": zoo_table, "trained-models": trained_table}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)


def rendered(text: str) -> str:
    """``text`` with every generated section it holds rendered afresh."""
    for name, render in SECTIONS.items():
        replacement = r"\g<1>" + render().replace("\\", r"\\") + "\n" + r"\g<2>"
        text = _pattern(name).sub(replacement, text)
    return text


def files() -> dict[Path, str]:
    texts = {page: page.read_text() for page in PAGES}
    for page, text in texts.items():
        if not any(_pattern(name).search(text) for name in SECTIONS):
            raise ValueError(f"{page.relative_to(REPO)} holds no generated table")
    for name in SECTIONS:  # a table whose markers were deleted everywhere would vanish
        if not any(_pattern(name).search(text) for text in texts.values()):
            raise ValueError(f"no page holds <!-- {name}:start/end --> markers")
    return {page: rendered(text) for page, text in texts.items()}
