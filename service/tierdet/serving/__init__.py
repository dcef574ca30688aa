"""The gateway's core: everything between a validated request and its answer.

``usecase.Detector`` is the one entry: it admits a caller (API key, rate
limit), validates the request (``validation``: the grant, tier, budget,
candidates and class filters, once), sheds what cannot finish in time, takes
an image slot (``slots``: shared between keys, the wait bounded by the
budget), decodes (``decoding``; ``headers`` reads each format's size, depth and
decoder buffers first), routes (``routing``, the decision rule; ``tiers``,
``latency`` the latency model, ``governor`` and ``calibration`` what it
weighs), prepares the tensor (``imaging``, ``tiling``; ``tile_budget`` how many tiles
the budget leaves room for), infers (``infer``: deadline, priority and
failover; ``turns`` one model's work at a time on a CPU device; ``backend`` is
the protocol, ``triton`` the real one, ``shm`` its shared-memory regions,
``pool`` the Triton endpoints and their queues) and maps the rows back
(``postprocess``); ``outcome`` is how each image went. After the answer,
``shadow`` re-runs a sample on the most accurate model of the same label set,
when its device is idle, and scores the answer against it (``apscore``: COCO
AP, the same code as ``tierdet eval``). ``catalog``
keeps what the gateway knows of each model, ``changes`` adds, replaces and
retires models while serving (the admin API; ``card_intake`` checks the cards
it is sent, ``canary`` stages replacements and judges them); ``access`` the request ids and
the access log, ``tracing`` the OpenTelemetry spans, ``memory`` the bound on
what a gateway holds; ``metrics``, ``security``, ``settings`` and ``render``
are what their names say.

May import: ``tierdet.contract``, ``tierdet.registry``, numpy, OpenCV,
simplejpeg, tritonclient, httpx (Triton's metrics page), prometheus-client,
opentelemetry (``tracing``), pycocotools (``apscore``).
Never fastapi, starlette or grpc: the front ends own the transports.

Importing this package sets OpenCV's own pixel limit, the backstop behind the
header checks in ``decoding``: OpenCV reads it once, when ``cv2`` is loaded,
and every module that imports cv2 in the gateway is in this package, so this
runs first.
"""

import os

from tierdet.serving.settings import ENV_PREFIX, Settings

OPENCV_LIMIT = "OPENCV_IO_MAX_IMAGE_PIXELS"


def _pixel_limit() -> str:
    """``TIERDET_MAX_IMAGE_PIXELS``, or its default where unset (a value that is
    not a number stops the gateway when its settings are read)."""
    raw = os.environ.get(ENV_PREFIX + "MAX_IMAGE_PIXELS", "").strip()
    return raw if raw.isdigit() else str(Settings.model_fields["max_image_pixels"].default)


os.environ[OPENCV_LIMIT] = _pixel_limit()
