"""Shared-token authentication: clients send ``authorization: Bearer <token>``.

Health checks stay open so that load balancers and orchestrators can probe a
server without holding the token.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from pathlib import Path
from typing import Awaitable, Callable

import grpc

log = logging.getLogger("jaxspec.serving")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def load_token(path: str | os.PathLike) -> str:
    """The token in ``path`` (surrounding whitespace stripped). Refuses an empty file."""
    p = Path(path)
    token = p.read_text().strip()
    if not token:
        raise ValueError(f"auth token file {p} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"auth token file {p} must hold one token without whitespace")
    mode = p.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("auth token file %s is readable by group/others; consider chmod 600", p)
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED (except open methods)."""

    def __init__(
        self,
        token: str,
        open_method_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES,
        on_reject: Callable[[], None] | None = None,
    ):
        self._expected = f"Bearer {token}".encode()
        self._open = open_method_prefixes
        self._on_reject = on_reject

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                # Constant-time comparison: timing must not reveal how much of a guess matched.
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(self._open) or self._authorized(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        if self._on_reject is not None:
            self._on_reject()
        return _denying(handler)


async def _deny(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only answers UNAUTHENTICATED."""
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny, **kw)
    return grpc.stream_stream_rpc_method_handler(_deny, **kw)
