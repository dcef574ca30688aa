"""Gateway settings: defaults, overridable by ``TIERDET_*`` environment variables.

The same names are used by ``tierdet up``/``serve`` flags, docker-compose
and the Helm chart, so there is one way to configure the service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from tierdet.serving.governor import LoadGovernor
from tierdet.serving.pool import parse_targets

ENV_PREFIX = "TIERDET_"


class Settings(BaseModel):
    """Every setting of the gateway; ``description`` is what the configuration
    table (docs/configuration.md, written by ``tierdet generate``) says of it."""

    model_config = {"frozen": True}

    http_host: str = Field("127.0.0.1", description="HTTP listener address")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP listener port")
    grpc_host: str = Field("127.0.0.1", description="gRPC listener address")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC listener port")
    triton_url: str = Field("127.0.0.1:8001", description=(
        "Triton's gRPC endpoints: comma-separated `host:port` (`?metrics=PORT` where its "
        "metrics port is not `TIERDET_TRITON_METRICS_PORT`), and/or `dns:///name:port`, "
        "re-resolved to every address the name has (a headless Service: every Triton pod)"))
    triton_metrics_port: int = Field(8002, ge=0, le=65535, description=(
        "port of each Triton's metrics page, read for its queue (every gateway's work); "
        "0: route on this gateway's own work only"))
    triton_queue_poll_ms: float = Field(50.0, ge=10.0, description=(
        "how often each Triton's queue is read"))
    triton_resolve_s: float = Field(5.0, gt=0, description=(
        "how often `dns:///` endpoints are re-resolved (pods joining and leaving)"))
    triton_keepalive_ms: int = Field(10_000, ge=0, description=(
        "gRPC keep-alive ping interval while a call to Triton is open (a vanished Triton "
        "fails the call within it + 2 s); 0: no pings"))
    triton_shared_memory: bool = Field(True, description=(
        "send pixels through system shared memory when Triton can map the gateway's (same "
        "host or pod, a shared /dev/shm); otherwise, and when false, over gRPC"))
    models: tuple[str, ...] = Field(
        (), description="comma-separated models to serve; empty: every model Triton has ready")
    cards: tuple[Path, ...] = Field(
        (), description="comma-separated model cards (YAML) of models served beside the zoo "
                        "(`tierdet up --card`)")
    cards_dir: Path | None = Field(None, description=(
        "the cards folder: the admin API (`PUT /admin/models/NAME`) reads a card's graph only "
        "from here (paths relative to it); unset: models cannot be added while serving"))
    cards_watch: Path | None = Field(None, description=(
        "a folder of cards served while they are in it (usually inside the cards folder): "
        "a card file that appears is added, one that changes replaced, one that goes retired, "
        "as through the admin API; needs `TIERDET_CARDS_DIR`, `TIERDET_HOME` and one worker"))
    cards_watch_s: float = Field(5.0, gt=0, description=(
        "how often the `TIERDET_CARDS_WATCH` folder is read"))
    home: Path | None = Field(None, description=(
        "the model home (`tierdet build --home`): the admin API builds cards into it and "
        "installs them into `HOME/repository/TARGET`, the folder Triton serves"))
    model_target: Literal["cpu-local", "cpu"] = Field("cpu-local", description=(
        "the repository flavour the admin API installs into (`tierdet build --target`)"))
    pin_published_ap: bool = Field(
        False, description="rank every model by its published AP whatever its weights (for "
                           "routing tests and benchmarks on random weights, which rank 0)")
    default_label_set: str = Field("coco", min_length=1, description=(
        "the label set a request goes to when models of several could answer it (their "
        "APs do not compare); coco: the zoo's"))
    tiers_file: Path | None = Field(
        None, description="YAML: `{default: balanced, tiers: {name: {budget_ms, models, "
                          "degrade, priority}}}`; unset: the built-in tiers")
    default_tier: str = Field("balanced", description="tier for requests with no tier, budget "
                                                      "or model")
    profile_file: Path | None = Field(
        None, description="latency profile from `tierdet profile` (`tierdet up`: "
                          "`$TIERDET_HOME/profile.json`)")
    route_margin_frac: float = Field(0.15, ge=0.0, le=2.0, description=(
        "a model is chosen only if predicted * (1 + frac) + ms fits the budget"))
    route_margin_ms: float = Field(5.0, ge=0.0, description="see `TIERDET_ROUTE_MARGIN_FRAC`")
    device_turns: bool = Field(False, description=(
        "send each Triton one model's work at a time (a CPU device: two models' "
        "executions at once share its cores and both run late); others wait in the gateway"))
    route_shared_device: bool = Field(False, description=(
        "predict each model's device time stretched by the share of the device that "
        "other models' recent work takes (they run beside it on a CPU): "
        "(backlog + service) / (1 - share)"))
    route_utilization_target: float = Field(LoadGovernor.target, gt=0.0, le=1.0, description=(
        "the share of the device the router lets upgrades fill: a bigger model is chosen "
        "only while the arrival rate x the mean device time per request, plus other "
        "gateways' work at the same Triton servers, stays under it"))
    route_calibrate_quantile: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "scale predictions by this quantile of actual / predicted time (at least 1.0) "
        "over the last 400 requests admitted near their budget (predicted at least half "
        "of it), once 50 are seen, instead of 1 + `TIERDET_ROUTE_MARGIN_FRAC` (e.g. 0.95); "
        "0: the fixed margin only"))
    default_score_threshold: float = Field(0.25, ge=0.0, le=1.0, description=(
        "score threshold of requests that give none"))
    calibrated_scores: bool = Field(True, description=(
        "answer each detection's estimated precision as its score (from its card's "
        "`score_calibration`; thresholds apply to it), so scores mean the same on every "
        "model; false: the model's own scores"))
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description=(
        "largest image accepted, in bytes (refused before decoding)"))
    max_image_pixels: int = Field(40_000_000, gt=0, description=(
        "largest image accepted, in pixels (refused from its header)"))
    decode_scale: Literal["reduced", "full"] = Field("reduced", description=(
        "`reduced`: decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that still "
        "covers the input of every model the request may go to; `full`: always every pixel"))
    request_timeout_s: float = Field(10.0, gt=0, description=(
        "budget of a pinned model without `sla_ms`; bound on a degraded answer"))
    eval_dir: Path | None = Field(None, description=(
        "folder of `tierdet eval --out` report files, exported as AP gauges and `measured_ap`"))
    api_keys_file: Path | None = Field(None, description=(
        "API keys as sha256 hashes (YAML, see Security); unset: open"))
    failed_key_limit: int = Field(10, ge=0, description=(
        "failed API-key attempts one source address may make in a minute; beyond it the "
        "address gets 429 `rate_limited` (a right key too) until a minute after its oldest "
        "failure; 0: no throttle"))
    admin_key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description=(
        "sha256 of the admin credential (sent as `X-Admin-Key`; never an API key): only "
        "with it do `/v1/models` show server paths and load errors and `/metrics` Triton's "
        "addresses; unset: nobody sees them"))
    triton_api_key: str | None = Field(None, description=(
        "the key Triton's restricted APIs (model control, config, shared memory, "
        "statistics) want in the `tierdet-admin` header (gRPC: "
        "`triton-grpc-protocol-tierdet-admin`): the gateway sends it on its own calls "
        "(`tierdet up` makes one; the chart and compose take it from a secret)"))
    docs_enabled: bool = Field(False, description=(
        "serve the interactive API docs (`/docs`, `/redoc`: their scripts come from a CDN); "
        "the OpenAPI document (`/openapi.json`) is served either way"))
    header_timeout_s: float = Field(10.0, gt=0, description=(
        "an HTTP connection must send a whole request head within this, from when it opens "
        "or its last answer ends; else it is closed"))
    body_timeout_s: float = Field(30.0, gt=0, description=(
        "an HTTP request body must arrive in full within this, from the end of its head; "
        "else 408 `request_timeout`"))
    stream_idle_s: float = Field(30.0, gt=0, description=(
        "a DetectStream that sends no frame for this long is ended with DEADLINE_EXCEEDED "
        "`request_timeout`"))
    tls_cert_file: Path | None = Field(None, description="TLS certificate for HTTP and gRPC")
    tls_key_file: Path | None = Field(None, description="its private key")
    max_concurrency: int = Field(256, ge=1, description=(
        "requests and gRPC calls served at once (split evenly among the workers); beyond it HTTP "
        "answers 503 `overloaded` before reading the body and gRPC RESOURCE_EXHAUSTED, so "
        "memory stays bounded under overload (probes and /metrics always answer)"))
    image_slots: int = Field(0, ge=0, le=256, description=(
        "decoded images one worker holds at once, from decoding to the letterbox (each up "
        "to three copies of 3 bytes a pixel of `TIERDET_MAX_IMAGE_PIXELS`); others wait their "
        "turn; 0: the "
        "worker's share of the cores it may use"))
    workers: int = Field(1, ge=1, le=64, description=(
        "gateway processes sharing the HTTP and gRPC ports (each decodes on its own core; "
        "they share metrics, rate limits and, through Triton's queue, the router's view "
        "of the device): about one per core the gateway has"))
    batch_max_images: int = Field(16, ge=1, le=256, description=(
        "images in one `POST /v1/detect/batch` (each still bound by the image limits)"))
    batch_concurrency: int = Field(4, ge=1, le=64, description=(
        "images of one batch routed at once: enough to fill Triton's batches, few enough "
        "not to crowd out other clients"))
    stream_max_inflight: int = Field(4, ge=1, le=64, description=(
        "frames one DetectStream holds (read, not yet answered); at the bound the gateway "
        "stops reading, so flow control pushes back on the sender"))
    shadow_sample: float = Field(0.02, ge=0.0, le=1.0, description=(
        "share of answered requests re-run, after the answer, on the most accurate ready "
        "model of the same label set (the reference) to score the answer against it "
        "(`tierdet_shadow_agreement`; see Shadow scoring); 0: off"))
    shadow_score_threshold: float = Field(0.3, gt=0.0, le=1.0, description=(
        "the reference's detections at or above this score are the pseudo-labels an "
        "answer is scored against"))
    shadow_window: int = Field(200, ge=1, le=100_000, description=(
        "scored images per tier and model the agreement is the mean of (a sliding window)"))
    shadow_queue: int = Field(4, ge=1, le=64, description=(
        "sampled requests waiting for the shadow worker (each holds its encoded image); "
        "beyond it a sample is dropped"))
    canary_min_samples: int = Field(200, ge=1, le=100_000, description=(
        "images a canary and the model it would replace must both have answered, each "
        "scored against the same reference, before the rule decides (see Canaries)"))
    canary_max_agreement_drop: float = Field(0.0, ge=0.0, le=1.0, description=(
        "a canary whose shadow agreement is below the old model's on the same images by "
        "more than this on average, beyond two standard errors of the pairs, is rolled "
        "back (0: any drop the pairs can tell from noise)"))
    canary_max_p99_ratio: float = Field(1.2, ge=1.0, le=100.0, description=(
        "a canary whose answers' p99 is above the old model's times this is rolled back"))
    log_level: str = Field("info", description="uvicorn's log level")
    access_log: str = Field("off", description=(
        "one JSON line per image and per refused call (request id, key name, tier, budget, "
        "model, endpoint, outcome, latency, image size): `stderr`, a file path, or `off` "
        "(the gateway image sets `stderr`)"))

    @field_validator("triton_url")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        parse_targets(value, 0)  # a malformed entry stops the gateway at start, named
        return value

    def worker_concurrency(self) -> int:
        """Each worker's share of ``max_concurrency`` (the kernel spreads connections
        over workers, so each holds its part of the bound)."""
        return -(-self.max_concurrency // self.workers)

    def max_body_bytes(self, images: int = 1) -> int:
        """The largest HTTP body a valid request of ``images`` images can have: each
        image base64-encoded (4/3 of its bytes, in JSON) plus room for the
        other fields. The one formula for every HTTP endpoint's limit."""
        return images * (self.max_image_bytes * 4 // 3 + 64 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``TIERDET_<FIELD>`` variables; ``overrides`` win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or (raw == "" and cls.model_fields[name].default is None):
                continue  # an empty variable leaves a setting that may be unset unset
            listed = name in ("models", "cards")
            values[name] = tuple(m for m in raw.split(",") if m) if listed else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class ConfigError(RuntimeError):
    pass


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{exc}") from None
