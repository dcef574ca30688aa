"""Bounds on the multi-image front ends: HTTP batches and gRPC frame streams.

Read from ``TIERDET_*`` variables like the gateway's other settings. They
live apart from ``config.Settings`` only because that model belongs to the
core gateway; the names and the env convention are the same.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierdet.config import ENV_PREFIX, ConfigError


class FrontendLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    # Images in one POST /v1/detect/batch; each is still bound by
    # TIERDET_MAX_IMAGE_BYTES, so a batch holds at most this many times that.
    batch_max_images: int = Field(16, ge=1, le=256)
    # Images of one batch sent to the router at once: enough to fill Triton's
    # dynamic batches, few enough that one batch cannot crowd out other clients.
    batch_concurrency: int = Field(4, ge=1, le=64)
    # Frames one DetectStream holds (read, not yet answered). At the bound the
    # server stops reading, so gRPC flow control pushes back on the sender.
    stream_max_inflight: int = Field(4, ge=1, le=64)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FrontendLimits:
        env = dict(os.environ if env is None else env)
        values = {name: env[ENV_PREFIX + name.upper()] for name in cls.model_fields
                  if ENV_PREFIX + name.upper() in env}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration:\n{exc}") from None
