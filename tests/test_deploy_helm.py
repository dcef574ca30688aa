"""deploy/helm/tierdet: rendered by Helm itself, every manifest schema-checked.

Helm v4's Go SDK (PyPI helm-python-sdk, no helm binary) loads, lints and
renders the chart for the default, GPU and CPU values; kubernetes-validate
checks each manifest strictly (unknown fields rejected) against the oldest
Kubernetes the chart supports and the newest it knows; ServiceMonitor and
PrometheusRule are checked against the prometheus-operator CRDs kept in
tests/schemas; promtool checks every PromQL expression, including the
prometheus-adapter queries the autoscalers depend on.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CHART,
    NON_SETTINGS_ENV,
    SCHEMAS,
    compose,
    dockerfile_from,
    image_release,
    run_tool,
    settings_env_names,
    tool,
)
from helm_python import Chart, HelmError, HelmValuesError, lint
from tierdet.artifacts.dashboards import DASHBOARDS
from tierdet.artifacts.dashboards import render as render_dashboard
from tierdet.registry.specs import SPECS
from tierdet.serving import memory
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import parse_targets
from tierdet.serving.settings import Settings
from tierdet.serving.tiers import TierConfig

RELEASE, NAMESPACE = "tierdet", "inference"
VARIANTS = {"default": None, "gpu": "values-gpu.yaml", "cpu": "values-cpu.yaml"}
# The chart's kubeVersion floor, and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
CRDS = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
REQUIRED_TIERS = {"realtime", "balanced", "accurate"}


@cache
def chart() -> Chart:
    return Chart.load(CHART)


def overlay(variant: str) -> dict[str, Any] | None:
    name = VARIANTS[variant]
    return yaml.safe_load((CHART / name).read_text()) if name else None


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    files = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(files.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@cache
def manifests(variant: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(overlay(variant)))


def one(variant: str, kind: str, component: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests(variant) if m["kind"] == kind and (
        component is None
        or m["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{kind}/{component}: {len(found)} found"
    return found[0]


def pod_spec(variant: str, component: str) -> dict[str, Any]:
    return one(variant, "Deployment", component)["spec"]["template"]["spec"]


def container(variant: str, component: str, name: str | None = None) -> dict[str, Any]:
    spec = pod_spec(variant, component)
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if name is None or c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """The literal values (a value from a Secret is known only in the cluster)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def flags(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for arg in args:
        key, _, value = arg[2:].partition("=")
        out.setdefault(key, []).append(value)
    return out


# --- Helm loads, lints and renders it -------------------------------------------------------


def test_helm_lint_is_clean():
    for variant in VARIANTS:
        report = lint(CHART, overlay(variant), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{variant}: {problems}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_renders_the_whole_deployment(variant):
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests(variant))
    expected = {
        ("ConfigMap", "tierdet-gateway"), ("Deployment", "tierdet-gateway"),
        ("ConfigMap", "tierdet-dashboard-overview"), ("ConfigMap", "tierdet-dashboard-triton"),
        ("Deployment", "tierdet-triton"), ("HorizontalPodAutoscaler", "tierdet-gateway"),
        ("HorizontalPodAutoscaler", "tierdet-triton"), ("Job", "tierdet-model-builder-1"),
        ("NetworkPolicy", "tierdet-gateway"), ("NetworkPolicy", "tierdet-triton"),
        ("Secret", "tierdet-triton-admin"),
        ("PersistentVolumeClaim", "tierdet-models"), ("PodDisruptionBudget", "tierdet-gateway"),
        ("PodDisruptionBudget", "tierdet-triton"), ("PrometheusRule", "tierdet"),
        ("Service", "tierdet-gateway"), ("Service", "tierdet-triton"),
        ("Service", "tierdet-triton-pods"), ("ServiceAccount", "tierdet"),
        ("ServiceMonitor", "tierdet-gateway"), ("ServiceMonitor", "tierdet-triton"),
    }
    assert set(kinds) == expected


# --- every manifest is valid Kubernetes -----------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_validate_strictly_against_kubernetes(variant, kube):
    for manifest in manifests(variant):
        if manifest["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(manifest, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} (k8s {kube}): "
                        f"{exc.message}")


def test_kubernetes_validate_rejects_an_unknown_field():
    deployment = copy.deepcopy(one("default", "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def _strict(schema: Any) -> Any:
    """Reject fields a structural CRD schema does not declare (the API server prunes
    or, with strict field validation, refuses them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_objects_match_the_prometheus_operator_crds(variant):
    for manifest in manifests(variant):
        if manifest["kind"] not in CRDS:
            continue
        assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
        errors = list(crd_validator(manifest["kind"]).iter_errors(manifest))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_crd_check_rejects_a_misspelt_field():
    monitor = copy.deepcopy(one("default", "ServiceMonitor", "gateway"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(crd_validator("ServiceMonitor").iter_errors(monitor))


# --- values.schema.json ---------------------------------------------------------------------


@cache
def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def test_values_schema_is_valid_and_the_shipped_values_pass():
    jsonschema.Draft7Validator.check_schema(values_schema())
    validator = jsonschema.Draft7Validator(values_schema())
    for variant in VARIANTS:
        merged = chart().merge_values(overlay(variant))
        errors = list(validator.iter_errors(merged))
        assert not errors, [f"{variant} {list(e.path)}: {e.message}" for e in errors]
        chart().validate_schema(overlay(variant))


@pytest.mark.parametrize("bad", [
    {"target": "tpu"},
    {"models": []},
    {"tiers": {"realtime": {"budget_ms": -5, "models": ["damoyolo-s"]}}},
    {"gateway": {"ports": {"http": "eighty"}}},
    {"gateway": {"settings": {"max_image_size": 1}}},  # not a setting
    {"triton": {"autoscaling": {"queueTimeUsPerRequest": 0}}},
    {"triton": {"autoscaling": {"pendingRequestsPerPod": 0}}},
    {"persistence": {"size": "lots"}},
    {"tritonn": {}},
    {"apiKeys": {"existingSecret": "Not_A_Name"}},
    {"tls": {"secretName": "tierdet-tls"}},  # not a value: existingSecret
    {"networkPolicy": {"enabled": "yes"}},
    {"networkPolicy": {"prometheusFrom": []}},  # unscraped: the autoscalers go blind
    {"networkPolicy": {"gatewayFrom": [{"pods": {}}]}},
    {"triton": {"restrictedApis": {"grpc": ["model-repo"]}}},
    {"gateway": {"preStopSleepSeconds": -1}},
    {"triton": {"exitTimeoutSeconds": "30s"}},
    {"cards": {"models": [], "volume": {}, "watch": "../elsewhere"}},
    {"cards": {"models": [], "volume": {}, "watch": "/abs"}},
])
def test_a_bad_value_is_rejected_by_the_schema_and_by_helm(bad):
    merged = chart().merge_values(bad)
    assert list(jsonschema.Draft7Validator(values_schema()).iter_errors(merged))
    with pytest.raises(HelmValuesError, match="values don't meet the specifications"):
        chart().render(bad, name=RELEASE, namespace=NAMESPACE)


def test_tiers_must_name_the_three_levels():
    values = chart().merge_values(None)
    del values["tiers"]["accurate"]
    assert list(jsonschema.Draft7Validator(values_schema()).iter_errors(values))


@pytest.mark.parametrize(("bad", "message"), [
    ({"tiers": {"realtime": {"budget_ms": 20, "models": ["efficientdet-d7"]}}},
     "tiers.realtime.models: efficientdet-d7 is not in models"),
    ({"defaultTier": "fastest"}, "defaultTier fastest is not one of tiers"),
    # null removes a default key in Helm: the labels end up empty.
    ({"monitoring": {"serviceMonitor": {"labels": {"release": None}}}},
     "monitoring.serviceMonitor.labels is empty"),
    ({"monitoring": {"prometheusRule": {"labels": {"release": None}}}},
     "monitoring.prometheusRule.labels is empty"),
    ({"target": "cpu", "triton": {"resources": {"requests": {"cpu": None}}}},
     "triton.resources.requests.cpu is empty: target cpu sizes ONNX Runtime's threads"),
    ({"target": "cpu", "triton": {"resources": {"requests": {"cpu": "two"}}}},
     "triton.resources.requests.cpu (two) must be a CPU count"),
    ({"cards": {"watch": "live"}}, "cards.watch needs cards.volume"),
    ({"cards": {"watch": "live", "volume": {"emptyDir": {}}}}, "cards.watch needs target cpu"),
    ({"target": "cpu", "cards": {"watch": "live", "volume": {"emptyDir": {}}}},
     "cards.watch needs one gateway pod of one worker"),
    ({"target": "cpu", "cards": {"watch": "live", "volume": {"emptyDir": {}}},
      "gateway": {"autoscaling": {"enabled": False}, "replicas": 1, "settings": {"workers": 2}}},
     "cards.watch needs one gateway pod of one worker"),
])
def test_cross_value_checks_stop_the_install(bad, message):
    with pytest.raises(HelmError, match=re.escape(message)):
        chart().render(bad, name=RELEASE, namespace=NAMESPACE)


def test_gateway_settings_in_the_schema_are_settings_fields():
    names = values_schema()["properties"]["gateway"]["properties"]["settings"]["properties"]
    assert set(names) <= set(Settings.model_fields)


# --- the gateway ----------------------------------------------------------------------------


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary and decimal suffixes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return int(float(number) * units.get(unit, 1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_pod_has_room_for_what_its_settings_let_it_hold(variant):
    # The memory limit and the /tmp volume are sized from the concurrency and the
    # image limits (serving/memory.py), so a flood of the largest images is not
    # an OOM kill or an eviction.
    settings = Settings.from_env(env_of(container(variant, "gateway")))
    assert settings.image_slots, "set: a pod's cores are not known when it is rendered"
    limit = quantity(container(variant, "gateway")["resources"]["limits"]["memory"])
    assert memory.bound(settings).total <= limit, memory.bound(settings).describe()
    tmp = next(v for v in pod_spec(variant, "gateway")["volumes"] if v["name"] == "tmp")
    assert memory.spool_bytes(settings) <= quantity(tmp["emptyDir"]["sizeLimit"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_environment_is_valid_settings_pointing_at_triton(variant):
    gateway = container(variant, "gateway")
    env = env_of(gateway)
    unknown = {k for k in env if k.startswith("TIERDET_")} - settings_env_names() - \
        NON_SETTINGS_ENV
    assert not unknown
    settings = Settings.from_env(env)  # raises on a bad value (e.g. 2.097152e+07)
    assert settings.max_image_bytes == 20971520
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    # Every Triton pod, by a headless Service's name (not the ClusterIP Service, which
    # would pin each gateway's one gRPC connection to one pod).
    fixed, names = parse_targets(settings.triton_url, settings.triton_metrics_port)
    assert fixed == []
    (name, port), = names
    headless = next(m for m in manifests(variant) if m["kind"] == "Service"
                    and m["metadata"]["name"] == "tierdet-triton-pods")
    assert headless["spec"]["clusterIP"] == "None"
    assert name == f"tierdet-triton-pods.{NAMESPACE}.svc.cluster.local"
    assert port == next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    pods = one(variant, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pods.items()
    triton_ports = {p["name"]: p["containerPort"] for p in container(variant, "triton")["ports"]}
    assert settings.triton_metrics_port == triton_ports["metrics"]
    assert "metrics" not in {p["name"] for p in headless["spec"]["ports"]}  # scraped once
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Explicit, and above what /readyz takes (it answers from cached state:
    # test_faults.py::test_readiness_answers_at_once_while_triton_hangs).
    for probe in ("livenessProbe", "readinessProbe"):
        assert gateway[probe]["timeoutSeconds"] >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiers_file_loads_in_the_gateway_router(variant, tmp_path):
    config_map = one(variant, "ConfigMap", "gateway")
    env = env_of(container(variant, "gateway"))
    mount = next(m for m in container(variant, "gateway")["volumeMounts"]
                 if m["name"] == "config")
    assert env["TIERDET_TIERS_FILE"] == f"{mount['mountPath']}/tiers.yaml"
    path = tmp_path / "tiers.yaml"
    path.write_text(config_map["data"]["tiers.yaml"])
    tiers = TierConfig.load(path, env["TIERDET_DEFAULT_TIER"])  # the gateway's own loader
    assert set(tiers.tiers) >= REQUIRED_TIERS
    served = set(_models(variant))
    for tier in tiers.tiers.values():
        assert tier.budget_ms > 0 and tier.models
        assert set(tier.models) <= served <= set(SPECS)


def _models(variant: str) -> list[str]:
    job = one(variant, "Job", "model-builder")
    (builder,) = job["spec"]["template"]["spec"]["containers"]
    _weights, target, models = builder["args"]
    assert builder["command"] == ["tierdet-build-missing"] and target == "cpu"
    return models.split(",")


def test_a_latency_profile_is_mounted_when_given(tmp_path):
    profile = json.dumps({"version": 1, "machine": "gpu-node",
                          "models": {"damoyolo-s": {"batch_ms": {"1": 4.2}}}})
    (deployment,) = [m for m in render({"latencyProfile": profile})
                     if m["kind"] == "Deployment"
                     and m["metadata"]["name"].endswith("gateway")]
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["TIERDET_PROFILE_FILE"] == "/etc/tierdet/profile.json"
    assert "TIERDET_PROFILE_FILE" not in env_of(container("default", "gateway"))


# --- Triton ---------------------------------------------------------------------------------


def _probe(c: dict[str, Any], kind: str) -> tuple[str, int]:
    get = c[f"{kind}Probe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    return get["path"], ports[get["port"]] if isinstance(get["port"], str) else get["port"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_probes_health_on_its_http_port(variant):
    triton = container(variant, "triton", "triton")
    assert _probe(triton, "startup") == ("/v2/health/live", 8000)
    assert _probe(triton, "liveness") == ("/v2/health/live", 8000)
    assert _probe(triton, "readiness") == ("/v2/health/ready", 8000)
    args = flags(triton["args"])
    assert (args["http-port"], args["grpc-port"], args["metrics-port"]) == (["8000"], ["8001"],
                                                                           ["8002"])


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_gpu_triton_serves_engines_built_on_its_own_gpu(variant):
    spec = pod_spec(variant, "triton")
    triton = container(variant, "triton", "triton")
    engines = container(variant, "triton", "engines")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == \
        engines["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engines["command"] == ["python3", "/opt/tierdet/engines.py"]
    build = flags(engines["args"][1:])
    assert engines["args"][0] == "build"
    assert build["models"] == [",".join(_models(variant))]
    repository = build["repository"][0]
    assert flags(triton["args"])["model-repository"] == [repository]
    assert env_of(engines)["TIERDET_HOME"] == "/var/lib/tierdet"
    shared = {m["name"] for m in engines["volumeMounts"]} & {m["name"] for m in
                                                             triton["volumeMounts"]}
    assert {"models", "repository"} <= shared
    assert {v["name"]: v for v in spec["volumes"]}["repository"] == {"name": "repository",
                                                                     "emptyDir": {}}
    assert "--allow-gpu-metrics=false" not in triton["args"]


def test_the_gpu_resource_name_is_a_value():
    """A MIG slice or a renamed time-sliced resource replaces nvidia.com/gpu."""
    values = overlay("gpu") or {}
    values["triton"] = {**values.get("triton", {}), "gpuResource": "nvidia.com/mig-1g.10gb"}
    rendered = render(values)
    pod = next(m for m in rendered if m["kind"] == "Deployment"
               and m["metadata"]["labels"]["app.kubernetes.io/component"] == "triton")
    spec = pod["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        limits = c.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits
    triton = next(c for c in spec["containers"] if c["name"] == "triton")
    assert triton["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == 1


def test_the_runtime_class_is_a_value_and_left_to_the_cluster_by_default():
    """Nodes whose default runtime does not expose GPUs need the GPU Operator's
    RuntimeClass; elsewhere naming one that does not exist would stop the pod."""
    for variant in VARIANTS:
        assert "runtimeClassName" not in pod_spec(variant, "triton")
    values = overlay("gpu") or {}
    values["triton"] = {**values.get("triton", {}), "runtimeClassName": "nvidia"}
    pod = next(m for m in render(values) if m["kind"] == "Deployment"
               and m["metadata"]["labels"]["app.kubernetes.io/component"] == "triton")
    assert pod["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


@pytest.mark.parametrize("retry", [False, True])
def test_the_engines_init_container_arguments_parse_as_engines_py_does(retry):
    import argparse

    from tierdet.build import engines

    (deployment,) = [m for m in render({"triton": {"engines": {"retryFailed": retry}}})
                     if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("triton")]
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--home")
    engines.add_arguments(parser)
    args = parser.parse_args(init["args"])
    assert args.engines_func is engines.cmd_build and args.retry_failed is retry
    assert args.wait_s == 3600 and args.timeout_s == 3600


def test_cpu_triton_loads_exactly_the_models_from_the_cpu_repository():
    triton = container("cpu", "triton", "triton")
    assert "nvidia.com/gpu" not in json.dumps(pod_spec("cpu", "triton"))
    args = flags(triton["args"])
    assert args["model-repository"] == ["/var/lib/tierdet/repository/cpu"]
    assert args["model-control-mode"] == ["explicit"]
    assert args["load-model"] == _models("cpu")
    wait = container("cpu", "triton", "wait-for-models")
    assert wait["command"][-2:] == ["engines", "wait"]
    assert flags(wait["args"])["repository"] == ["/var/lib/tierdet/repository/cpu"]


WATCHING = {"cards": {"volume": {"persistentVolumeClaim": {"claimName": "tierdet-cards",
                                                             "readOnly": True}},
                       "watch": "live"},
            "gateway": {"replicas": 1, "autoscaling": {"enabled": False}}}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_a_cards_folder_is_served_by_one_gateway_building_into_tritons_repository(kube):
    """cards.watch: the gateway gets the folder, builds each card into the model
    volume's cpu repository (the one every CPU Triton pod serves, with explicit model
    control) and has them load it; off, the gateway has no model volume at all."""
    cpu = overlay("cpu")
    assert cpu is not None
    manifests = render({**cpu, **WATCHING})
    deployments = {m["metadata"]["labels"]["app.kubernetes.io/component"]: m
                   for m in manifests if m["kind"] == "Deployment"}
    gateway_pod = deployments["gateway"]["spec"]["template"]["spec"]
    triton_pod = deployments["triton"]["spec"]["template"]["spec"]
    assert deployments["gateway"]["spec"]["replicas"] == 1
    # Never two at once, not even during a rollout.
    assert deployments["gateway"]["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(m["kind"] == "HorizontalPodAutoscaler" and "gateway" in m["metadata"]["name"]
                   for m in manifests)
    (gateway,) = gateway_pod["containers"]
    settings = Settings.from_env(env_of(gateway))
    assert (settings.cards_watch, settings.cards_dir) == (Path("/cards/live"), Path("/cards"))
    assert (settings.model_target, settings.workers) == ("cpu", 1)
    triton = next(c for c in triton_pod["containers"] if c["name"] == "triton")
    assert flags(triton["args"])["model-repository"] == [
        f"{settings.home}/repository/{settings.model_target}"]
    assert flags(triton["args"])["model-control-mode"] == ["explicit"]
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert mounts["models"]["mountPath"] == str(settings.home)
    assert not mounts["models"].get("readOnly")  # it builds there
    assert mounts["cards"]["readOnly"] and mounts["cards"]["mountPath"] == "/cards"
    claims = [{v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]
              ["claimName"] for pod in (gateway_pod, triton_pod)]
    assert claims[0] == claims[1]
    for manifest in manifests:
        if manifest["kind"] not in CRDS:
            kubernetes_validate.validate(manifest, kube, strict=True)
    plain = {v["name"] for v in pod_spec("cpu", "gateway")["volumes"]}
    assert "models" not in plain and "TIERDET_CARDS_WATCH" not in env_of(
        container("cpu", "gateway"))


def _backend_config(args: list[str]) -> dict[str, str]:
    """{setting: value} of tritonserver's --backend-config=onnxruntime,<setting>=<value>."""
    out = {}
    for value in flags(args).get("backend-config", []):
        backend, _, setting = value.partition(",")
        assert backend == "onnxruntime", value
        key, _, item = setting.partition("=")
        out[key] = item
    return out


@pytest.mark.parametrize(("cpu", "threads"), [
    (None, 8),  # values-cpu.yaml's request
    ("2500m", 2), (1.5, 1), ("500m", 1), (3, 3), ("16", 16),
])
def test_cpu_triton_runs_one_onnx_runtime_pool_sized_by_its_cpu_request(cpu, threads):
    """The repository's configs give each model a pool of a thread per node core
    (intra_op_thread_count 0); with the global pool Triton ignores them and every
    model shares one pool of a thread per CPU the pod requests."""
    values = overlay("cpu") or {}
    if cpu is not None:
        values["triton"] = {**values["triton"], "resources": {"requests": {"cpu": cpu}}}
    (deployment,) = [m for m in render(values) if m["kind"] == "Deployment"
                     and m["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"]
    triton = deployment["spec"]["template"]["spec"]["containers"][0]
    assert str(triton["resources"]["requests"]["cpu"]) == str(cpu or "8")
    assert _backend_config(triton["args"]) == {"enable-global-threadpool": "1",
                                                "intra_op_thread_count": str(threads),
                                                "inter_op_thread_count": "1"}
    # What the configs in the volume say (written by the model-builder Job, kept
    # across upgrades, so a changed request could not reach them there).
    from tierdet.build.repository import render_config

    config = render_config(SPECS["efficientdet-d0"], "cpu")
    assert 'key: "intra_op_thread_count" value { string_value: "0" }' in config
    assert "enable-global-threadpool=1" in config  # the comment that says it is ignored


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_gpu_triton_has_no_onnx_runtime_threads(variant):
    assert not flags(container(variant, "triton", "triton")["args"]).get("backend-config")


def test_the_cpu_init_container_command_is_a_real_tierdet_command():
    from tierdet import cli

    wait = container("cpu", "triton", "wait-for-models")
    args = cli.parser().parse_args(wait["command"][1:] + wait["args"])
    assert args.engines_command == "wait" and args.home == Path("/var/lib/tierdet")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_triton_rolls_out_without_a_surge_pod(variant):
    strategy = one(variant, "Deployment", "triton")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    if "engines" in {c["name"] for c in pod_spec(variant, "triton")["initContainers"]}:
        # No spare GPU for a surge pod: it would stay Pending and stall the rollout.
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    else:  # CPU: the new pod comes up before an old one goes
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_progress_deadline_covers_the_engine_builds(variant):
    """A new pod waits for the export, builds each model's engine in turn (GPU), then
    loads; the Deployment must not be reported failed before all of that can end."""
    spec = pod_spec(variant, "triton")
    (init,) = spec["initContainers"]
    args = flags(init["args"][1:] if init["name"] == "engines" else init["args"])
    worst = float(args["wait-s"][0])
    if init["name"] == "engines":
        worst += len(args["models"][0].split(",")) * float(args["timeout-s"][0])
    startup = container(variant, "triton", "triton")["startupProbe"]
    worst += startup["periodSeconds"] * startup["failureThreshold"]
    deadline = one(variant, "Deployment", "triton")["spec"]["progressDeadlineSeconds"]
    assert isinstance(deadline, int) and deadline >= worst + 600  # + scheduling, pulls
    if variant == "gpu":
        assert len(args["models"][0].split(",")) == 5 and deadline == 22800


def test_triton_image_matches_compose_and_the_engines_release():
    values = chart().merge_values(None)
    image = f"{values['images']['triton']['repository']}:{values['images']['triton']['tag']}"
    assert image == compose()["services"]["triton"]["image"]
    (tensorrt,) = dockerfile_from("engines")
    assert image_release(image) == image_release(tensorrt)


# --- scaling and metrics --------------------------------------------------------------------


@cache
def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load((CHART / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


def _series_name(query: str) -> str:
    match = re.match(r"\s*([a-zA-Z_:][\w:]*)", query)
    assert match, query
    return match.group(1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscalers_use_metrics_the_adapter_serves_from_the_recording_rules(variant):
    records = {r["record"] for g in one(variant, "PrometheusRule")["spec"]["groups"]
               for r in g["rules"] if "record" in r}
    served = {r["name"]["as"]: _series_name(r["seriesQuery"]) for r in adapter_rules()}
    assert set(served.values()) <= records
    for component, metrics in (("gateway", ["tierdet_gateway_requests_per_second"]),
                               ("triton", ["tierdet_triton_queue_time_per_request_us",
                                           "tierdet_triton_pending_requests"])):
        hpa = one(variant, "HorizontalPodAutoscaler", component)
        assert hpa["spec"]["scaleTargetRef"]["name"] == \
            one(variant, "Deployment", component)["metadata"]["name"]
        pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert pods == metrics and set(metrics) <= set(served)
    gateway_hpa = one(variant, "HorizontalPodAutoscaler", "gateway")
    assert {m["type"] for m in gateway_hpa["spec"]["metrics"]} == {"Resource", "Pods"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitoring_objects_carry_the_label_kube_prometheus_stack_selects(variant):
    for kind in ("ServiceMonitor", "PrometheusRule"):
        for m in manifests(variant):
            if m["kind"] == kind:
                assert m["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_scales_by_bounded_steps(variant):
    """Each new pod needs minutes to load: at most 2 pods per 2 minutes up, one per
    5 minutes down (stabilization windows alone let a spike add maxReplicas)."""
    behavior = one(variant, "HorizontalPodAutoscaler", "triton")["spec"]["behavior"]
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 2,
                                                "periodSeconds": 120}]
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1,
                                                  "periodSeconds": 300}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_also_scales_on_requests_waiting_in_its_queues(variant):
    """Queue time counts only requests Triton runs: when its queue policy rejects
    every request, it reads 0. The second metric, Triton's pending-request gauge,
    still reads the overload (the rule's numbers: test_prometheus.py)."""
    from tierdet.artifacts import rules

    hpa = one(variant, "HorizontalPodAutoscaler", "triton")
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["spec"]["metrics"]}
    autoscaling = chart().merge_values(overlay(variant))["triton"]["autoscaling"]
    assert targets["tierdet_triton_pending_requests"] == {
        "type": "AverageValue", "averageValue": str(autoscaling["pendingRequestsPerPod"])}
    assert targets["tierdet_triton_queue_time_per_request_us"]["averageValue"] == \
        str(autoscaling["queueTimeUsPerRequest"])
    (adapter,) = [r for r in adapter_rules()
                  if r["name"]["as"] == "tierdet_triton_pending_requests"]
    assert _series_name(adapter["seriesQuery"]) == rules.PENDING_RECORD
    (rule,) = [r for g in one(variant, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
               if r.get("record") == rules.PENDING_RECORD]
    assert "nv_inference_pending_request_count{" in rule["expr"]
    assert 'service="tierdet-triton"' in rule["expr"] and "sum by (namespace, pod)" in rule["expr"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_alert_says_when_the_autoscalers_series_are_missing(variant):
    from tierdet.artifacts import rules

    spec = one(variant, "PrometheusRule")["spec"]
    records = {r["record"] for g in spec["groups"] for r in g["rules"] if "record" in r}
    (alert,) = [r for g in spec["groups"] for r in g["rules"]
                if r.get("alert") == "TierdetAutoscalingBlind"]
    # Every series an HPA reads through the adapter, each under its own label.
    hpa_series = {_series_name(r["seriesQuery"]) for r in adapter_rules()}
    assert hpa_series == set(rules.SCALING_SERIES) <= records
    for series in hpa_series:
        assert f'absent({series}{{namespace="{NAMESPACE}"}})' in alert["expr"]
        assert f'"series", "{series}"' in alert["expr"]
    assert alert["labels"]["severity"] == "ticket" and alert["for"] == "15m"


def test_queue_time_rule_divides_triton_queue_time_by_successful_requests():
    (rule,) = [r for g in one("default", "PrometheusRule")["spec"]["groups"] for r in g["rules"]
               if r.get("record") == "tierdet:triton_queue_time_per_request_us:rate1m"]
    numerator, denominator = rule["expr"].split("\n/\n")
    assert "rate(nv_inference_queue_duration_us{" in numerator
    assert "rate(nv_inference_request_success{" in denominator
    assert 'service="tierdet-triton"' in numerator and 'namespace="inference"' in numerator


def _promtool_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = run_tool([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_prometheus_rules_pass_promtool(variant, tmp_path):
    _promtool_rules(tmp_path, one(variant, "PrometheusRule")["spec"]["groups"])


def test_adapter_queries_pass_promtool(tmp_path):
    # prometheus-adapter fills these templates per request; any filled-in form must parse.
    fill = {"<<.Series>>": "tierdet:some_series", "<<.GroupBy>>": "pod",
            "<<.LabelMatchers>>": 'namespace="inference",pod=~"a|b"'}
    rules = []
    for i, rule in enumerate(adapter_rules()):
        query = rule["metricsQuery"]
        for key, value in fill.items():
            query = query.replace(key, value)
        assert "<<" not in query
        rules += [{"record": f"adapter:metrics_query_{i}", "expr": query},
                  {"record": f"adapter:series_query_{i}", "expr": rule["seriesQuery"]}]
    _promtool_rules(tmp_path, [{"name": "adapter", "rules": rules}])


def test_promtool_is_really_checking(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (pod) (rate(foo[1m])"}]}]}))
    assert run_tool([tool("promtool"), "check", "rules", str(path)]).returncode != 0


def test_rules_use_only_metrics_the_gateway_exports():
    exported = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        exported |= {family.name + s for s in suffixes.get(family.type, [""])}
    spec = one("default", "PrometheusRule")["spec"]
    exprs = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"(?<![:\w])tierdet_[a-z_]+", e)}
    assert used and used <= exported, used - exported


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_monitors_scrape_named_ports_of_the_services(variant):
    for component, port in (("gateway", "http"), ("triton", "metrics")):
        monitor = one(variant, "ServiceMonitor", component)
        selected = [m for m in manifests(variant) if m["kind"] == "Service"
                    and monitor["spec"]["selector"]["matchLabels"].items()
                    <= m["metadata"]["labels"].items()]
        assert monitor["spec"]["endpoints"][0]["port"] == port
        # Exactly one selected Service has the port: each pod is scraped once (the
        # headless Triton Service carries the same labels but no metrics port).
        scraped = [m for m in selected if port in {p["name"] for p in m["spec"]["ports"]}]
        assert len(scraped) == 1, [m["metadata"]["name"] for m in scraped]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]



def _dashboard_maps(values: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {name: m for m in render(values) if m["kind"] == "ConfigMap"
            for name in m.get("data", {}) if name.endswith(".json")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_generated_dashboard_ships_as_a_configmap_the_grafana_sidecar_loads(variant):
    maps = _dashboard_maps(overlay(variant))
    assert set(maps) == {f"{uid}.json" for uid in DASHBOARDS}
    for uid in DASHBOARDS:
        m = maps[f"{uid}.json"]
        assert json.loads(m["data"][f"{uid}.json"]) == json.loads(render_dashboard(uid))
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert m["metadata"]["namespace"] == NAMESPACE


def test_dashboards_bind_to_the_grafanas_own_prometheus_through_a_variable():
    for uid in DASHBOARDS:
        board = json.loads(render_dashboard(uid))
        (variable,) = board["templating"]["list"]
        assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
        uids = {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]}
        assert uids == {"$" + "{" + variable["name"] + "}"}


def test_dashboards_go_to_the_sidecars_namespace_or_not_at_all():
    moved = _dashboard_maps({"monitoring": {"grafanaDashboards": {
        "enabled": True, "namespace": "monitoring", "labels": {"team-dashboards": "yes"}}}})
    assert {m["metadata"]["namespace"] for m in moved.values()} == {"monitoring"}
    assert all(m["metadata"]["labels"]["team-dashboards"] == "yes" for m in moved.values())
    assert _dashboard_maps({"monitoring": {"grafanaDashboards": {"enabled": False}}}) == {}

# --- availability and security --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budgets_and_services_select_their_pods(variant):
    for component in ("gateway", "triton"):
        labels = one(variant, "Deployment", component)["spec"]["template"]["metadata"]["labels"]
        pdb = one(variant, "PodDisruptionBudget", component)
        assert pdb["spec"]["selector"]["matchLabels"] == labels
        services = [m for m in manifests(variant) if m["kind"] == "Service" and
                    m["metadata"]["labels"]["app.kubernetes.io/component"] == component]
        assert services and all(svc["spec"]["selector"] == labels for svc in services)
        # The HPA owns the replica count.
        assert "replicas" not in one(variant, "Deployment", component)["spec"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_disruption_budget_never_blocks_a_drain_and_production_keeps_a_pod_up(variant):
    """maxUnavailable, not minAvailable: with one pod, minAvailable 1 would block every
    node drain forever. The GPU production values run two pods at least, so a drain
    (and a rollout, which has no surge pod) always leaves one serving."""
    pdb = one(variant, "PodDisruptionBudget", "triton")["spec"]
    assert "minAvailable" not in pdb and pdb["maxUnavailable"] >= 1
    hpa = one(variant, "HorizontalPodAutoscaler", "triton")["spec"]
    rollout = one(variant, "Deployment", "triton")["spec"]["strategy"]["rollingUpdate"]
    if variant == "gpu":
        assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 1
        assert hpa["minReplicas"] - rollout["maxUnavailable"] >= 1


@pytest.mark.parametrize("values", [
    {"triton": {"autoscaling": {"enabled": False}}},
    {"triton": {"autoscaling": {"minReplicas": 1, "maxReplicas": 1}}},
])
def test_a_single_triton_pod_gets_no_disruption_budget(values):
    rendered = render(values)
    assert not [m for m in rendered if m["kind"] == "PodDisruptionBudget"
                and m["metadata"]["labels"]["app.kubernetes.io/component"] == "triton"]
    assert [m for m in rendered if m["kind"] == "PodDisruptionBudget"
            and m["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_runs_as_non_root_on_a_read_only_root(variant):
    pods = [m["spec"]["template"]["spec"] for m in manifests(variant)
            if m["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_tierdet_variable_in_the_chart_is_one_the_service_reads(variant):
    known = settings_env_names() | NON_SETTINGS_ENV
    for manifest in manifests(variant):
        text = json.dumps(manifest)
        unknown = set(re.findall(r'"name": "(TIERDET_[A-Z_]+)"', text)) - known
        assert not unknown, f"{manifest['kind']}: {unknown}"


def test_model_volume_survives_uninstall_and_is_shared():
    pvc = one("default", "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {v["persistentVolumeClaim"]["claimName"]
              for m in manifests("default") if m["kind"] in ("Deployment", "Job")
              for v in m["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}
    existing = render({"persistence": {"existingClaim": "shared-models"}})
    assert not [m for m in existing if m["kind"] == "PersistentVolumeClaim"]


# --- API keys and TLS -----------------------------------------------------------------------


def _gateway_of(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, gateway container) of the chart rendered with ``values``."""
    (deployment,) = [m for m in render(values) if m["kind"] == "Deployment"
                     and m["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    spec = deployment["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def _mounted_file(spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret, key) whose file the container sees at ``path``, mounted read-only."""
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    relative = path[len(mount["mountPath"]) + 1:]
    (key,) = [i["key"] for i in volume["secret"]["items"] if i["path"] == relative]
    return volume["secret"]["secretName"], key


def test_api_keys_come_from_an_existing_secret_mounted_read_only():
    spec, gateway = _gateway_of({"apiKeys": {"existingSecret": "tierdet-api-keys",
                                             "key": "clients.yaml"}})
    settings = Settings.from_env(env_of(gateway))
    assert _mounted_file(spec, gateway, str(settings.api_keys_file)) == ("tierdet-api-keys",
                                                                        "clients.yaml")
    assert settings.tls_cert_file is None


def test_tls_comes_from_a_tls_secret_and_probes_and_scrapes_use_https():
    values = {"tls": {"existingSecret": "tierdet-tls"}}
    spec, gateway = _gateway_of(values)
    settings = Settings.from_env(env_of(gateway))
    assert _mounted_file(spec, gateway, str(settings.tls_cert_file)) == ("tierdet-tls", "tls.crt")
    assert _mounted_file(spec, gateway, str(settings.tls_key_file)) == ("tierdet-tls", "tls.key")
    # The gateway serves TLS on its HTTP port: a plain-HTTP probe would fail forever.
    assert gateway["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert gateway["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = [m for m in render(values) if m["kind"] == "ServiceMonitor"
                  and m["metadata"]["name"] == "tierdet-gateway"]
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    assert not list(crd_validator("ServiceMonitor").iter_errors(monitor))


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_manifests_with_secrets_and_narrowed_clients_validate_strictly(kube):
    values = {"apiKeys": {"existingSecret": "keys"}, "tls": {"existingSecret": "tls"},
              "networkPolicy": {"gatewayFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
              "triton": {"restrictedApis": {"existingSecret": "triton-admin"}}}
    for manifest in render(values):
        if manifest["kind"] in CRDS:
            errors = list(crd_validator(manifest["kind"]).iter_errors(manifest))
            assert not errors, [e.message for e in errors]
        else:
            kubernetes_validate.validate(manifest, kube, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_keys_and_tls_are_off_by_default(variant):
    settings = Settings.from_env(env_of(container(variant, "gateway")))
    assert settings.api_keys_file is None and settings.tls_cert_file is None
    assert container(variant, "gateway")["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert all("secret" not in v for v in pod_spec(variant, "gateway")["volumes"])


# --- NetworkPolicy --------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector  # not rendered by the chart's defaults
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(policy: dict[str, Any], port: int, pod: dict[str, str],
           namespace: str = NAMESPACE) -> bool:
    """Whether ``policy`` lets a pod with labels ``pod`` in ``namespace`` reach ``port``
    (NetworkPolicy semantics: rules add up; a rule without `from` admits everyone; a
    peer without namespaceSelector is the policy's own namespace)."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            if "ipBlock" in peer:
                continue
            in_namespace = (_selects(peer["namespaceSelector"], namespace_labels)
                            if "namespaceSelector" in peer else namespace == NAMESPACE)
            if in_namespace and _selects(peer.get("podSelector", {}), pod):
                return True
    return False


def _policy(manifests_: Any, component: str) -> dict[str, Any]:
    (policy,) = [m for m in manifests_ if m["kind"] == "NetworkPolicy"
                 and m["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return policy


def _pod_labels(variant: str, kind: str, component: str) -> dict[str, str]:
    return one(variant, kind, component)["spec"]["template"]["metadata"]["labels"]


# kube-prometheus-stack's Prometheus pods (the chart's default peer).
PROMETHEUS = {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_answers_only_the_gateways_and_prometheus(variant):
    policy = _policy(manifests(variant), "triton")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert _selects(policy["spec"]["podSelector"], _pod_labels(variant, "Deployment", "triton"))
    ports = {p["name"]: p["containerPort"] for p in container(variant, "triton")["ports"]}
    gateway = _pod_labels(variant, "Deployment", "gateway")
    # Gateways call gRPC and read every pod's queue on the metrics port.
    metrics = int(env_of(container(variant, "gateway"))["TIERDET_TRITON_METRICS_PORT"])
    assert metrics == ports["metrics"]
    assert admits(policy, ports["grpc"], gateway) and admits(policy, metrics, gateway)
    assert admits(policy, ports["metrics"], PROMETHEUS, "monitoring")
    assert not admits(policy, ports["grpc"], PROMETHEUS, "monitoring")
    # Nobody else: other pods here, the model builder (it shares the volume, not the
    # network), the gateway's own namesake in another namespace, and HTTP (probes only).
    builder = _pod_labels(variant, "Job", "model-builder")
    for port in ports.values():
        assert not admits(policy, port, {"app": "anything"})
        assert not admits(policy, port, builder)
        assert not admits(policy, port, gateway, "elsewhere")
    assert not admits(policy, ports["http"], gateway)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gateway_is_open_to_everyone_by_default(variant):
    policy = _policy(manifests(variant), "gateway")
    assert _selects(policy["spec"]["podSelector"], _pod_labels(variant, "Deployment", "gateway"))
    for port in (p["containerPort"] for p in container(variant, "gateway")["ports"]):
        assert admits(policy, port, {"app": "anything"}, "any-namespace")


def test_gateway_clients_can_be_narrowed_and_prometheus_still_scrapes_it():
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    policy = _policy(render({"networkPolicy": {"gatewayFrom": [ingress]}}), "gateway")
    assert admits(policy, 8080, {"app": "nginx"}, "ingress")
    assert admits(policy, 50051, {"app": "nginx"}, "ingress")
    assert not admits(policy, 8080, {"app": "anything"})
    assert admits(policy, 8080, PROMETHEUS, "monitoring")  # /metrics is on the HTTP port
    assert not admits(policy, 50051, PROMETHEUS, "monitoring")


def test_the_prometheus_peers_are_a_value_that_replaces_the_default():
    elsewhere = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "observability"}},
        "podSelector": {"matchLabels": {"app": "prometheus"}}}
    here = {"podSelector": {"matchLabels": {"app": "prometheus"}}}  # this namespace
    rendered = render({"networkPolicy": {"prometheusFrom": [elsewhere, here],
                                         "gatewayFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}})
    for component, port in (("triton", 8002), ("gateway", 8080)):
        policy = _policy(rendered, component)
        assert admits(policy, port, {"app": "prometheus"}, "observability")
        assert admits(policy, port, {"app": "prometheus"})
        assert not admits(policy, port, PROMETHEUS, "monitoring")


def test_network_policies_can_be_left_out():
    assert not [m for m in render({"networkPolicy": {"enabled": False}})
                if m["kind"] == "NetworkPolicy"]


# --- Triton's restricted APIs ---------------------------------------------------------------

# What each call the gateway makes on Triton (self._client.<method> in
# tierdet/serving/triton.py) belongs to, in Triton's restricted-API groups.
GATEWAY_TRITON_CALLS = {
    "is_server_live": "health", "is_model_ready": "health", "infer": "inference",
    "register_system_shared_memory": "shared-memory",
    "unregister_system_shared_memory": "shared-memory",
    "get_model_repository_index": "model-repository",
    "load_model": "model-repository", "unload_model": "model-repository",  # model changes
    "get_inference_statistics": "statistics", "get_model_config": "model-config",
    "close": None,  # the client's own channel
}
ADMIN_VALUE_VAR = "$(TRITON_RESTRICTED_API_VALUE)"


def _restrictions(args: list[str]) -> dict[str, tuple[set[str], str]]:
    """{"grpc"|"http": (groups, "header=value")} from tritonserver's flags."""
    out = {}
    for protocol, flag in (("grpc", "grpc-restricted-protocol"), ("http", "http-restricted-api")):
        for value in flags(args).get(flag, []):
            groups, _, header = value.partition(":")
            out[protocol] = (set(groups.split(",")), header)
    return out


def test_every_triton_call_of_the_gateway_has_its_api_group():
    from tierdet.serving import triton

    source = Path(triton.__file__).read_text()
    assert set(re.findall(r"self\._client\.(\w+)\(", source)) == set(GATEWAY_TRITON_CALLS)
    assert "tritonclient.http" not in source  # gRPC only: no HTTP API of Triton is used


@pytest.mark.parametrize("variant", VARIANTS)
def test_tritons_control_plane_is_closed_and_only_the_gateway_holds_the_key(variant):
    from tierdet.serving.triton import API_KEY_HEADER, RESTRICTED_APIS

    triton = container(variant, "triton", "triton")
    restricted = _restrictions(triton["args"])
    # Load/unload, shared memory, statistics...: restricted on both protocols.
    for protocol in ("grpc", "http"):
        assert set(RESTRICTED_APIS) <= restricted[protocol][0], protocol
    # The gateway's data path (gRPC health, inference) and kubelet's probes stay open.
    assert not {"health", "inference"} & restricted["grpc"][0]
    assert "health" not in restricted["http"][0]
    value = {e["name"]: e for e in triton["env"]}[ADMIN_VALUE_VAR[2:-1]]
    secret = one(variant, "Secret", "triton")
    ref = {"name": secret["metadata"]["name"], "key": "header-value"}
    assert value["valueFrom"]["secretKeyRef"] == ref
    for _groups, header in restricted.values():
        assert header == f"{API_KEY_HEADER}={ADMIN_VALUE_VAR}"  # the header the gateway sends
    gateway = {e["name"]: e for e in container(variant, "gateway")["env"]}
    assert gateway["TIERDET_TRITON_API_KEY"]["valueFrom"]["secretKeyRef"] == ref
    generated = base64.b64decode(secret["data"]["header-value"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", generated)


def test_an_existing_admin_secret_replaces_the_generated_one():
    values = {"triton": {"restrictedApis": {"existingSecret": "triton-admin", "key": "v"}}}
    rendered = render(values)
    assert not [m for m in rendered if m["kind"] == "Secret"]
    (deployment,) = [m for m in rendered if m["kind"] == "Deployment"
                     and m["metadata"]["name"] == "tierdet-triton"]
    triton = next(c for c in deployment["spec"]["template"]["spec"]["containers"])
    value = {e["name"]: e for e in triton["env"]}[ADMIN_VALUE_VAR[2:-1]]
    assert value["valueFrom"]["secretKeyRef"] == {"name": "triton-admin", "key": "v"}
    (gateway,) = [m for m in rendered if m["kind"] == "Deployment"
                  and m["metadata"]["name"] == "tierdet-gateway"]
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TIERDET_TRITON_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "triton-admin", "key": "v"}


def test_restrictions_can_be_lifted():
    values = {"triton": {"restrictedApis": {"grpc": [], "http": []}}}
    rendered = render(values)
    assert not [m for m in rendered if m["kind"] == "Secret"]
    (deployment,) = [m for m in rendered if m["kind"] == "Deployment"
                     and m["metadata"]["name"] == "tierdet-triton"]
    triton = deployment["spec"]["template"]["spec"]["containers"][0]
    assert not _restrictions(triton["args"])
    assert ADMIN_VALUE_VAR[2:-1] not in {e["name"] for e in triton["env"]}
    (gateway,) = [m for m in rendered if m["kind"] == "Deployment"
                  and m["metadata"]["name"] == "tierdet-gateway"]
    env = {e["name"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "TIERDET_TRITON_API_KEY" not in env


# One call of each group, over gRPC (client, headers) and HTTP (method, path).
GRPC_PROBES = {
    "health": lambda c, h: c.is_server_live(headers=h),
    "metadata": lambda c, h: c.get_server_metadata(headers=h),
    "inference": lambda c, h: c.infer("absent", [_one_byte()], headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "model-config": lambda c, h: c.get_model_config("absent", headers=h),
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}
HTTP_PROBES = {
    "health": ("GET", "/v2/health/live"), "metadata": ("GET", "/v2"),
    "inference": ("POST", "/v2/models/absent/infer"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
    "model-config": ("GET", "/v2/models/absent/config"),
    "model-repository": ("POST", "/v2/repository/index"),
    "statistics": ("GET", "/v2/models/stats"), "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
}


def _one_byte() -> Any:
    import numpy as np
    from tritonclient.grpc import InferInput

    tensor = InferInput("x", [1], "UINT8")
    tensor.set_data_from_numpy(np.zeros(1, np.uint8))
    return tensor


def _grpc_refused(call: Any, client: Any, headers: dict[str, str] | None) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        call(client, headers)
    except InferenceServerException as exc:
        return "restricted" in (exc.message() or "")
    return False


def test_the_restrictions_parse_and_hold_on_tritonserver(tmp_path):
    """The chart's flags on the real tritonserver (the wheel's 2.51, the release of
    the chart's 24.10 image): each group is refused without the header exactly when
    restricted, and answered with it; the gateway's data path (health, inference) stays open."""
    import httpx
    import tritonclient.grpc as triton_grpc
    from tierdet.devstack.stack import free_port
    from tierdet.devstack.triton import LocalTriton

    value = "s3cret-value-0123"
    args = [a.replace(ADMIN_VALUE_VAR, value)
            for a in container("default", "triton", "triton")["args"] if "restricted" in a]
    restricted = _restrictions(args)
    (tmp_path / "repository").mkdir()
    server = LocalTriton(tmp_path / "repository", tmp_path, http_port=free_port(),
                         grpc_port=free_port(), metrics_port=free_port(),
                         log_path=tmp_path / "triton.log", api_key=None)
    # The devstack's flags (loopback, its backends), then the chart's restrictions.
    server.command = lambda: LocalTriton.command(server) + args  # type: ignore[method-assign]
    server.start()
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        server.wait_ready(60)
        admin = {"triton-grpc-protocol-tierdet-admin": value}
        for group, call in GRPC_PROBES.items():
            refused = _grpc_refused(call, client, None)
            assert refused == (group in restricted["grpc"][0]), group
            assert not _grpc_refused(call, client, admin), group
        for group, (method, path) in HTTP_PROBES.items():
            plain = httpx.request(method, server.http_url + path, timeout=5)
            assert (plain.status_code == 403) == (group in restricted["http"][0]), group
            with_header = httpx.request(method, server.http_url + path, timeout=5,
                                        headers={"tierdet-admin": value})
            assert with_header.status_code != 403, group
        # What the gateway calls with the key; its data path needs none.
        used = {g for g in GATEWAY_TRITON_CALLS.values() if g}
        assert used & restricted["grpc"][0] == used - {"health", "inference"}
    finally:
        client.close()
        server.stop()


# --- shutdown -------------------------------------------------------------------------------


def _gateway_drain_s() -> int:
    """How long the gateway may take after SIGTERM: in-flight requests get run_gateway's
    grace_s, then the worker supervisor kills what is left 5 s later (Supervisor.stop)."""
    import inspect

    from tierdet.frontends.server import run_gateway

    return int(inspect.signature(run_gateway).parameters["grace_s"].default) + 5


def _pre_stop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"
    return int(command[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_get_their_prestop_sleep_and_drain_before_they_are_killed(variant):
    gateway, triton = container(variant, "gateway"), container(variant, "triton", "triton")
    exit_timeout = int(flags(triton["args"])["exit-timeout-secs"][0])
    for component, c, drain in (("gateway", gateway, _gateway_drain_s()),
                                ("triton", triton, exit_timeout)):
        grace = pod_spec(variant, component)["terminationGracePeriodSeconds"]
        assert grace >= _pre_stop_sleep(c) + drain + 5, component


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_leaving_triton_serves_until_every_gateway_has_re_resolved(variant):
    # Gateways re-resolve the headless Service every triton_resolve_s; CoreDNS
    # answers with a 5 s TTL.
    resolve_s = Settings.from_env({}).triton_resolve_s
    assert _pre_stop_sleep(container(variant, "triton", "triton")) > resolve_s + 5
    assert _pre_stop_sleep(container(variant, "gateway")) > 0


def test_the_prestop_sleep_exists_in_the_images():
    # /bin/sleep is coreutils, an Essential package of every Debian image (the
    # gateway's slim base) and present in NGC's Ubuntu-based Triton image;
    # lifecycle.preStop.sleep would need Kubernetes 1.30, the chart supports 1.28.
    assert dockerfile_from("gateway")[-1].startswith("python:3.11-slim-bookworm")
    assert chart().merge_values(None)["images"]["triton"]["repository"] == \
        "nvcr.io/nvidia/tritonserver"
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.28.0-0"


def test_a_grace_period_shorter_than_the_shutdown_stops_the_install():
    drain = _gateway_drain_s()
    cases = (("gateway", 5 + drain + 5, f"the gateway's drain ({drain} s) + 5 s"),
             ("triton", 15 + 30 + 5, "triton.exitTimeoutSeconds (30 s) + 5 s"))
    for component, needed, message in cases:
        short = {component: {"terminationGracePeriodSeconds": needed - 1}}
        with pytest.raises(HelmError, match=re.escape(f"{message} = {needed} s")):
            chart().render(short, name=RELEASE, namespace=NAMESPACE)
        enough = {component: {"terminationGracePeriodSeconds": needed}}
        chart().render(enough, name=RELEASE, namespace=NAMESPACE)


# --- model cards ----------------------------------------------------------------------------

CARD = {"name": "yolox-nano-416", "file": "examples/cards/yolox-nano.yaml"}
CARDS_VALUES = {"cards": {"models": [CARD], "volume": {
    "persistentVolumeClaim": {"claimName": "tierdet-cards", "readOnly": True}}}}


def _with_cards(variant: str) -> dict[str, dict[str, Any]]:
    """The chart with a card, by component and container name (valid Kubernetes)."""
    values = yaml.safe_load(yaml.safe_dump(overlay(variant) or {}))
    values.update(copy.deepcopy(CARDS_VALUES))
    # A tier may name a card's model like a zoo one (Helm merges this into the tiers).
    values.setdefault("tiers", {})["accurate"] = {"budget_ms": 500,
                                                  "models": ["yolox-nano-416"]}
    out: dict[str, dict[str, Any]] = {}
    for manifest in render(values):
        if manifest["kind"] not in CRDS:
            kubernetes_validate.validate(manifest, KUBE_VERSIONS[-1], strict=True)
        if manifest["kind"] in ("Deployment", "Job"):
            spec = manifest["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                out[c["name"]] = {**c, "volumes": {v["name"]: v for v in spec["volumes"]}}
    return out


def _reads_cards(c: dict[str, Any]) -> None:
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "cards"]
    assert mount == {"name": "cards", "mountPath": "/cards", "readOnly": True}
    assert c["workingDir"] == "/cards"  # the card paths are relative to the volume
    assert c["volumes"]["cards"]["persistentVolumeClaim"]["claimName"] == "tierdet-cards"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_cards_are_built_planned_loaded_and_served_from_one_volume(variant):
    """The Job builds the card after the models, the gpu init container makes its plan
    from the template the build wrote, a cpu Triton loads it by name, and the gateway
    reads the card from the same read-only volume."""
    c = _with_cards(variant)
    builder = c["model-builder"]
    assert builder["args"][3] == CARD["file"]  # WEIGHTS TARGET MODELS CARDS
    _reads_cards(builder)
    gateway = c["gateway"]
    assert env_of(gateway)["TIERDET_CARDS"] == CARD["file"]
    _reads_cards(gateway)
    if variant == "gpu":
        engines = c["engines"]
        args = flags(engines["args"])
        assert CARD["name"] in args["models"][0].split(",") and args["cards"] == [CARD["file"]]
        _reads_cards(engines)
    else:
        assert f"--load-model={CARD['name']}" in c["triton"]["args"]
        waited = flags(c["wait-for-models"]["args"])["models"][0].split(",")
        assert CARD["name"] in waited


def test_without_cards_nothing_mounts_a_cards_volume():
    for variant in VARIANTS:
        for m in manifests(variant):
            assert "cards" not in json.dumps(m.get("spec", {})).replace("cards-", ""), (
                m["kind"], m["metadata"]["name"])


@pytest.mark.parametrize("change,says", [
    ({"volume": {}}, "cards.models needs cards.volume"),
    ({"models": [{"name": "damoyolo-s", "file": "x.yaml"}]}, "is a zoo model's name"),
])
def test_cards_without_a_volume_or_with_a_zoo_name_are_refused(change, says):
    values = copy.deepcopy(CARDS_VALUES)
    values["cards"].update(change)
    with pytest.raises(HelmError, match=says):
        render(values)
