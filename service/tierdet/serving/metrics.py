"""Prometheus metrics of the gateway: stable names, low-cardinality labels.

Labels only take values from closed sets: protocol (http, grpc, v2-http,
v2-grpc: ``access.TRANSPORTS``), tier (configured names, "none" for pinned
models and bare budgets, and "invalid" for any other name a caller sent:
``Metrics.tiers`` holds the configured ones, so a caller cannot add series by
inventing tiers), model
(registry names), outcome (ok, bad_input, shed, timeout, error, unauthorized,
rate_limited; a shadow sample's: ``shadow.OUTCOMES``), stage.

With several gateway workers (``TIERDET_WORKERS``) every process writes its
values to files under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode) and a scrape of any worker reads them all: counters and
histograms add up over workers, gauges say how they combine
(``multiprocess_mode``; ignored in a single process).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from tierdet.contract.results import DetectResult
from tierdet.registry.accuracy import EvalRecord, latest_and_previous

# Buckets span a fast GPU answer (ms) to a slow CPU D7 (seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 1.5, 2.5, 5.0, 10.0)
RATIO_BUCKETS = (0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
OUTCOMES = ("ok", "bad_input", "shed", "timeout", "error", "unauthorized", "rate_limited")
NO_TIER = "none"
INVALID_TIER = "invalid"  # the label of every tier name that is not configured
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How a gauge combines over workers: facts every worker reads alike (readiness,
# AP) take the latest write; what each worker holds (requests in flight) adds up.
SAME: Final = "mostrecent"
ADDS_UP: Final = "livesum"
_ENDPOINT_LABEL = re.compile(rb'endpoint="((?:[^"\\]|\\.)*)"')


class TritonBatchCollector(Collector):
    """Executions per batch size, from Triton's statistics API (cumulative).

    Triton's own /metrics has execution and inference counts but not their
    distribution over batch sizes; the gateway polls the statistics and
    re-exports them here so dashboards can show how well batching works.
    """

    def __init__(self) -> None:
        self.executions: dict[str, dict[int, int]] = {}

    def update(self, model: str, batch_stats: Mapping[int, int]) -> None:
        self.executions[model] = dict(batch_stats)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tierdet_triton_batch_executions",
            "Model executions at Triton by batch size (from Triton's statistics API).",
            labels=["model", "batch_size"])
        for model, stats in sorted(self.executions.items()):
            for size, count in sorted(stats.items()):
                family.add_metric([model, str(size)], count)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 tiers: frozenset[str] | None = None) -> None:
        """``tiers``: the configured tier names (None: any name is a label; the
        use case sets them once the tiers are loaded)."""
        self.registry = registry or CollectorRegistry()
        self.tiers = tiers
        r = self.registry
        self.triton_batches = TritonBatchCollector()
        r.register(self.triton_batches)
        ap_labels = ["model", "tier", "dataset", "source", "metric"]
        self.ap = Gauge(
            "tierdet_model_ap", "Measured AP (0..1) of the latest evaluation; source=gateway "
            "is the full serving path, source=onnx the bare model.", ap_labels,
            multiprocess_mode=SAME, registry=r)
        self.ap_previous = Gauge(
            "tierdet_model_ap_previous", "Measured AP of the evaluation before the latest.",
            ap_labels, multiprocess_mode=SAME, registry=r)
        self.ap_time = Gauge(
            "tierdet_model_ap_evaluated_timestamp_seconds", "When the latest evaluation ran.",
            ["model", "tier", "dataset", "source"], multiprocess_mode=SAME, registry=r)
        self.published_ap = Gauge(
            "tierdet_model_published_ap", "Published COCO val2017 AP of the official weights "
            "(percent).", ["model"], multiprocess_mode=SAME, registry=r)
        self.requests = Counter(
            "tierdet_requests", "Detect requests answered, by outcome.",
            ["protocol", "tier", "model", "outcome"], registry=r)
        self.latency = Histogram(
            "tierdet_request_duration_seconds",
            "End-to-end detect latency at the gateway (successful requests).",
            ["protocol", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram(
            "tierdet_stage_duration_seconds",
            "Time spent in each stage of a detect request.",
            ["stage", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.slo = Counter(
            "tierdet_slo_requests", "Requests with a budget, by whether the answer met it "
            "(shed and failed requests count as missed).", ["tier", "result"], registry=r)
        self.degraded = Counter(
            "tierdet_degraded", "Answers served late by the fastest model (tier allows it).",
            ["tier", "model"], registry=r)
        self.prediction_ratio = Histogram(
            "tierdet_latency_prediction_ratio",
            "Actual / predicted end-to-end latency of routed requests.", ["model"],
            buckets=RATIO_BUCKETS, registry=r)
        self.inflight = Gauge(
            "tierdet_inflight_requests", "Detect requests being processed.",
            multiprocess_mode=ADDS_UP, registry=r)
        self.images = Counter(
            "tierdet_images", "Images answered successfully, by model.", ["model"],
            registry=r)
        self.model_ready = Gauge(
            "tierdet_model_ready", "1 if Triton reports the model ready.", ["model"],
            multiprocess_mode=SAME, registry=r)
        self.triton_up = Gauge(
            "tierdet_triton_up", "1 if the gateway can reach a Triton endpoint.",
            multiprocess_mode=SAME, registry=r)
        self.route_factor = Gauge(
            "tierdet_route_calibration_factor", "What predictions are scaled by before they "
            "are compared with a budget (learned from actual / predicted times; with workers, "
            "the largest).", multiprocess_mode="livemax", registry=r)
        self.triton_endpoint_up = Gauge(
            "tierdet_triton_endpoint_up", "1 if the Triton endpoint is in the gateway's pool.",
            ["endpoint"], multiprocess_mode=SAME, registry=r)
        self.triton_queued = Gauge(
            "tierdet_triton_queued_requests", "Requests waiting in Triton's schedulers for "
            "each model (every endpoint, every client), as the router last read them.",
            ["model"], multiprocess_mode=SAME, registry=r)
        self.route_service = Gauge(
            "tierdet_route_service_seconds", "The router's estimate of one request's device "
            "time at batch 1 for each model on each Triton endpoint (its profile, corrected "
            "by what the router read of that device), as of the last queue read.",
            ["model", "endpoint"], multiprocess_mode=SAME, registry=r)
        self._route_shown: set[tuple[str, str]] = set()
        self.triton_requests = Counter(
            "tierdet_triton_requests", "Calls to each Triton endpoint, by outcome "
            "(ok, unavailable: it left the pool and the call went elsewhere or failed, error).",
            ["endpoint", "outcome"], registry=r)
        # Shadow scoring (serving.shadow): each worker keeps its own windows;
        # the latest write of any worker is shown.
        self.shadow_agreement = Gauge(
            "tierdet_shadow_agreement", "AP (0..1) of the answers of each tier and model "
            "against the reference model's detections (label-free; the mean over the "
            "window of scored images).", ["tier", "model"], multiprocess_mode=SAME,
            registry=r)
        self.shadow_window = Gauge(
            "tierdet_shadow_window_images", "Scored images in the agreement's window.",
            ["tier", "model"], multiprocess_mode=SAME, registry=r)
        self.shadow_samples = Counter(
            "tierdet_shadow_samples", "Answered requests sampled for shadow scoring, and "
            "what became of each sample (scored, or why not).", ["tier", "model", "outcome"],
            registry=r)
        self.canary_decisions = Counter(
            "tierdet_canary_decisions", "Decisions on canaries (serving.canary): promote or "
            "rollback, by the rule or an operator.", ["model", "decision", "by"], registry=r)

    def exposition(self, alias_key: bytes | None = None) -> bytes:
        """The text a scrape gets: this process's registry, or with workers every
        worker's values (and this process's Triton batch statistics, which every
        worker polls alike). ``alias_key``: Triton's addresses (the ``endpoint``
        label) are shown as a keyed hash of themselves (stable, so per-endpoint
        series and alerts still work, but no address); None: as they are."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            text = generate_latest(self.registry)
        else:
            merged = CollectorRegistry()
            MultiProcessCollector(merged, directory)
            merged.register(self.triton_batches)
            text = generate_latest(merged)
        if alias_key is None:
            return text
        return _ENDPOINT_LABEL.sub(lambda m: b'endpoint="triton-' + hmac.new(
            alias_key, m.group(1), hashlib.sha256).hexdigest()[:12].encode() + b'"', text)

    def set_accuracy(self, records: list[EvalRecord]) -> None:
        for (model, tier, dataset, source), (latest, previous) in \
                latest_and_previous(records).items():
            before = previous.metrics() if previous is not None else {}
            for metric, value in latest.metrics().items():
                self.ap.labels(model, tier, dataset, source, metric).set(value)
                if metric in before:
                    self.ap_previous.labels(model, tier, dataset, source, metric).set(
                        before[metric])
            self.ap_time.labels(model, tier, dataset, source).set(latest.timestamp)

    def observe_queues(self, pending: dict[str, int],
                       service_ms: dict[tuple[str, str], float]) -> None:
        """Triton's queues per model, and the router's service estimate per (model,
        endpoint) read with them."""
        for model, count in pending.items():
            self.triton_queued.labels(model).set(count)
        for (model, endpoint), ms in service_ms.items():
            self.route_service.labels(model, endpoint).set(ms / 1e3)
            self._route_shown.add((model, endpoint))

    def drop_route_service(self, model: str | None = None, endpoint: str | None = None) -> None:
        """The estimates of a retired model, or of an endpoint that left, go."""
        for labels in [k for k in self._route_shown
                       if model in (None, k[0]) and endpoint in (None, k[1])]:
            self._route_shown.discard(labels)
            self.route_service.remove(*labels)

    def observe_ok(self, protocol: str, tier: str | None, model: str, total_s: float,
                   stages: dict[str, float], in_slo: bool, predicted_s: float) -> None:
        tier = self.tier_label(tier)
        self.requests.labels(protocol, tier, model, "ok").inc()
        self.latency.labels(protocol, model).observe(total_s)
        self.images.labels(model).inc()
        self.slo.labels(tier, "met" if in_slo else "missed").inc()
        if predicted_s > 0:
            self.prediction_ratio.labels(model).observe(total_s / predicted_s)
        for stage, seconds in stages.items():
            self.stage.labels(stage, model).observe(seconds)

    def observe_result(self, protocol: str, result: DetectResult) -> None:
        """An answered image: its outcome, latency, stages and SLO."""
        t, r = result.timing, result.routing
        stages = {"decode": t.decode_ms / 1e3, "preprocess": t.preprocess_ms / 1e3,
                  "infer": t.infer_ms / 1e3, "postprocess": t.postprocess_ms / 1e3}
        in_slo = t.total_ms <= r.budget_ms and not r.degraded
        self.observe_ok(protocol, r.tier, result.model, t.total_ms / 1e3, stages,
                                in_slo, r.predicted_ms / 1e3)
        if r.degraded:
            self.degraded.labels(r.tier or "none", result.model).inc()

    def observe_failure(self, protocol: str, tier: str | None, model: str, outcome: str) -> None:
        tier = self.tier_label(tier)
        self.requests.labels(protocol, tier, model, outcome).inc()
        if outcome in ("shed", "timeout", "error"):
            self.slo.labels(tier, "missed").inc()

    def observe_shadow(self, tier: str | None, model: str, outcome: str) -> None:
        """One shadow sample's outcome (``shadow.OUTCOMES``)."""
        self.shadow_samples.labels(self.tier_label(tier), model, outcome).inc()

    def set_agreement(self, tier: str | None, model: str, agreement: float,
                      images: int) -> None:
        tier = self.tier_label(tier)
        self.shadow_agreement.labels(tier, model).set(agreement)
        self.shadow_window.labels(tier, model).set(images)

    def tier_label(self, tier: str | None) -> str:
        """The label of ``tier`` as a caller gave it: never a name that is not
        configured (the request may be refused for it, but counted under one label)."""
        if tier is None:
            return NO_TIER
        return tier if self.tiers is None or tier in self.tiers else INVALID_TIER
