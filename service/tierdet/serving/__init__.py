"""The gateway's core: everything between a validated request and its answer.

``usecase.Detector`` is the one entry: it admits a caller (API key, rate
limit), authorizes the request, sheds what cannot finish in time, decodes
(``decoding``), routes (``routing``), prepares the tensor (``imaging``),
calls the backend (``backend``; ``triton`` is the real one, ``shm`` its
shared-memory regions; ``pool`` the Triton endpoints and their queues) and
maps the rows back (``postprocess``). ``catalog``
keeps what the gateway knows of each model; ``access`` the request ids and
the access log, ``tracing`` the OpenTelemetry spans, ``memory`` the bound on
what a gateway holds; ``metrics``, ``security``, ``settings`` and ``render``
are what their names say.

May import: ``tierdet.contract``, ``tierdet.registry``, numpy, OpenCV,
simplejpeg, tritonclient, httpx (Triton's metrics page), prometheus-client,
opentelemetry (``tracing``).
Never fastapi, starlette or grpc: the front ends own the transports.
"""
