"""Generated protobuf and gRPC code for proto/generate.proto; regenerate with server/generate_proto.py."""

from . import generate_pb2, generate_pb2_grpc

__all__ = ["generate_pb2", "generate_pb2_grpc"]
