"""The Prometheus rules, one definition for compose and for Helm.

Both ``docker/prometheus/rules/tierdet.rules.yml`` (compose, unit-tested by
``promtool test rules``) and ``deploy/helm/tierdet/templates/prometheusrule.yaml``
(the prometheus-operator's PrometheusRule, per release) are rendered from
``groups`` here. They differ only in their selectors (Helm selects the
release's gateway and Triton services in its namespace) and in where the
thresholds come from (Helm: the chart's values; compose: those values'
defaults, read from values.yaml).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE_RULES = REPO / "docker" / "prometheus" / "rules" / "tierdet.rules.yml"
HELM_RULES = REPO / "deploy" / "helm" / "tierdet" / "templates" / "prometheusrule.yaml"
HELM_VALUES = REPO / "deploy" / "helm" / "tierdet" / "values.yaml"


@dataclass(frozen=True)
class Target:
    """How one deployment selects the series of each component, and its thresholds."""

    gateway: str  # label matchers of the gateway's series ("" for all)
    triton: str
    namespace: str  # of the per-pod series recorded here (they keep only namespace, pod)
    threshold: Callable[[str], str]  # a prometheusRule value name -> its text in the rule
    pad: str = ""  # between the braces and a Helm action, which trims it away

    def sel(self, component: str, *matchers: str) -> str:
        """``{...}`` with the component's selector and ``matchers``, or "" if empty."""
        parts = [p for p in (getattr(self, component), *matchers) if p]
        return "{" + self.pad + ", ".join(parts) + self.pad + "}" if parts else ""


@dataclass(frozen=True)
class Record:
    record: str
    expr: str
    # What must happen for it to have data beyond a served, exercised stack (the
    # real-Prometheus test runs the others; ../tests covers these with promtool).
    needs: str = ""


@dataclass(frozen=True)
class Alert:
    alert: str
    expr: str
    for_: str | None
    severity: str
    summary: str
    description: str = ""
    # Queries that return data on a healthy, exercised system (the alert's
    # inputs): the real-Prometheus test runs each of them.
    signals: tuple[str, ...] = field(default=())


PENDING_RECORD = "tierdet:triton_pending_requests:avg1m"
# The recording rules the HorizontalPodAutoscalers scale on (through
# prometheus-adapter; templates/triton-hpa.yaml, gateway-hpa.yaml).
SCALING_SERIES = ("tierdet:triton_queue_time_per_request_us:rate1m", PENDING_RECORD,
                  "tierdet:gateway_requests_per_second:rate1m")
SHADOW_RECORD = "tier_model:tierdet_shadow_agreement:avg1h"
# TierdetShadowAgreementDrop: the hour's agreement below this share of the
# day's, once the hour scored at least this many images.
SHADOW_DROP_RATIO = 0.9
SHADOW_MIN_SAMPLES = 50
SHADOW_NEEDS = "shadow scoring: two models of one label set, TIERDET_SHADOW_SAMPLE > 0"


