"""Gateway settings: defaults, overridable by ``TIERDET_*`` environment variables.

The same names are used by ``tierdet up``/``serve`` flags, docker-compose
and the Helm chart, so there is one way to configure the service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

ENV_PREFIX = "TIERDET_"


class Settings(BaseModel):
    model_config = {"frozen": True}

    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    # Triton's gRPC endpoint (host:port).
    triton_url: str = "127.0.0.1:8001"
    # Models the gateway serves; empty: every model Triton has ready.
    models: tuple[str, ...] = ()
    # Model cards (YAML) of models served beside the zoo (`tierdet up --card`).
    cards: tuple[Path, ...] = ()
    # Rank every model by its published AP whatever its weights: for routing
    # tests and benchmarks on random weights (by default those rank 0).
    pin_published_ap: bool = False
    # Routing: tiers file (YAML; built-in realtime/balanced/accurate when
    # unset), the tier for requests that name neither tier, budget nor model,
    # and the measured latency profile (`tierdet profile`).
    tiers_file: Path | None = None
    default_tier: str = "balanced"
    profile_file: Path | None = None
    # A model is chosen only if predicted * (1 + frac) + ms fits the budget.
    route_margin_frac: float = Field(0.15, ge=0.0, le=2.0)
    route_margin_ms: float = Field(5.0, ge=0.0)
    default_score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    # Limits applied before any decoding work.
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    # Budget for requests pinned to a model without a budget, and the bound
    # on a degraded answer.
    request_timeout_s: float = Field(10.0, gt=0)
    # Evaluation records written by `tierdet eval`, exported as AP gauges.
    eval_dir: Path | None = None
    # Security: API keys as sha256 hashes (YAML, see README); TLS for both
    # listeners when a certificate and key are given.
    api_keys_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Requests (HTTP) and calls (gRPC) served at once; beyond it HTTP answers
    # 503 and gRPC RESOURCE_EXHAUSTED, so memory stays bounded under overload.
    max_concurrency: int = Field(256, ge=1)
    # Images in one POST /v1/detect/batch; each is still bound by
    # max_image_bytes, so a batch holds at most this many times that.
    batch_max_images: int = Field(16, ge=1, le=256)
    # Images of one batch sent to the router at once: enough to fill Triton's
    # dynamic batches, few enough that one batch cannot crowd out other clients.
    batch_concurrency: int = Field(4, ge=1, le=64)
    # Frames one DetectStream holds (read, not yet answered). At the bound the
    # server stops reading, so gRPC flow control pushes back on the sender.
    stream_max_inflight: int = Field(4, ge=1, le=64)
    log_level: str = "info"

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
            if raw is None:
                continue
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
