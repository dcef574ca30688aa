"""Rules and dashboards, proven against a real Prometheus scraping the real stack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from conftest import REPO, TEST_MODEL, encode, photos
from tierdet.artifacts import rules
from tierdet.artifacts.dashboards import DASHBOARDS, DATASOURCE, OUT_DIR, all_exprs, render
from tierdet.devstack.stack import GatewayProcess, free_port, stop_process, wait_http
from tierdet.registry.accuracy import APResult, EvalRecord, EvalReport

PROM_DIR = REPO / "docker" / "prometheus"
RULES = PROM_DIR / "rules" / "tierdet.rules.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt install prometheus)")
    return path


def test_promtool_checks_config_and_rules(tmp_path):
    promtool = _tool("promtool")
    # The compose config refers to rules by their in-container path.
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    for args in (["check", "config", str(local)], ["check", "rules", str(RULES)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([promtool, "test", "rules", "tests/tierdet.test.yml"],
                            cwd=PROM_DIR, capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_dashboards_are_generated_valid_and_bound_to_the_datasource():
    for uid in DASHBOARDS:
        committed = (OUT_DIR / f"{uid}.json").read_text()
        assert committed == render(uid), "run `tierdet generate`"
        board = json.loads(committed)
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"] == DATASOURCE
            assert all(t["datasource"] == DATASOURCE for t in panel["targets"])
    provisioned = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioned["datasources"][0]["uid"] == DATASOURCE["uid"]


@pytest.fixture(scope="module")
def observed_gateway(triton, tmp_path_factory):
    """A gateway with two evaluation records, so AP gauges (latest and previous) exist."""
    work = tmp_path_factory.mktemp("observed")
    evals = work / "evals"
    # Two evaluations of the same model, in two report files: the gauges must
    # show the newer one and keep the older as "previous".
    for when, ap in (("2026-01-01T00:00:00+00:00", 0.41), ("2026-02-01T00:00:00+00:00", 0.40)):
        record = EvalRecord.of(APResult(ap, ap + 0.2, ap, -1.0, ap, ap), model=TEST_MODEL,
                               tier=None, source="gateway", dataset="fixture", split="val",
                               images=10, evaluated_at=when)
        EvalReport([record]).save(evals / f"{when[:7]}.json")
    gw = GatewayProcess.start(triton.endpoint, work / "gateway.log", eval_dir=str(evals))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def prometheus(observed_gateway, triton, tmp_path_factory):
    binary = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "tierdet-gateway",
             "static_configs": [{"targets": [observed_gateway.http.removeprefix("http://")]}]},
            {"job_name": "triton",
             "static_configs": [{"targets": [triton.metrics_url.split("/")[2]]}]},
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'db'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(work / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/-/ready", 60, proc)
    yield url
    stop_process(proc)


def _drive_traffic(base: str, seconds: float) -> None:
    """Bounded traffic: ok requests on two tiers plus a few impossible budgets."""
    image = encode(photos()["coffee"])
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(200):
            if time.monotonic() > deadline:
                break
            fields = [{"tier": "balanced"}, {"tier": "accurate"}, {"sla_ms": "1"}][i % 3]
            c.post("/v1/detect", files={"image": ("a.jpg", image, "image/jpeg")}, data=fields)


def _query(prom: str, expr: str) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_and_rule_query_returns_data(prometheus, observed_gateway):
    driver = threading.Thread(target=_drive_traffic, args=(observed_gateway.http, 12.0))
    driver.start()
    queries = [("dashboard", e) for e in all_exprs()] + rules.signals()
    empty: list[tuple[str, str]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        empty = [(name, expr) for name, expr in queries if not _query(prometheus, expr)]
        if not empty and not driver.is_alive():
            break
        time.sleep(2)
    driver.join()
    assert not empty, "queries without data:\n" + "\n".join(f"{n}: {e}" for n, e in empty)


def test_ap_gauges_and_models_endpoint_show_measured_ap(observed_gateway):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(observed_gateway.http + "/metrics").text
    samples = {(s.name, s.labels.get("metric")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("dataset") == "fixture" and s.labels.get("model") == TEST_MODEL}
    assert samples[("tierdet_model_ap", "AP")] == 0.40
    assert samples[("tierdet_model_ap_previous", "AP")] == 0.41
    assert ("tierdet_model_ap", "APs") not in samples  # -1: no small objects in the split
    assert samples[("tierdet_model_ap_evaluated_timestamp_seconds", None)] == 1769904000.0
    models = httpx.get(observed_gateway.http + "/v1/models").json()["models"]
    (d0,) = [m for m in models if m["name"] == TEST_MODEL]
    assert d0["measured_ap"] == {"fixture": 0.40}
