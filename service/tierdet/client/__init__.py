"""Python client for the tierdet gateway: HTTP or gRPC, sync or async.

    from tierdet.client import Client

    with Client("http://127.0.0.1:8080") as client:
        result = client.detect("photo.jpg", tier="realtime")
        for d in result.detections:
            print(d.class_name, d.score, d.box)

``Client``/``AsyncClient`` speak HTTP (detect, render, batch, models, tiers);
``GrpcClient``/``AsyncGrpcClient`` speak gRPC (detect, frame streams, models,
tiers). Keyword options are the request options of
``tierdet.contract.options.DetectOptions`` (tier, sla_ms, model,
score_threshold, max_detections, classes), checked before anything is sent.
Results are the contract's dataclasses; every refusal is a ``TierdetError``
carrying the server's stable error code. Answers that say "come back later"
(HTTP 503 or 429 with ``Retry-After``; gRPC with ``retry-after`` metadata) are
retried, a bounded number of times for a bounded wait (``RetryPolicy``).
``api_key`` is sent as ``Authorization: Bearer``.

Private modules: ``_calls`` (the one request builder), ``_retry`` (the one
retry policy), ``_http`` and ``_grpc`` (the I/O), ``_errors``. May import:
``tierdet.contract`` and ``tierdet.proto`` only (plus httpx, grpcio,
pydantic): the client needs none of the gateway.
"""

from tierdet.client._calls import Frame, ImageInput
from tierdet.client._errors import CONNECTION_FAILED, TierdetError
from tierdet.client._grpc import DEFAULT_GRPC_TARGET, AsyncGrpcClient, GrpcClient
from tierdet.client._http import DEFAULT_URL, AsyncClient, Client
from tierdet.client._retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy
from tierdet.contract.results import (
    BatchItem,
    Detection,
    DetectResult,
    ErrorInfo,
    FrameResult,
    ModelInfo,
    ModelsInfo,
    Routing,
    TierInfo,
    Timing,
)

__all__ = [
    "CONNECTION_FAILED",
    "DEFAULT_GRPC_TARGET",
    "DEFAULT_RETRY",
    "DEFAULT_URL",
    "NO_RETRY",
    "AsyncClient",
    "AsyncGrpcClient",
    "BatchItem",
    "Client",
    "DetectResult",
    "Detection",
    "ErrorInfo",
    "Frame",
    "FrameResult",
    "GrpcClient",
    "ImageInput",
    "ModelInfo",
    "ModelsInfo",
    "RetryPolicy",
    "Routing",
    "TierInfo",
    "TierdetError",
    "Timing",
]
