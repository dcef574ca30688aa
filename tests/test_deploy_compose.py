"""docker-compose.yml: valid Compose, coherent profiles, and in step with the service.

Validated with two independent implementations: the compose-spec project's
JSON schema (vendored, see tests/schemas/README.md) through jsonschema, and
the `compose_spec` Rust crate (PyPI compose-spec). Profile resolution follows
compose-go's rule: a service depending on a service its profiles leave out is
an invalid project unless that dependency says `required: false`.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path
from typing import Any

import compose_spec
import jsonschema
import pytest
import yaml
from deploy_support import (
    CHART,
    COMPOSE_FILE,
    DOCKER,
    NON_SETTINGS_ENV,
    REPO,
    compose,
    dockerfile_from,
    dotenv,
    image_release,
    interpolate,
    run_tool,
    settings_env_names,
    tool,
)
from tierdet import __version__
from tierdet.artifacts.dashboards import DASHBOARDS
from tierdet.registry.specs import SPECS
from tierdet.serving.settings import Settings

COMPOSE_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())


def _services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def _enabled(profiles: set[str]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items()
            if not s.get("profiles") or profiles & set(s["profiles"])}


def _answers_as(name: str, service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    aliases = {a for n in networks.values() if n for a in n.get("aliases", [])}
    return {name} | aliases


def _command_flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in service.get("command", [])
                if a.startswith("--") and "=" in a)


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(p.rsplit(":", 1)[-1]) for p in service.get("ports", [])}


# --- the file is valid Compose ------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema():
    jsonschema.Draft7Validator.check_schema(COMPOSE_SCHEMA)
    errors = sorted(jsonschema.Draft7Validator(COMPOSE_SCHEMA).iter_errors(compose()),
                    key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_file_parses_and_validates_with_the_compose_spec_crate():
    # Interpolated first, as compose does: a published port's host address is a variable.
    text = interpolate(COMPOSE_FILE.read_text())
    project = compose_spec.PyOptions(apply_merge=True).from_yaml(text)
    project.validate()
    assert sorted(project.service_names()) == sorted(_services())


@pytest.mark.parametrize("mutate", [
    lambda c: c["services"]["gateway"].update(port=["8080:8080"]),  # typo: port
    lambda c: c["services"]["gateway"]["depends_on"]["triton"].update(condition="healthy"),
    lambda c: c["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]
    .update(capability=["gpu"]),  # typo: capability
])
def test_both_validators_reject_a_broken_file(mutate):
    broken = copy.deepcopy(compose())
    mutate(broken)
    assert list(jsonschema.Draft7Validator(COMPOSE_SCHEMA).iter_errors(broken))
    with pytest.raises(ValueError):
        compose_spec.PyCompose.from_yaml(yaml.safe_dump(broken)).validate()


# --- profiles: `docker compose up` is the GPU stack, `--profile cpu` the CPU one -----------


def test_dotenv_makes_gpu_the_default_profile():
    assert dotenv()["COMPOSE_PROFILES"] == "gpu"


@pytest.mark.parametrize(("profiles", "expected"), [
    ({"gpu"}, {"model-builder", "engine-builder", "triton", "gateway", "prometheus", "grafana"}),
    ({"cpu"}, {"model-builder", "triton-cpu", "gateway", "prometheus", "grafana"}),
])
def test_each_profile_is_a_complete_valid_project(profiles, expected):
    enabled = _enabled(profiles)
    assert set(enabled) == expected
    for name, service in enabled.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in enabled or cond.get("required") is False, \
                f"{name} depends on {dep}, which profile(s) {profiles} leave out"
    # Exactly one Triton, reachable as `triton` (the gateway's TIERDET_TRITON_URL).
    tritons = [n for n, s in enabled.items() if "tritonserver" in s.get("image", "")]
    assert len(tritons) == 1
    assert "triton" in _answers_as(tritons[0], enabled[tritons[0]])


def test_gpus_are_reserved_only_in_the_gpu_profile():
    for name, service in _services().items():
        devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
                   .get("devices", []))
        gpu = any("gpu" in d.get("capabilities", []) for d in devices)
        assert gpu == (name in ("triton", "engine-builder")), name
        if gpu:
            assert service["profiles"] == ["gpu"]


def test_start_up_order_builds_models_then_engines_then_serves():
    s = _services()
    assert s["engine-builder"]["depends_on"]["model-builder"]["condition"] == \
        "service_completed_successfully"
    assert s["triton"]["depends_on"]["engine-builder"]["condition"] == \
        "service_completed_successfully"
    assert s["triton-cpu"]["depends_on"]["model-builder"]["condition"] == \
        "service_completed_successfully"
    for triton in ("triton", "triton-cpu"):
        assert s["gateway"]["depends_on"][triton] == {"condition": "service_healthy",
                                                      "required": False}
        assert "/v2/health/ready" in " ".join(s[triton]["healthcheck"]["test"])


def test_triton_serves_the_repository_its_profile_builds():
    s = _services()
    home = s["model-builder"]["environment"]["TIERDET_HOME"]
    assert s["engine-builder"]["environment"]["TIERDET_HOME"] == home
    assert _command_flags(s["triton"])["model-repository"] == f"{home}/repository/gpu"
    assert _command_flags(s["triton-cpu"])["model-repository"] == f"{home}/repository/cpu"
    # model-builder: WEIGHTS TARGET MODELS CARDS for tierdet-build-missing; cpu target.
    weights, target, models, _ = (interpolate(a) for a in s["model-builder"]["command"])
    assert (weights, target) == ("official", "cpu")
    engines = [interpolate(a) for a in s["engine-builder"]["command"]]
    assert engines[engines.index("--models") + 1] == models
    assert set(models.split(",")) <= set(SPECS)
    for name in ("model-builder", "engine-builder", "triton", "triton-cpu"):
        mounts = s[name]["volumes"]
        assert any(v.split(":")[:2] == ["models", home] for v in mounts), name


def test_the_builders_and_the_gateway_read_the_same_cards_from_one_mount():
    """Model cards: the model builder exports them, the engine builder makes their
    plans, the gateway learns their preprocessing and classes; all three read the
    same paths from the same read-only folder (by default this checkout, with the
    shipped ladder cards, whose graphs it holds too)."""
    from tierdet.registry.cards import expand, load_card

    s = _services()
    cards = interpolate(s["model-builder"]["command"][3])
    engines = [interpolate(a) for a in s["engine-builder"]["command"]]
    assert engines[engines.index("--cards") + 1] == cards
    assert interpolate(str(s["gateway"]["environment"]["TIERDET_CARDS"])) == cards
    for name in ("model-builder", "engine-builder", "gateway"):
        (mount,) = [interpolate(v) for v in s[name]["volumes"] if ":/cards" in v]
        assert mount == ".:/cards:ro" and s[name]["working_dir"] == "/cards", name
    assert cards == "examples/cards/yolox-nano.yaml,examples/cards/picodet-s.yaml"
    for card in cards.split(","):
        # Valid, and the graphs it names (one per size) are in the checkout.
        for loaded in expand(load_card(REPO / card)):
            assert loaded.source.onnx.is_file() and REPO in loaded.source.onnx.parents


# --- in step with config.Settings and the ports ---------------------------------------------


def test_every_tierdet_variable_is_one_the_service_reads():
    known = settings_env_names() | NON_SETTINGS_ENV
    for name, service in _services().items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("TIERDET_")} - known
        assert not unknown, f"{name} sets {unknown}, which tierdet does not read"


def test_gateway_environment_is_valid_settings_and_matches_the_ports():
    s = _services()
    env = {k: interpolate(str(v)) for k, v in s["gateway"]["environment"].items()}
    settings = Settings.from_env(env)  # raises on a bad value
    assert _container_ports(s["gateway"]) == {settings.http_port, settings.grpc_port}
    assert settings.http_host == settings.grpc_host == "0.0.0.0"
    host, port = settings.triton_url.rsplit(":", 1)
    assert host == "triton"
    for triton in ("triton", "triton-cpu"):
        flags = _command_flags(s[triton])
        assert flags["grpc-port"] == port
        assert _container_ports(s[triton]) == {int(flags["http-port"]), int(flags["grpc-port"]),
                                               int(flags["metrics-port"])}
    assert (settings.http_port, settings.grpc_port) == (8080, 50051)  # README's ports


def test_the_gateway_serves_a_cards_folder_only_when_asked():
    """TIERDET_CARDS_WATCH: the gateway builds each card of the folder into the
    repository the cpu Triton serves, which loads it (explicit model control).
    Unset, the folder is off and the gateway cannot write the models volume."""
    s = _services()
    home = s["model-builder"]["environment"]["TIERDET_HOME"]
    flags = _command_flags(s["triton-cpu"])
    assert (flags["model-control-mode"], flags["load-model"]) == ("explicit", "*")

    def gateway(env: dict[str, str]) -> tuple[Settings, str]:
        service = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env))["services"][
            "gateway"]
        (models,) = [v for v in service["volumes"] if v.startswith("models:")]
        return Settings.from_env({k: str(v) for k, v in service["environment"].items()}), models

    off, models = gateway({})
    assert off.cards_watch is None and models == f"models:{home}:ro"
    assert off.cards_dir is None and off.home is None  # no model changes: nothing to build
    on, models = gateway({"TIERDET_CARDS_WATCH": "/cards/live", "TIERDET_WORKERS": "1",
                          "GATEWAY_MODELS_ACCESS": "rw"})
    assert on.cards_watch == Path("/cards/live") and on.cards_dir == Path("/cards")
    assert models == f"models:{home}:rw" and on.workers == 1
    assert (on.home, on.model_target) == (Path(home), "cpu")
    assert flags["model-repository"] == f"{on.home}/repository/{on.model_target}"


def test_prometheus_scrapes_the_gateway_and_triton_where_they_listen():
    s = _services()
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    gateway_port = s["gateway"]["environment"]["TIERDET_HTTP_PORT"]
    metrics_port = _command_flags(s["triton"])["metrics-port"]
    assert targets == {f"gateway:{gateway_port}", f"triton:{metrics_port}"}
    mount = next(v for v in s["prometheus"]["volumes"] if v.startswith("./docker/prometheus"))
    assert mount.endswith(":ro")


def test_prometheus_config_passes_promtool():
    promtool = tool("promtool")
    result = run_tool([promtool, "check", "config", "--syntax-only",
                       str(DOCKER / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


# --- images, builds and mounts ------------------------------------------------------------


def test_builds_use_the_repository_dockerfiles_and_version_tags():
    for name, service in _services().items():
        if "build" not in service:
            continue
        assert service["build"]["context"] == "."
        assert (REPO / service["build"]["dockerfile"]).is_file()
        repo, tag = service["image"].rsplit(":", 1)
        assert repo.startswith("tierdet-") and tag == __version__, name


def test_third_party_images_are_pinned():
    for name, service in _services().items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.search(r":v?[0-9][\w.-]*$", image), f"{name}: {image} is not pinned"


def test_triton_and_the_engine_builder_share_one_tensorrt_release():
    (tensorrt,) = dockerfile_from("engines")
    for name in ("triton", "triton-cpu"):
        assert image_release(_services()[name]["image"]) == image_release(tensorrt)


def test_bind_mounts_exist_and_are_read_only():
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source, _target, *mode = interpolate(volume).split(":")
            if not source.startswith("."):
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"
                continue
            assert mode == ["ro"], f"{name}: {volume} should be read-only"
            assert (REPO / source).exists(), f"{name}: {source} does not exist"


def test_grafana_finds_its_provisioned_dashboards_and_prometheus():
    s = _services()
    mounts = dict(v.split(":")[:2] for v in s["grafana"]["volumes"])
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["./docker/grafana/provisioning"] == s["grafana"]["environment"][
        "GF_PATHS_PROVISIONING"]
    providers = yaml.safe_load((provisioning / "dashboards" / "tierdet.yml").read_text())
    paths = {p["options"]["path"] for p in providers["providers"]}
    # The chart's generated dashboards, the one copy both deployments use.
    assert paths == {mounts["./deploy/helm/tierdet/dashboards"]}
    assert {p.name for p in (REPO / "deploy/helm/tierdet/dashboards").glob("*.json")} == {
        f"{uid}.json" for uid in DASHBOARDS}
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    port = next(p for p in s["prometheus"]["ports"]).rsplit(":", 1)[-1]
    assert {d["url"] for d in sources["datasources"]} == {f"http://prometheus:{port}"}


def test_tierdet_containers_are_hardened():
    for name in ("model-builder", "engine-builder", "gateway"):
        service = _services()[name]
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_nothing_secret_is_set_in_compose():
    for name, service in _services().items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", key):
                assert str(value).startswith("${"), f"{name}: {key} has a literal value"


# --- security and shutdown ------------------------------------------------------------------


def test_every_port_is_published_on_this_host_only_unless_told():
    # Without API keys the gateway serves anyone who reaches it.
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert interpolate(port).startswith("127.0.0.1:"), f"{name}: {port}"
    wider = [interpolate(p, {"TIERDET_PUBLISH_ADDRESS": "0.0.0.0"})
             for p in _services()["gateway"]["ports"]]
    assert wider == ["0.0.0.0:8080:8080", "0.0.0.0:50051:50051"]


def _start_triton(service: dict[str, Any], tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The argv a service's start script execs tritonserver with (a stand-in records it)."""
    shell, dash_c, script, argv0, *flags = service["command"]
    assert (shell, dash_c, argv0) == ("sh", "-c", "tritonserver")
    stand_in = tmp_path / "bin" / "tritonserver"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stand_in.chmod(0o755)
    out = tmp_path / "argv"
    run_tool(["sh", "-c", interpolate(script), argv0, *flags],
             env={"PATH": f"{stand_in.parent}:/usr/bin:/bin", "ARGS_OUT": str(out), **env})
    argv = out.read_text().splitlines()
    assert argv[:len(flags)] == flags  # the service's own flags come first, unchanged
    return argv[len(flags):]


