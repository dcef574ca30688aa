"""The Deploy page (docs/deploy.md): its commands name files and images that exist."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import yaml
from deploy_support import REPO, compose, dotenv
from docs_support import DOCS
from tierdet.serving.settings import Settings


def _section() -> str:
    return (DOCS / "deploy.md").read_text()


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", _section(), re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_docker_build_commands_match_the_compose_builds():
    builds = {s["build"]["dockerfile"]: s["image"] for s in compose()["services"].values()
              if "build" in s}
    commands = [c for c in _commands() if c[:2] == ["docker", "build"]]
    assert {_option(c, "-f")[0]: _option(c, "-t")[0] for c in commands} == builds
    assert all(c[-1] == "." for c in commands)  # the repository root is the context


def test_compose_commands_cover_the_gpu_default_and_the_cpu_profile():
    commands = [c for c in _commands() if c[:2] == ["docker", "compose"]]
    assert ["docker", "compose", "up"] in commands
    assert ["docker", "compose", "--profile", "cpu", "up"] in commands
    assert dotenv()["COMPOSE_PROFILES"] == "gpu"
    profiles = {p for s in compose()["services"].values() for p in s.get("profiles", [])}
    assert profiles == {"gpu", "cpu"}


def test_helm_commands_name_the_chart_and_values_files():
    commands = [c for c in _commands() if c[:2] == ["helm", "install"]]
    assert len(commands) == 2
    for command in commands:
        for values in _option(command, "-f"):
            assert (REPO / values).is_file(), values
    chart = next(c for c in commands if c[2] == "tierdet")[3]
    assert (REPO / chart / "Chart.yaml").is_file()
    for values in re.findall(r"`-f (deploy/[^`]+)`", _section()):
        assert (REPO / values).is_file(), values


def test_triton_image_and_gateway_ports_are_the_ones_deployed():
    services = compose()["services"]
    assert f"`{services['triton']['image']}`" in _section()
    assert services["gateway"]["ports"] == ["${TIERDET_PUBLISH_ADDRESS:-127.0.0.1}:8080:8080",
                                            "${TIERDET_PUBLISH_ADDRESS:-127.0.0.1}:50051:50051"]
    assert "| gateway | 127.0.0.1:8080 (HTTP), 127.0.0.1:50051 (gRPC) |" in _section()
    assert "TIERDET_PUBLISH_ADDRESS=0.0.0.0 docker compose up" in _section()


def test_the_api_keys_override_is_valid_compose_the_gateway_reads():
    (override,) = [yaml.safe_load(block) for block in
                   re.findall(r"```yaml\n(.*?)```", _section(), re.DOTALL)
                   if "TIERDET_API_KEYS_FILE" in block]
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(override))
    gateway = override["services"]["gateway"]
    (secret,) = gateway["secrets"]
    assert "file" in override["secrets"][secret]
    # Compose mounts a service's secret at /run/secrets/<name>.
    settings = Settings.from_env(gateway["environment"])
    assert settings.api_keys_file == Path("/run/secrets") / secret
    assert set(gateway) <= set(compose()["services"]["gateway"]) | {"secrets"}
