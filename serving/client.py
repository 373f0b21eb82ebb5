"""A synchronous Python client for jaxspec.v1.

    with JaxSpecClient("127.0.0.1:50051") as client:
        for msg in client.generate_stream("Once upon a time", max_tokens=32):
            print(msg.text, end="", flush=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.pb import jaxspec_pb2 as pb
from serving.pb import jaxspec_pb2_grpc as pb_grpc


def build_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    speculation: bool | None = None,
    num_speculative_tokens: int | None = None,
    request_id: str = "",
    skip_prefix_cache: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest; ``None`` leaves a knob unset (the server's default)."""
    req = pb.GenerateRequest(request_id=request_id, skip_prefix_cache=skip_prefix_cache)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                        ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    if max_tokens is not None:
        req.stopping.max_tokens = max_tokens
    req.stopping.stop.extend(stop)
    req.stopping.stop_token_ids.extend(stop_token_ids)
    req.stopping.ignore_eos = ignore_eos
    if speculation is not None:
        req.speculation.enabled = speculation
    if num_speculative_tokens is not None:
        req.speculation.num_speculative_tokens = num_speculative_tokens
    return req


class JaxSpecClient:
    """Blocking client. ``generate*`` take the keyword arguments of ``build_request``."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        auth_token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        server_name_override: str | None = None,
        timeout: float | None = None,
    ):
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        options = [("grpc.ssl_target_name_override", server_name_override)] if server_name_override else []
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.JaxSpecStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        # Sent per call (not as channel credentials) so that it also works on plaintext loopback.
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self.timeout = timeout

    def _kw(self, timeout: float | None) -> dict:
        return {"metadata": self._metadata, "timeout": timeout if timeout is not None else self.timeout}

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), **self._kw(timeout))

    def generate_stream(
        self, prompt: str | Sequence[int], *, timeout: float | None = None, **kwargs
    ) -> Iterator[pb.GenerateResponse]:
        """Stream responses; the returned iterator is also a grpc.Call (``.cancel()`` ends the request)."""
        return self.stub.GenerateStream(build_request(prompt, **kwargs), **self._kw(timeout))

    def abort(self, *request_ids: str, timeout: float | None = None) -> list[str]:
        return list(self.stub.Abort(pb.AbortRequest(request_ids=request_ids), **self._kw(timeout)).aborted_ids)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def server_info(self, timeout: float | None = None) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... for ``service`` ("" = the whole server)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "JaxSpecClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