def _restricted(argv: list[str]) -> dict[str, tuple[str, str]]:
    """{flag: (groups, header=value)} of the restricted-API flags."""
    pairs = dict(a[2:].split("=", 1) for a in argv)
    return {flag: tuple(value.split(":", 1)) for flag, value in pairs.items()}


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_triton_restricts_the_api_groups_the_chart_restricts(name, tmp_path):
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["triton"]["restrictedApis"]
    argv = _start_triton(_services()[name], tmp_path, {"TRITON_ADMIN_KEY": "k3y"})
    assert _restricted(argv) == {
        "grpc-restricted-protocol": (",".join(chart["grpc"]), f"{chart['header']}=k3y"),
        "http-restricted-api": (",".join(chart["http"]), f"{chart['header']}=k3y"),
    }
    # Required: compose refuses to start without it, and the gateway holds the same key.
    required = "${TRITON_ADMIN_KEY:?set TRITON_ADMIN_KEY, the key of Triton's control plane}"
    assert _services()[name]["environment"]["TRITON_ADMIN_KEY"] == required
    assert _services()["gateway"]["environment"]["TIERDET_TRITON_API_KEY"] == required


def test_the_triton_start_script_passes_shellcheck(tmp_path):
    script = tmp_path / "triton-start.sh"
    script.write_text("#!/bin/sh\n" + interpolate(_services()["triton"]["command"][2]))
    result = run_tool([tool("shellcheck"), str(script)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_an_admin_key_each_start_locks_them_with_a_random_one(tmp_path):
    # Triton refuses an empty value; a fixed default would be a published password.
    keys = set()
    for env in ({}, {"TRITON_ADMIN_KEY": ""}):
        argv = _start_triton(_services()["triton"], tmp_path, env)
        (key,) = {header.split("=", 1)[1] for _, header in _restricted(argv).values()}
        assert re.fullmatch(r"[0-9a-f]{32}", key)
        keys.add(key)
    assert len(keys) == 2


def test_cpu_triton_runs_one_onnx_runtime_pool_of_a_chosen_size():
    """The cpu repository's configs give each model a thread per host core; the
    global pool (as in the chart) replaces that with one pool for every model."""
    def pool(service: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
        values = [interpolate(a, env)[len("--backend-config="):]
                  for a in service["command"] if a.startswith("--backend-config=")]
        assert all(v.startswith("onnxruntime,") for v in values), values
        return dict(v.removeprefix("onnxruntime,").split("=", 1) for v in values)

    cpu = _services()["triton-cpu"]
    # Default 0: ONNX Runtime's own choice for its one pool, a thread per physical core.
    assert pool(cpu) == {"enable-global-threadpool": "1", "intra_op_thread_count": "0",
                         "inter_op_thread_count": "1"}
    assert pool(cpu, {"TRITON_CPU_THREADS": "6"})["intra_op_thread_count"] == "6"
    assert pool(_services()["triton"]) == {}  # TensorRT plans: no ONNX Runtime
    # The chart's CPU Triton runs the same pool (sized there from its CPU request).
    chart = (CHART / "templates" / "triton-deployment.yaml").read_text()
    for setting in ("enable-global-threadpool=1", "inter_op_thread_count=1",
                    "intra_op_thread_count="):
        assert f"--backend-config=onnxruntime,{setting}" in chart


def test_stops_leave_time_for_the_drain():
    from tierdet.frontends.server import run_gateway

    s = _services()
    # docker stops the gateway first (it depends on Triton); SIGKILL comes after
    # stop_grace_period (10 s by default), which must outlast each drain. The
    # gateway's: run_gateway's grace_s, then the worker supervisor's 5 s.
    gateway_drain = inspect.signature(run_gateway).parameters["grace_s"].default + 5
    assert compose_spec.parse_duration(s["gateway"]["stop_grace_period"]) >= gateway_drain + 5
    for name in ("triton", "triton-cpu"):
        exit_timeout = int(_command_flags(s[name])["exit-timeout-secs"])
        assert compose_spec.parse_duration(s[name]["stop_grace_period"]) >= exit_timeout + 5
