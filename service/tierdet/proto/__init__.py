"""The wire messages of the gRPC API, generated from ``protos/detection.proto`` by
grpcio-tools (``tierdet generate``; drift-tested), with their typing stubs.

May import: protobuf (``google.protobuf``) and grpc only: the contract, the
client and the gRPC front end all stand on it.
"""
