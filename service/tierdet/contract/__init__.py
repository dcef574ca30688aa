"""The public contract of the service: what a client may send and what it gets back.

- ``options``: the request options, defined once (every surface derives from them);
- ``results``: the answers, as plain dataclasses shared by the gateway and the client;
- ``errors``: the stable error codes with their HTTP and gRPC statuses;
- ``images``: an image sent as raw pixels instead of encoded bytes;
- ``wire``: the one mapping of options and results to text fields and protobuf.

May import: the standard library, pydantic and the generated ``tierdet.proto``
messages. Never grpc, fastapi, numpy or any other tierdet package: the client
and every front end stand on this one.
"""
