"""Grafana dashboards, generated: `tierdet generate` rewrites
deploy/helm/tierdet/dashboards/*.json (a test fails if the committed files drift).

One copy serves both deployments: the chart ships each file as a ConfigMap
for Grafana's dashboard sidecar (templates/grafana-dashboards.yaml), and
compose mounts the same directory into its Grafana. Panels query a
``datasource`` variable rather than a fixed datasource uid, so the boards
bind to whatever Prometheus the cluster's Grafana has (the default one
unless the viewer picks another).

Panels are declared as (title, unit, [(legend, PromQL)]) so the queries
live in one place; the real-Prometheus test runs every one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tierdet.artifacts.rules import SHADOW_NEEDS

DATASOURCE_VARIABLE = {
    "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
    "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
OUT_DIR = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "tierdet" / "dashboards"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (legend, expr)
    kind: str = "timeseries"
    # What must happen for it to show data beyond a served, exercised stack
    # (``rules.Record.needs``): the real-Prometheus test runs the others.
    needs: str = ""


OVERVIEW = (
    Panel("Throughput (images/s) by model", "reqps",
          (("{{model}}", "model:tierdet_images:rate1m"),)),
    Panel("Latency p50 / p99 by model", "s", (
        ("p50 {{model}}", "histogram_quantile(0.5, sum by (model, le) "
                          "(rate(tierdet_request_duration_seconds_bucket[5m])))"),
        ("p99 {{model}}", "model:tierdet_request_duration_seconds:p99_5m"),
    )),
    Panel("SLO attainment by tier", "percentunit",
          (("{{tier}}", "tier:tierdet_slo_attainment:ratio_rate5m"),)),
    Panel("Shed rate by tier", "percentunit",
          (("{{tier}}", "tier:tierdet_shed:ratio_rate5m"),)),
    Panel("Requests by outcome", "reqps",
          (("{{outcome}}", "sum by (outcome) (rate(tierdet_requests_total[1m]))"),)),
    Panel("Time per stage (mean)", "s", (
        ("{{stage}}", "sum by (stage) (rate(tierdet_stage_duration_seconds_sum[5m])) "
                      "/ sum by (stage) (rate(tierdet_stage_duration_seconds_count[5m]))"),
    )),
    Panel("Actual / predicted latency (median)", "none", (
        ("{{model}}", "histogram_quantile(0.5, sum by (model, le) "
                      "(rate(tierdet_latency_prediction_ratio_bucket[5m])))"),
    )),
    Panel("Router's service estimate per device (batch 1)", "s", (
        ("{{model}} at {{endpoint}}", "max by (model, endpoint) (tierdet_route_service_seconds)"),
    )),
    Panel("In-flight requests", "short", (("in flight", "sum(tierdet_inflight_requests)"),)),
    Panel("Measured AP by model and tier (latest evaluation)", "percentunit",
          (("{{model}} {{tier}} {{dataset}}", 'tierdet_model_ap{metric="AP"}'),), "stat"),
    Panel("Live AP estimate (shadow scoring) beside the labelled AP", "percentunit", (
        ("{{model}} {{tier}} live", "avg by (tier, model) (tierdet_shadow_agreement)"),
        ("{{model}} labelled ({{dataset}})",
         'max by (model, dataset) (tierdet_model_ap{metric="AP", source="gateway"})'),
    ), needs=SHADOW_NEEDS),
    Panel("Shadow samples by outcome", "ops", (
        ("{{outcome}}", "sum by (outcome) (rate(tierdet_shadow_samples_total[5m]))"),
    ), needs=SHADOW_NEEDS),
    Panel("Published COCO AP by model", "none",
          (("{{model}}", "tierdet_model_published_ap"),), "stat"),
    Panel("Models ready", "short", (("{{model}}", "tierdet_model_ready"),), "stat"),
)

TRITON = (
    Panel("Queue vs compute time per request", "s", (
        ("queue {{model}}", "model:nv_inference_queue_seconds_per_request:rate1m"),
        ("compute {{model}}", "sum by (model) (rate(nv_inference_compute_infer_duration_us[1m])) "
                              "/ 1e6 / sum by (model) (rate(nv_inference_request_success[1m]))"),
    )),
    Panel("Executions by batch size", "ops", (
        ("{{model}} b={{batch_size}}",
         "sum by (model, batch_size) (rate(tierdet_triton_batch_executions_total[1m]))"),
    )),
    Panel("Mean batch size", "short", (
        ("{{model}}", "sum by (model) (rate(nv_inference_count[1m])) "
                      "/ sum by (model) (rate(nv_inference_exec_count[1m]))"),
    )),
    Panel("Successful requests by model", "reqps", (
        ("{{model}}", "sum by (model) (rate(nv_inference_request_success[1m]))"),
    )),
    Panel("Failed requests by model and reason", "reqps", (
        ("{{model}} {{reason}}",
         "sum by (model, reason) (rate(nv_inference_request_failure[1m]))"),
    )),
    Panel("Pending requests", "short", (
        ("{{model}}", "sum by (model) (nv_inference_pending_request_count)"),
    )),
)

DASHBOARDS = {"tierdet-overview": ("tierdet: overview", OVERVIEW),
              "tierdet-triton": ("tierdet: Triton", TRITON)}


def _panel(panel: Panel, panel_id: int) -> dict:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * ((panel_id - 1) % 2),
                    "y": 8 * ((panel_id - 1) // 2)},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend} for i, (legend, expr) in enumerate(panel.targets)],
    }


def render(uid: str) -> str:
    title, panels = DASHBOARDS[uid]
    board = {
        "uid": uid, "title": title, "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["tierdet"], "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "timezone": "browser",
        "templating": {"list": [DATASOURCE_VARIABLE]},
        "panels": [_panel(p, i) for i, p in enumerate(panels, start=1)],
    }
    return json.dumps(board, indent=2) + "\n"


def all_exprs(exercised: bool = False) -> list[str]:
    """Every panel's queries; ``exercised``: only those a served, exercised stack
    answers (not the panels that need more, ``Panel.needs``)."""
    return [expr for _, panels in DASHBOARDS.values() for p in panels for _, expr in p.targets
            if not (exercised and p.needs)]


def files(out_dir: Path = OUT_DIR) -> dict[Path, str]:
    return {out_dir / f"{uid}.json": render(uid) for uid in DASHBOARDS}
