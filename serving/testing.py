"""Test support: a server on a background event loop, a controllable runner, tiny engines.

``BackgroundServer`` runs a ``JaxSpecServer`` on its own event loop thread, so
synchronous gRPC clients in the calling thread talk to it over loopback exactly
as a remote client would. ``ControlledRunner`` wraps a real runner to slow its
steps, fail them, or hold warm-up, so that timing-dependent behaviour
(cancellation, deadlines, queueing, draining, faults) can be tested without
races.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, Sequence

import jax

from jaxspec.engine import SlotTable, StepRunner
from jaxspec.engine.step import DecodePlan, PrefillChunk, StepResult
from serving.build import EngineBundle, enable_compilation_cache
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


@contextlib.contextmanager
def persistent_compilation_cache(directory: str | Path | None = None) -> Iterator[Path]:
    """Enable the persistent compilation cache for a block, then restore the previous settings."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    path = Path(directory) if directory is not None else compilation_cache_dir_for_tests()
    enable_compilation_cache(path)
    try:
        yield path
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


class ControlledRunner:
    """Wraps a StepRunner; tests switch on slow steps, injected faults or a held warm-up."""

    pipelined = False  # faults and delays are injected in ``decode``: every step goes through it
    mixes_prefill = False

    def __init__(self, inner: StepRunner, poison_prompt_ids: Sequence[int] | None = None):
        self.inner = inner
        self.cfg = inner.cfg
        self.num_slots = inner.num_slots
        self.max_len = inner.max_len
        self.poison = tuple(poison_prompt_ids) if poison_prompt_ids is not None else None
        self.step_delay_s = 0.0  # sleep before every decode step
        self.fail_decodes = 0  # raise in this many of the next decode steps
        self.warmup_gate: threading.Event | None = None  # warm-up waits for it

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        if self.poison is not None and any(tuple(c.request.prompt_ids) == self.poison for c in chunks):
            raise RuntimeError("injected prefill fault")
        return self.inner.prefill_batch(chunks, slots)

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail_decodes > 0:
            self.fail_decodes -= 1
            raise RuntimeError("injected decode fault")
        return self.inner.decode(slots, plan)

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan) -> None:
        return None  # every step goes through ``decode``, where faults and delays are injected

    def speculation(self):
        return self.inner.speculation()

    def release(self, slot: int) -> None:
        self.inner.release(slot)

    def warmup(self) -> None:
        if self.warmup_gate is not None and not self.warmup_gate.wait(300):
            raise TimeoutError("warm-up gate was never opened")
        self.inner.warmup()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
