"""Generated protobuf / gRPC stubs for jaxspec.v1 (regenerate with ``python tools/gen_protos.py``)."""

from serving.pb import jaxspec_pb2, jaxspec_pb2_grpc

SERVICE_NAME = jaxspec_pb2.DESCRIPTOR.services_by_name["JaxSpec"].full_name  # "jaxspec.v1.JaxSpec"

__all__ = ["SERVICE_NAME", "jaxspec_pb2", "jaxspec_pb2_grpc"]
