"""gRPC serving: the jaxspec.v1 API, server and client."""
