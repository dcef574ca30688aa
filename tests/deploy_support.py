"""Helpers shared by tests/test_deploy*.py: paths, tools, compose and chart loading."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = REPO / "docker-compose.yml"
CHART = REPO / "deploy" / "helm" / "tierdet"
SCHEMAS = Path(__file__).with_name("schemas")
DOCKERFILES = {name: DOCKER / f"{name}.Dockerfile" for name in ("gateway", "model-builder",
                                                                 "engines")}
ENGINES_PY = REPO / "service" / "tierdet" / "build" / "engines.py"
# Variables that tierdet reads besides the Settings fields (tierdet.build.models.default_home).
NON_SETTINGS_ENV = {"TIERDET_HOME"}


def tool(name: str) -> str:
    """Path of an external tool; skip outside CI when missing, fail in CI.

    The venv's bin comes first: ``./dev test`` runs the venv's python without
    activating it, and the wheels of hadolint/shellcheck install there.
    """
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found:
        return found
    reason = (f"{name} is not installed (dev extra: pip install -e '.[dev]'; promtool: "
              f".ci/run installs it from Debian's prometheus package)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have {name}: {reason}")
    pytest.skip(reason)


def run_tool(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          **kwargs)


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dotenv(path: Path = REPO / ".env") -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\$|\$\{([A-Z_][A-Z0-9_]*)(?::?([-+])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation (it comes before parsing) with ``env`` for the host's
    environment (default: none): ${VAR:-default} its value or the default,
    ${VAR:+value} the value when VAR is set and not empty, $$ a literal $."""
    env = env or {}

    def value(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(2) == "+":
            return m.group(3) if env.get(m.group(1)) else ""
        return env.get(m.group(1), m.group(3) or "")
    return _VARIABLE.sub(value, text)


def settings_env_names() -> set[str]:
    from tierdet.serving.settings import ENV_PREFIX, Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def image_release(image: str) -> str:
    """'nvcr.io/nvidia/tritonserver:24.10-py3' -> '24.10'."""
    match = re.search(r":(\d+\.\d+)", image)
    assert match, f"{image} is not pinned to an NGC release tag"
    return match.group(1)


def dockerfile_from(name: str) -> list[str]:
    return [line.split()[1] for line in DOCKERFILES[name].read_text().splitlines()
            if line.startswith("FROM ")]
