"""The transports: HTTP (FastAPI) and gRPC, and the process that serves both.

Each front end only translates its wire format into the contract's types,
calls ``tierdet.serving.usecase.Detector`` and translates the answer back:
``http_requests`` parses bodies (multipart, JSON, raw image) into options,
``http_api`` holds the routes, ``batch`` the multi-image endpoint,
``grpc_api`` the Detector service (``streaming`` bounds DetectStream),
``middleware`` refuses oversized bodies (and reads what is left of a
refused body, so that its answer arrives), ``errors`` is the one mapping of an
``ApiError`` to an HTTP response and a gRPC status, ``server`` runs it all
(``workers``: in several processes on the same ports).

May import: ``tierdet.serving``, ``tierdet.contract``, ``tierdet.registry``,
fastapi, starlette, uvicorn, grpc.
"""