def groups(t: Target) -> list[tuple[str, list[Record | Alert]]]:
    gw, tr = t.sel("gateway"), t.sel("triton")
    met = t.sel("gateway", 'result="met"')
    shed = t.sel("gateway", 'outcome="shed"')
    failed = t.sel("gateway", 'outcome=~"error|timeout"')
    ap = t.sel("gateway", 'metric="AP"')
    scored = t.sel("gateway", 'outcome="scored"')
    return [
        ("tierdet.recording", [
            # Fraction of budgeted requests answered within budget, per tier
            # (shed and failed requests count as missed).
            Record("tier:tierdet_slo_attainment:ratio_rate5m",
                   f"sum by (tier) (rate(tierdet_slo_requests_total{met}[5m]))\n"
                   f"  / sum by (tier) (rate(tierdet_slo_requests_total{gw}[5m]))"),
            Record("model:tierdet_images:rate1m",
                   f"sum by (model) (rate(tierdet_images_total{gw}[1m]))"),
            Record("tier:tierdet_shed:ratio_rate5m",
                   f"sum by (tier) (rate(tierdet_requests_total{shed}[5m]))\n"
                   f"  / sum by (tier) (rate(tierdet_requests_total{gw}[5m]))"),
            Record("model:nv_inference_queue_seconds_per_request:rate1m",
                   f"sum by (model) (rate(nv_inference_queue_duration_us{tr}[1m])) / 1e6\n"
                   f"  / sum by (model) (rate(nv_inference_request_success{tr}[1m]))"),
            Record("model:tierdet_request_duration_seconds:p99_5m",
                   "histogram_quantile(0.99,\n  sum by (model, le) "
                   f"(rate(tierdet_request_duration_seconds_bucket{gw}[5m])))"),
            # Shadow scoring's label-free AP, over the last hour and the gateways.
            Record(SHADOW_RECORD,
                   f"avg by (tier, model) (avg_over_time(tierdet_shadow_agreement{gw}[1h]))",
                   needs=SHADOW_NEEDS),
        ]),
        # Per-pod series for the autoscalers; prometheus-adapter exposes them as
        # custom metrics (deploy/helm/tierdet/prometheus-adapter-values.yaml).
        ("tierdet.autoscaling", [
            # Triton's counters are cumulative microseconds and requests: their
            # rates divide into the mean queue wait per request. Idle pods give 0.
            Record("tierdet:triton_queue_time_per_request_us:rate1m",
                   f"sum by (namespace, pod) (rate(nv_inference_queue_duration_us{tr}[1m]))\n"
                   "/\n"
                   "clamp_min(sum by (namespace, pod) "
                   f"(rate(nv_inference_request_success{tr}[1m])), 1e-6)"),
            # Requests waiting in Triton's queues (its own gauge, per model), summed
            # per pod and averaged over a minute. Unlike queue time, which Triton adds
            # only for requests it runs, it stays high while the queue policy rejects
            # requests whose timeout passed: overload then still reads as overload.
            Record(PENDING_RECORD,
                   "sum by (namespace, pod) "
                   f"(avg_over_time(nv_inference_pending_request_count{tr}[1m]))"),
            # 0 for a gateway that has answered nothing yet (its request counter has
            # no series before the first request): idle reads as idle, not as absent.
            Record("tierdet:gateway_requests_per_second:rate1m",
                   f"sum by (namespace, pod) (rate(tierdet_requests_total{gw}[1m]))\n"
                   f"or\nsum by (namespace, pod) (0 * tierdet_triton_up{gw})"),
        ]),
        ("tierdet.alerts", [
            Alert("TierdetSLOAttainmentLow", "tier:tierdet_slo_attainment:ratio_rate5m < 0.99",
                  "10m", "page",
                  "Tier {{ $labels.tier }}: only {{ $value | humanizePercentage }} of requests "
                  "within budget",
                  signals=("tier:tierdet_slo_attainment:ratio_rate5m",)),
            Alert("TierdetTritonDown",
                  f"up{tr} == 0 or tierdet_triton_up{gw} == 0", "1m", "page",
                  "The gateway cannot reach Triton, or Triton's metrics endpoint is down",
                  signals=(f"up{tr}", f"tierdet_triton_up{gw}")),
            Alert("TierdetNoReadyModel", f"sum(tierdet_model_ready{gw}) == 0", "1m", "page",
                  "No model is ready: every detect request fails",
                  signals=(f"sum(tierdet_model_ready{gw})",)),
            Alert("TierdetModelNotReady", f"tierdet_model_ready{gw} == 0", "10m", "ticket",
                  "Model {{ $labels.model }} is not ready in Triton",
                  "{{ $labels.model }} has not been ready for 10 minutes (engine build failed "
                  "or the model failed to load; see the Triton pod's engines init container "
                  "log).", signals=(f"tierdet_model_ready{gw}",)),
            Alert("TierdetTritonQueueTimeHigh",
                  f"tierdet:triton_queue_time_per_request_us:rate1m{t.sel('namespace')} > "
                  f"{t.threshold('queueTimeAlertUs')}", "5m", "ticket",
                  "Triton requests wait too long in the queue",
                  "{{ $labels.pod }} queues each request for {{ $value | humanize }}µs on "
                  "average; latency budgets are being missed. Check that the autoscaler can "
                  "add Triton pods (GPU capacity, prometheus-adapter).",
                  signals=("tierdet:triton_queue_time_per_request_us:rate1m",)),
            # The HPAs read these through prometheus-adapter; without them they hold
            # their replica count (Triton stays at one pod) and nothing else says so.
            Alert("TierdetAutoscalingBlind",
                  "\nor\n".join(f'label_replace(absent({series}{t.sel("namespace")}), '
                                 f'"series", "{series}", "", "")' for series in SCALING_SERIES),
                  "15m", "ticket",
                  "The autoscalers get no {{ $labels.series }}",
                  "No {{ $labels.series }} for 15 minutes: the HorizontalPodAutoscaler that "
                  "scales on it holds its replica count whatever the load. Check that "
                  "Prometheus scrapes the gateway and Triton pods (ServiceMonitor labels, "
                  "NetworkPolicy) and loads the tierdet rules; a first start that is still "
                  "building TensorRT engines also has no Triton series yet.",
                  signals=SCALING_SERIES),
            Alert("TierdetGatewayErrors",
                  "(sum(rate(tierdet_requests_total"
                  f"{failed}[5m])) or vector(0))\n"
                  f"/\nclamp_min(sum(rate(tierdet_requests_total{gw}[5m])), 1e-6)\n"
                  f"> {t.threshold('errorRatioAlert')}", "10m", "page",
                  "Detect requests are failing",
                  "{{ $value | humanizePercentage }} of detect requests end in an error or a "
                  "timeout.", signals=(f"sum(rate(tierdet_requests_total{gw}[5m]))",)),
            Alert("TierdetAPDrop",
                  f"(tierdet_model_ap_previous{ap} - "
                  f"tierdet_model_ap{ap}) > 0.02", None, "ticket",
                  "{{ $labels.model }} on {{ $labels.dataset }}: AP fell by "
                  "{{ $value | printf \"%.3f\" }} since the previous evaluation",
                  signals=(f"tierdet_model_ap_previous{ap}",)),
            # A model's live accuracy falls against its own recent level: a broken
            # rebuild, a swapped graph, a changed camera feed. Only on enough
            # scored images; each model against itself (levels differ by model).
            Alert("TierdetShadowAgreementDrop",
                  f"{SHADOW_RECORD}\n  < {SHADOW_DROP_RATIO} * avg_over_time({SHADOW_RECORD}[1d])\n"
                  "and on (tier, model)\n  sum by (tier, model) "
                  f"(increase(tierdet_shadow_samples_total{scored}[1h])) >= {SHADOW_MIN_SAMPLES}",
                  "15m", "ticket",
                  "{{ $labels.model }} ({{ $labels.tier }}): live agreement with the reference "
                  "fell to {{ $value | printf \"%.3f\" }}",
                  "Shadow scoring's agreement of {{ $labels.model }} with the most accurate "
                  "model of its label set over the last hour is below "
                  f"{SHADOW_DROP_RATIO:.0%} of its average over the last day. Check a new "
                  "build or card of it (preprocessing flags), and the input images."),
        ]),
    ]


