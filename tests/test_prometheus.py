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
    # Compose's Grafana: its one Prometheus is the default the variable resolves to.
    provisioned = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == DATASOURCE["type"] and source["isDefault"] is True


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
    # Shadow scoring needs two models of one label set: its panels and rule are
    # checked by promtool (tests/tierdet.test.yml) and tests/test_shadow.py.
    queries = [("dashboard", e) for e in all_exprs(exercised=True)] + rules.signals()
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


# --- the autoscalers' series, on a real Prometheus scraping Triton-like pods ----------------

# Triton's exposition of the series the autoscaling rules read (names, types, labels
# as tritonserver 2.51 writes them); {elapsed} drives the counters.
TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="efficientdet-d0",version="1"}} {success}
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{{model="efficientdet-d0",reason="REJECTED",version="1"}} {rejected}
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="efficientdet-d0",version="1"}} {queue_us}
# HELP nv_inference_pending_request_count Instantaneous number of pending requests \
awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{{model="efficientdet-d0",version="1"}} {pending_d0}
nv_inference_pending_request_count{{model="damoyolo-s",version="1"}} {pending_s}
"""
# busy: runs 100 requests/s, each waits 2000 µs; rejecting: rejects 50/s at their
# queue timeout (Triton adds no queue time and no success for them) while 40 wait.
FAKE_PODS = {
    "busy": lambda t: {"success": int(100 * t), "rejected": 0, "queue_us": 2000 * int(100 * t),
                       "pending_d0": 2, "pending_s": 1},
    "rejecting": lambda t: {"success": 500, "rejected": int(50 * t), "queue_us": 5_000_000,
                            "pending_d0": 30, "pending_s": 10},
}
# A gateway that has answered no request yet: no tierdet_requests_total series at all.
IDLE_GATEWAY_TEXT = "# TYPE tierdet_triton_up gauge\ntierdet_triton_up 1.0\n"


class _Exporter:
    """A /metrics endpoint on loopback serving ``text(seconds since start)``."""

    def __init__(self, text):
        import http.server

        started = time.monotonic()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = text(time.monotonic() - started).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


NAMESPACE = "inference"


def _rule_file(rule_set: str, work) -> str:
    """The compose rules as committed, or the Helm chart's PrometheusRule as rendered."""
    if rule_set == "compose":
        return str(RULES)
    from helm_python import Chart

    files = Chart.load(REPO / "deploy" / "helm" / "tierdet").render(
        None, name="tierdet", namespace=NAMESPACE, is_install=True)
    (rule,) = [doc for path, text in files.items() if path.endswith(".yaml")
               for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "PrometheusRule"]
    path = work / "helm-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return str(path)


@pytest.fixture
def fake_prometheus(tmp_path):
    """start(rule_set, pods, gateway) -> URL of a Prometheus scraping fake Triton pods
    (names of FAKE_PODS) and an idle gateway, labelled as the operator labels them."""
    binary = _tool("prometheus")
    started = []

    def start(rule_set, pods, gateway=True):
        exporters = {pod: _Exporter(lambda t, pod=pod: TRITON_TEXT.format(**FAKE_PODS[pod](t)))
                     for pod in pods}
        if gateway:
            exporters["gateway"] = _Exporter(lambda t: IDLE_GATEWAY_TEXT)
        jobs = {"triton": [p for p in exporters if p != "gateway"],
                "tierdet-gateway": [p for p in exporters if p == "gateway"]}
        service = {"triton": "tierdet-triton", "tierdet-gateway": "tierdet-gateway"}
        work = tmp_path / f"{rule_set}-{len(started)}"
        work.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [_rule_file(rule_set, work)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [
                    {"targets": [exporters[pod].address],
                     "labels": {"namespace": NAMESPACE, "service": service[job], "pod": pod}}
                    for pod in members]}
                for job, members in jobs.items() if members],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'db'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=(work / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
        started.append((proc, list(exporters.values())))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ready", 60, proc)
        return url

    yield start
    for proc, exporters in started:
        stop_process(proc)
        for exporter in exporters:
            exporter.close()


def _by_pod(prom: str, expr: str) -> dict[str, float]:
    return {s["metric"].get("pod", ""): float(s["value"][1]) for s in _query(prom, expr)}


def _blind_alert(prom: str) -> dict:
    """The TierdetAutoscalingBlind rule's state and the series it is active for."""
    body = httpx.get(prom + "/api/v1/rules", params={"type": "alert"}, timeout=10).json()
    (rule,) = [r for g in body["data"]["groups"] for r in g["rules"]
               if r["name"] == "TierdetAutoscalingBlind"]
    return {"state": rule["state"], "health": rule["health"],
            "series": sorted(a["labels"]["series"] for a in rule["alerts"])}


def _wait_for(check, seconds: float = 45):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


@pytest.mark.parametrize("rule_set", ["compose", "helm"])
def test_pending_requests_rule_sees_overload_that_queue_time_reads_as_idle(
        fake_prometheus, rule_set):
    prom = fake_prometheus(rule_set, ["busy", "rejecting"])

    def recorded():
        queue = _by_pod(prom, "tierdet:triton_queue_time_per_request_us:rate1m")
        pending = _by_pod(prom, rules.PENDING_RECORD)
        rps = _by_pod(prom, "tierdet:gateway_requests_per_second:rate1m")
        assert queue.keys() == pending.keys() == {"busy", "rejecting"}, (queue, pending)
        assert rps == {"gateway": 0.0}  # idle, and still a series the HPA can read
        return queue, pending

    queue, pending = _wait_for(recorded)
    # Every request of "rejecting" is refused: its queue time reads 0 as if it were
    # idle (the HPA would scale it down), while 40 requests wait in its queues.
    assert queue["rejecting"] == 0
    assert queue["busy"] == pytest.approx(2000)
    assert pending == {"busy": 3.0, "rejecting": 40.0}
    # Every scaling series is there: the blind-autoscaler alert is quiet (once its
    # group has been evaluated with them; before the first scrapes they were missing).
    def quiet():
        assert _blind_alert(prom) == {"state": "inactive", "health": "ok", "series": []}

    _wait_for(quiet, 10)


@pytest.mark.parametrize("rule_set", ["compose", "helm"])
def test_the_blind_autoscaler_alert_fires_for_each_missing_scaling_series(
        fake_prometheus, rule_set):
    # Triton not scraped (say, its ServiceMonitor is not selected): both of its
    # scaling series are missing; the gateway's is there.
    prom = fake_prometheus(rule_set, [])

    missing = sorted(["tierdet:triton_queue_time_per_request_us:rate1m", rules.PENDING_RECORD])

    def active():
        # Until the first scrape every series is missing: wait for the gateway's.
        assert _by_pod(prom, "tierdet:gateway_requests_per_second:rate1m") == {"gateway": 0}
        alert = _blind_alert(prom)
        assert alert["state"] in ("pending", "firing"), alert  # pending: its 15 m "for"
        assert alert["series"] == missing, alert
        return alert

    alert = _wait_for(active)
    assert alert["health"] == "ok"
    assert set(rules.SCALING_SERIES) - set(alert["series"]) == {
        "tierdet:gateway_requests_per_second:rate1m"}
