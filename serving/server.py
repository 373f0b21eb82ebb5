"""The gRPC server: JaxSpec service, grpc.health.v1, reflection, auth, TLS, metrics, drain, and
the OpenAI-compatible HTTP API (serving/http_api.py) on the same event loop and engine.

Start-up order matters for orchestration: the port is bound and health answers
NOT_SERVING first; the engine thread then loads weights and compiles every
shape, and only then does health flip to SERVING. ``drain`` stops admission
(health NOT_SERVING, new requests UNAVAILABLE), lets in-flight requests finish
within the grace period, aborts what is left, and shuts down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxspec.engine import Engine, FinishReason
from serving.auth import BearerTokenInterceptor
from serving.build import EngineBundle
from serving.engine_loop import EngineLoop, ServerState
from serving.http_api import HttpFrontend
from serving.metrics import ServingMetrics
from serving.pb import SERVICE_NAME
from serving.pb import jaxspec_pb2_grpc as pb_grpc
from serving.servicer import JaxSpecServicer

log = logging.getLogger("jaxspec.serving")

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (see JaxSpecServer.port)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key enables TLS
    tls_key: str | None = None
    auth_token: str | None = None  # shared bearer token; None disables auth
    metrics_port: int | None = None  # Prometheus /metrics over HTTP on host; None disables
    http_port: int | None = None  # OpenAI-compatible HTTP API on host (0 picks a free port); None disables
    grace_period: float = 30.0  # seconds in-flight requests get to finish on drain
    expert_load_interval_s: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's default; far above any prompt a context holds

    def validate(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.grace_period < 0:
            raise ValueError(f"grace period must be >= 0, got {self.grace_period}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class JaxSpecServer:
    """One serving process' worth of state, driven from an asyncio event loop."""

    def __init__(self, engine_factory: Callable[[], EngineBundle], options: ServerOptions = ServerOptions()):
        options.validate()
        self.options = options
        self._factory = engine_factory
        self.metrics = ServingMetrics()
        self.engine_loop = EngineLoop(
            self._build_engine, observer=self.metrics,
            expert_load_interval_s=options.expert_load_interval_s, on_state=self._on_state,
        )
        self.servicer = JaxSpecServicer(self.engine_loop, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpFrontend | None = None
        self.http_port: int | None = None
        self.exit_code = 0
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------- start-up
    def _build_engine(self) -> Engine:
        """Engine thread: load and build; the servicer gets the bundle before SERVING is announced."""
        bundle = self._factory()
        self.servicer.bundle = bundle
        return bundle.engine

    async def start(self) -> None:
        """Bind, start answering (NOT_SERVING), start metrics and the engine thread. Returns at once."""
        opts = self.options
        await self._set_health(_NOT_SERVING)
        interceptors = []
        if opts.auth_token:
            interceptors.append(BearerTokenInterceptor(
                opts.auth_token, on_reject=lambda: self.metrics.request_rejected("UNAUTHENTICATED")))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # Without this a second server could silently share the port on Linux.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", opts.max_message_bytes),
                ("grpc.max_send_message_length", opts.max_message_bytes),
            ],
        )
        pb_grpc.add_JaxSpecServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = _address(opts.host, opts.port)
        if opts.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        if opts.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(opts.host, opts.metrics_port)
            except OSError as e:
                await server.stop(None)
                raise OSError(f"metrics port {opts.metrics_port}: {e}") from e
        if opts.http_port is not None:
            http = HttpFrontend(self.servicer, opts.host, opts.http_port, auth_token=opts.auth_token,
                                tls_cert=opts.tls_cert, tls_key=opts.tls_key)
            try:
                self.http_port = await http.start()
            except OSError as e:
                await server.stop(None)
                raise OSError(f"HTTP port {opts.http_port}: {e}") from e
            self.http = http
        self._server = server
        await server.start()
        scheme = "https" if opts.tls_cert else "http"
        log.info(
            "listening on %s (%s%s)%s%s", _address(opts.host, self.port), "TLS" if opts.tls_cert else "plaintext",
            ", bearer-token auth" if opts.auth_token else "",
            f"; OpenAI-compatible API on {scheme}://{_address(opts.host, self.http_port)}/v1" if self.http else "",
            f"; metrics on http://{_address(opts.host, self.metrics_port)}/metrics" if self.metrics_port else "",
        )
        self.engine_loop.start()

    async def wait_ready(self) -> ServerState:
        return await self.engine_loop.wait_ready()

    # ---------------------------------------------------------------- state
    def _on_state(self, state: ServerState) -> None:
        task = asyncio.ensure_future(self._set_health(_SERVING if state == ServerState.SERVING else _NOT_SERVING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if state == ServerState.FAILED and self._stopping is None:
            log.error("engine failed; shutting down")
            self.exit_code = 1
            self._stopping = asyncio.ensure_future(self._shutdown(grace=1.0))

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    # ------------------------------------------------------------- shutdown
    async def drain(self, grace: float | None = None) -> None:
        """Stop admitting, let in-flight requests finish within ``grace`` seconds, then stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(self.options.grace_period if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _drain(self, grace: float) -> None:
        if self.engine_loop.state in (ServerState.SERVING, ServerState.WARMING_UP):
            self.engine_loop.set_state(ServerState.DRAINING)
        log.info("draining: %d request(s) in flight, grace period %.1fs", self.engine_loop.num_in_flight, grace)
        if not await self.engine_loop.wait_idle(grace):
            aborted = await self.engine_loop.abort_all(FinishReason.ABORTED)
            log.warning("grace period over: aborted %d request(s)", len(aborted))
            await self.engine_loop.wait_idle(5.0)
        await self._shutdown(grace=1.0)

    async def _shutdown(self, grace: float) -> None:
        # Handlers still writing their final message get ``grace`` seconds.
        await asyncio.gather(*(s.stop(grace) for s in (self._server, self.http) if s is not None))
        await self.engine_loop.stop()
        await self._set_health(_NOT_SERVING)
        self.metrics.shutdown()
        log.info("server stopped")
        self._stopped.set()

    async def stop(self) -> None:
        """Stop now: abort everything in flight (they get FINISH_REASON_ABORTED).

        During a drain this cuts the grace period short (e.g. a second SIGTERM)."""
        if self._stopping is not None:
            await self.engine_loop.abort_all(FinishReason.ABORTED)
        await self.drain(grace=0.0)

    async def wait_stopped(self) -> int:
        """Wait until the server stopped (drained, stopped or failed); returns the exit code."""
        await self._stopped.wait()
        return self.exit_code
