"""Imports point one way: each package imports only what its docstring allows.

Read from the source (ast), top-level and function-level imports alike, so a
lazy import inside a function cannot slip past the rule either.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service" / "tierdet"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# package -> (tierdet packages it may import, third-party top-level modules it may import)
RULES: dict[str, tuple[set[str], set[str]]] = {
    "contract": ({"contract", "proto"}, {"pydantic"}),
    "registry": ({"registry", "contract"}, {"pydantic", "yaml"}),
    "serving": ({"serving", "registry", "contract"},
                {"numpy", "cv2", "simplejpeg", "tritonclient", "httpx", "prometheus_client",
                 "pydantic", "yaml", "opentelemetry"}),
    # tritonclient: its generated KServe v2 gRPC modules (v2_grpc), so the gateway
    # serves inference.GRPCInferenceService without a second copy of the proto.
    "frontends": ({"frontends", "serving", "registry", "contract", "proto"},
                  {"fastapi", "starlette", "uvicorn", "grpc", "grpc_health", "grpc_reflection",
                   "prometheus_client", "pydantic", "tritonclient"}),
    "client": ({"client", "contract", "proto"}, {"httpx", "grpc", "pydantic"}),
    "build": ({"build", "registry"},
              {"numpy", "onnx", "onnxruntime", "onnxscript", "torch", "torchvision", "effdet",
               "timm", "tqdm", "triton_python_backend_utils"}),
}


def _imports(path: Path) -> set[str]:
    """Top-level module names (``tierdet.x`` as ``tierdet.x``) imported by ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    out = set()
    for name in names:
        parts = name.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "tierdet" and len(parts) > 1 else parts[0])
    return out


@pytest.mark.parametrize("package", list(RULES))
def test_a_package_imports_only_what_it_may(package):
    own, third_party = RULES[package]
    allowed = {f"tierdet.{p}" for p in own} | third_party | STDLIB | {"tierdet"}
    bad = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        extra = _imports(path) - allowed
        if extra:
            bad[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert not bad, f"{package} imports what its docstring forbids: {bad}"


def test_the_serving_core_knows_no_transport():
    """The rule the issue states outright, checked apart from the table above."""
    for path in (PACKAGE / "serving").rglob("*.py"):
        assert not _imports(path) & {"fastapi", "starlette", "grpc", "uvicorn"}, path


def test_every_package_says_what_it_owns_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if init.parent.name == "proto":
            continue
        assert len(doc) > 80, f"{init.parent.name} has no package docstring"
        assert "may import" in doc.lower(), f"{init.parent.name}: say what it may import"
