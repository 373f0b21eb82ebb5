"""Run a ``JaxSpecServer`` on a background event loop, for tests and notebooks.

The server's event loop lives in its own thread, so synchronous gRPC clients in
the calling thread talk to it over loopback exactly as a remote client would.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Coroutine

from serving.build import EngineBundle
from serving.engine_loop import ServerState
from serving.server import JaxSpecServer, ServerOptions


class BackgroundServer:
    def __init__(self, engine_factory: Callable[[], EngineBundle], options: ServerOptions):
        self._factory = engine_factory
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jaxspec-test-server", daemon=True)
        self.server: JaxSpecServer | None = None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def start(self, wait_ready: bool = True, timeout: float = 600.0) -> "BackgroundServer":
        self._thread.start()

        async def make() -> JaxSpecServer:
            server = JaxSpecServer(self._factory, self._options)
            await server.start()
            return server

        self.server = self.run(make())
        if wait_ready:
            state = self.run(self.server.wait_ready(), timeout)
            if state != ServerState.SERVING:
                raise RuntimeError(f"server did not come up: {state.value}")
        return self

    @property
    def target(self) -> str:
        return f"{self._options.host}:{self.server.port}"

    def drain(self, grace: float | None = None, timeout: float = 120.0) -> None:
        self.run(self.server.drain(grace), timeout)

    def close(self) -> None:
        """Stop the server (aborting what is in flight) and its loop. Idempotent."""
        if self.server is not None and self._thread.is_alive():
            self.run(self.server.stop(), 60.0)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def compilation_cache_dir_for_tests() -> Path:
    """A per-user persistent compilation cache for test servers (warm-up drops from ~25 s to ~3 s).

    Only the owner may write to it: the cache holds executables the process will run.
    """
    override = os.environ.get("JAXSPEC_TEST_COMPILATION_CACHE")
    path = Path(override) if override else Path(tempfile.gettempdir()) / f"jaxspec-test-jcc-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{path} must be owned by this user and not group/world-writable")
    return path
