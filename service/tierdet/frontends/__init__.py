"""The transports: HTTP (FastAPI) and gRPC, and the process that serves both.

Each front end only translates its wire format into the contract's types,
calls ``tierdet.serving.usecase.Detector`` and translates the answer back:
``http_requests`` parses bodies (multipart, JSON, raw image) into options,
``http_api`` holds the routes, ``batch`` the multi-image endpoint,
``grpc_api`` the Detector service (``streaming`` bounds DetectStream),
``middleware`` refuses oversized bodies (and reads what is left of a
refused body, so that its answer arrives), ``errors`` is the one mapping of an
``ApiError`` to an HTTP response and a gRPC status, ``grpc_context`` what every
gRPC method reads from its call, ``server`` runs it all (``workers``
supervises several ``worker`` processes on the same ports). The Open Inference Protocol (KServe v2):
``v2_http`` (REST under /v2), ``v2_grpc`` (inference.GRPCInferenceService),
``v2_models`` (the models they offer, through the same ``Detector``) and
``v2_tensors`` (tensors and parameters <-> the contract, transport-free).

May import: ``tierdet.serving``, ``tierdet.contract``, ``tierdet.registry``,
fastapi, starlette, uvicorn, grpc, and tritonclient's generated v2 gRPC
modules (``tritonclient.grpc.service_pb2``: no second copy of the proto).
"""