def _as_dict(rule: Record | Alert, escape: Callable[[str], str]) -> dict[str, Any]:
    if isinstance(rule, Record):
        return {"record": rule.record, "expr": rule.expr}
    out: dict[str, Any] = {"alert": rule.alert, "expr": rule.expr}
    if rule.for_:
        out["for"] = rule.for_
    out["labels"] = {"severity": rule.severity}
    out["annotations"] = {"summary": escape(rule.summary)}
    if rule.description:
        out["annotations"]["description"] = escape(rule.description)
    return out


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Block style for anything multi-line or templated: Helm's and Prometheus'
    # braces and quotes then need no YAML escaping.
    style = "|" if "\n" in value or "{{" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def _dump(target: Target, escape: Callable[[str], str] = lambda s: s) -> str:
    body = {"groups": [{"name": name, "rules": [_as_dict(r, escape) for r in rules]}
                       for name, rules in groups(target)]}
    return yaml.dump(body, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def _values() -> dict[str, Any]:
    return yaml.safe_load(HELM_VALUES.read_text())["monitoring"]["prometheusRule"]


COMPOSE = Target(gateway="", triton='job="triton"', namespace="",
                 threshold=lambda name: str(_values()[name]))
HELM = Target(gateway="{{- $gateway -}}", triton="{{- $triton -}}", namespace="{{- $sel -}}",
              threshold=lambda name: f'{{{{ include "tierdet.envValue" $pr.{name} }}}}', pad=" ")


def compose_rules() -> str:
    return ("# Generated by `tierdet generate` from tierdet/artifacts/rules.py; do not edit.\n"
            "# Recording and alerting rules for docker compose; the Helm chart's\n"
            "# PrometheusRule is rendered from the same definitions. Unit-tested by\n"
            "# `promtool test rules` (../tests); every input runs against a real\n"
            "# Prometheus in CI.\n" + _dump(COMPOSE))


def _helm_escape(text: str) -> str:
    """Prometheus templates in annotations, passed through Helm verbatim."""
    return re.sub(r"\{\{.*?\}\}", lambda m: "{{ `" + m.group(0) + "` }}", text)


_HELM_HEAD = """\
{{/* Generated by `tierdet generate` from tierdet/artifacts/rules.py; do not edit. */}}
{{- $pr := .Values.monitoring.prometheusRule -}}
{{- if $pr.enabled }}
{{- $sel := printf "namespace=%q" .Release.Namespace -}}
{{- $triton := printf "%s, service=%q" $sel (include "tierdet.component" (list . "triton")) -}}
{{- $gateway := printf "%s, service=%q" $sel (include "tierdet.component" (list . "gateway")) -}}
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: {{ include "tierdet.fullname" . }}
  labels:
    {{- include "tierdet.labels" . | nindent 4 }}
    {{- with $pr.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
"""


def helm_rules() -> str:
    body = "".join("  " + line + "\n" for line in _dump(HELM, _helm_escape).splitlines())
    return _HELM_HEAD + body + "{{- end }}\n"


def signals(target: Target = COMPOSE) -> list[tuple[str, str]]:
    """(rule name, query) that must return data on an exercised system: every
    recording rule's expression (but those that need more, ``Record.needs``)
    and every alert's inputs."""
    out = []
    for _, rules in groups(target):
        for rule in rules:
            if isinstance(rule, Record):
                if not rule.needs:
                    out.append((rule.record, rule.expr))
            else:
                out.extend((rule.alert, s) for s in rule.signals)
    return out


def files() -> dict[Path, str]:
    return {COMPOSE_RULES: compose_rules(), HELM_RULES: helm_rules()}
