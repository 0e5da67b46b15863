"""Protobuf messages and gRPC stubs of the food-delivery platform, generated from .proto files."""
