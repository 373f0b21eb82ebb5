"""The bridge between the asyncio gRPC side and the one thread that owns the device.

``EngineLoop`` runs a dedicated engine thread: it builds (or receives) the engine,
warms it up, then runs the continuous-batching loop: take commands (add, abort)
from a thread-safe inbox, call ``Engine.step()`` while anything is queued or
running, and hand each step's outputs to the event loop in one
``call_soon_threadsafe`` call. Per-request asyncio queues are unbounded, so the
engine never waits for a slow client; a slow client's stream merges the deltas
that piled up into one message (see ``RequestHandle.next_outputs``).

All engine calls happen on the engine thread, so the engine needs no lock. The
event-loop side only touches handles, futures and counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from jaxspec.engine import Engine, FinishReason, InvalidRequestError, RequestOutput, SlotTable, SpecStats
from jaxspec.engine.engine import StepFailed
from jaxspec.engine.scheduler import SpecPolicy
from jaxspec.engine.step import DecodePlan, PrefillChunk, StepResult
from jaxspec.sampling import SamplingParams

log = logging.getLogger("jaxspec.serving")

# After this many consecutive failed engine steps the engine is considered broken
# (e.g. a donated cache buffer was lost): the server reports FAILED / NOT_SERVING.
MAX_CONSECUTIVE_STEP_FAILURES = 3
IDLE_POLL_S = 0.25  # how often an idle engine thread wakes for periodic work
# An idle engine woken by a command waits this long at most, and only while more keep coming within
# BURST_GAP_S of each other, so that a burst of requests shares one batched prefill instead of the
# first prefilling alone while the rest wait behind it.
BURST_WINDOW_S = 0.004
BURST_GAP_S = 0.001


class ServerState(str, enum.Enum):
    WARMING_UP = "warming_up"  # loading weights and compiling every shape
    SERVING = "serving"
    DRAINING = "draining"  # no new requests; in-flight ones finish
    STOPPED = "stopped"
    FAILED = "failed"  # start-up failed or the engine broke


class EngineUnavailableError(RuntimeError):
    """The engine is not accepting requests (warming up, draining, stopped or failed)."""


class LoopObserver(Protocol):
    """Accounting hooks (metrics, request log); called on the event loop unless noted."""

    def on_output(self, handle: "RequestHandle", output: RequestOutput) -> None: ...

    def on_finish(self, handle: "RequestHandle", output: RequestOutput) -> None: ...

    def on_engine_state(self, num_waiting: int, num_running: int) -> None:
        """Called on the engine thread after every iteration (must be cheap and thread-safe)."""
        ...

    def on_expert_load(self, load: np.ndarray) -> None:
        """Cumulative [layers, experts] routed-token counts; called on the engine thread, periodically."""
        ...

    def on_step_failure(self) -> None: ...


class RequestHandle:
    """The event-loop side of one in-flight request: an unbounded queue of engine outputs."""

    def __init__(self, request_id: str, num_prompt_tokens: int, speculative: bool):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.speculative = speculative
        self.submit_time = time.monotonic()
        self.prev_token_time: float | None = None  # for inter-token latency
        self.finished = False
        self.cancel_reason: FinishReason | None = None  # set when the gRPC side gave up on it
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = asyncio.Event()  # the final output was pushed

    def push(self, output: RequestOutput) -> None:
        self._queue.put_nowait(output)
        if output.finished:
            self._done.set()

    async def all_outputs(self) -> list[RequestOutput]:
        """Wait for the final output, then take every output: a unary call's task wakes once, not
        once per engine step (every wake-up is event-loop work holding the GIL the engine thread
        needs between steps)."""
        await self._done.wait()
        return self._take_queued([])

    async def next_outputs(self) -> list[RequestOutput]:
        """Wait for at least one output, then take everything already queued."""
        return self._take_queued([await self._queue.get()])

    def _take_queued(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        while not self._queue.empty():
            outputs.append(self._queue.get_nowait())
        return outputs


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Engine counters as of the engine thread's last iteration (read from any thread)."""

    num_waiting: int = 0
    num_running: int = 0
    spec_stats: SpecStats | None = None  # engine-wide speculation counters (a copy)


class WrappedRunner:
    """A StepRunner around another: its host-only parts (sizes, policy, descriptions) are the inner
    runner's; subclasses wrap the device calls."""

    mixes_prefill = False  # unless a subclass wraps ``prefill_with_decode`` too

    def __init__(self, runner: Any):
        self._inner = runner
        self.cfg = runner.cfg
        self.num_slots = runner.num_slots
        self.max_len = runner.max_len
        self.reuses_prefix = runner.reuses_prefix
        self.prefix_key_tokens = runner.prefix_key_tokens
        self.lookahead = runner.lookahead
        self.decode_steps = runner.decode_steps
        self.prefill_chunk = runner.prefill_chunk

    @property
    def max_prefill_rows(self) -> int:
        return self._inner.max_prefill_rows

    def paging(self) -> tuple[int, int, int] | None:
        return self._inner.paging()

    def speculation(self) -> SpecPolicy | None:
        return self._inner.speculation()

    def moe_dispatch(self) -> Any:
        return self._inner.moe_dispatch()

    def attention_backend(self) -> str:
        return self._inner.attention_backend()

    def matmul_backend(self) -> str:
        return self._inner.matmul_backend()

    def padded_length(self, prompt_len: int) -> int:
        return self._inner.padded_length(prompt_len)

    def expert_load_snapshot(self) -> np.ndarray:
        return self._inner.expert_load_snapshot()

    def device_info(self) -> tuple[str, tuple[str, ...], dict[str, int]]:
        return self._inner.device_info()

    def resume(self, slot: int, last_token: int) -> None:
        self._inner.resume(slot, last_token)

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan) -> None:
        """Prefill and decode stay apart unless a subclass wraps the mixed call too (a wrapper of
        ``prefill_batch`` and ``decode`` sees every call)."""
        return None


class GuardedRunner(WrappedRunner):
    """Wraps a StepRunner so that a request's prefill failure leaves a traceback in the log.

    The engine already turns a prefill exception into that one request's ERROR
    output; it keeps only the message, so the traceback is logged here.
    Every other StepRunner method is delegated unchanged.
    """

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        self._inner.assign_pages(slot, pages)

    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        try:
            return self._inner.prefill_batch(chunks, slots)
        except Exception:
            log.exception("prefill failed for request(s) %s (slots %s)", ", ".join(c.request.request_id for c in chunks),
                          [c.slot for c in chunks])
            raise

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        return self._inner.decode(slots, plan)

    def prefill_with_decode(self, chunk: PrefillChunk, slots: SlotTable, plan: DecodePlan
                            ) -> tuple[int, StepResult] | None:
        try:
            return self._inner.prefill_with_decode(chunk, slots, plan)
        except Exception:
            log.exception("prefill with decode failed for request %s (slot %s)", chunk.request.request_id, chunk.slot)
            raise

    @property
    def mixes_prefill(self) -> bool:
        return self._inner.mixes_prefill

    @property
    def pipelined(self) -> bool:
        return self._inner.pipelined

    @property
    def queues_drafting(self) -> bool:
        return self._inner.queues_drafting

    def dispatch(self, slots: SlotTable, plan: DecodePlan, after: Any = None) -> Any:
        return self._inner.dispatch(slots, plan, after)

    def collect(self, handle: Any) -> StepResult:
        return self._inner.collect(handle)

    def release(self, slot: int) -> None:
        self._inner.release(slot)

    def warmup(self) -> None:
        self._inner.warmup()


class EngineLoop:
    """Owns the engine thread; the asyncio side submits, aborts and reads outputs through it."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        observer: LoopObserver | None = None,
        expert_load_interval_s: float = 10.0,
        on_state: Callable[[ServerState], None] | None = None,
    ):
        self._factory = engine_factory
        self._observer = observer
        self._expert_load_interval = expert_load_interval_s
        self._on_state = on_state
        self.engine: Engine | None = None  # set on the engine thread once built
        self.state = ServerState.WARMING_UP
        self.snapshot = Snapshot()
        self.start_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future | None]] = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._thread_done = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._failures = 0
        self._expert_reader: Callable[[], np.ndarray] | None = None
        self._last_expert_read = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (call from the event loop); returns at once."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="jaxspec-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> ServerState:
        """Wait until warm-up ended (SERVING) or failed (FAILED)."""
        await self._ready.wait()
        return self.state

    def set_state(self, state: ServerState) -> None:
        """Change the state (event loop only) and tell the listener (health, metrics)."""
        if self.state == state:
            return
        log.info("server state: %s -> %s", self.state.value, state.value)
        self.state = state
        if state != ServerState.WARMING_UP:
            self._ready.set()
        if self._on_state is not None:
            self._on_state(state)

    def _warmed_up(self) -> None:
        # A drain that began during warm-up wins: the server never reports SERVING.
        if self.state == ServerState.WARMING_UP:
            self.set_state(ServerState.SERVING)
        self._ready.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """End every request (ABORTED), stop the engine thread and wait for it."""
        self._stop.set()
        self._inbox.put((lambda: None, None))  # wake an idle thread
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                log.warning("engine thread did not stop within %.1fs", timeout)
        if self.state != ServerState.FAILED:
            self.set_state(ServerState.STOPPED)

    # ------------------------------------------------------- event-loop API
    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    async def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        deadline: float | None = None,
        num_speculative_tokens: int | None = None,
        use_prefix_cache: bool = True,
    ) -> RequestHandle:
        """Queue a request in the engine. Raises InvalidRequestError, QueueFullError, EngineUnavailableError."""
        if self.state != ServerState.SERVING or self.engine is None:
            raise EngineUnavailableError(f"server is {self.state.value}")
        # Checked here too (not only in the engine) so two live handles never share an id.
        if request_id in self._handles:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in flight")
        engine = self.engine
        handle = RequestHandle(request_id, len(prompt_ids), engine.speculative and num_speculative_tokens != 0)
        self._handles[request_id] = handle
        self._idle.clear()
        try:
            await self._call(lambda: engine.add_request(
                list(prompt_ids), params, request_id, deadline=deadline, num_speculative_tokens=num_speculative_tokens,
                use_prefix_cache=use_prefix_cache,
            ))
        except asyncio.CancelledError:
            # The caller went away before the engine answered: the add may or may not
            # have happened, and the engine thread is the one that knows.
            self.cancel(request_id)
            raise
        except BaseException:
            self._forget(handle)  # refused: nothing reached the engine
            raise
        return handle

    async def abort(self, request_ids: Sequence[str], reason: FinishReason = FinishReason.ABORTED) -> list[str]:
        """End requests by id; returns the ids that were in flight. Their final outputs reach their handles."""
        engine = self.engine
        if engine is None:
            return []
        known = [rid for rid in request_ids if rid in self._handles]
        if not known:
            return []
        return await self._call(lambda: [rid for rid in known if self._abort_on_thread(engine, rid, reason)])

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.ABORTED) -> None:
        """The client went away (cancelled, deadline): end the request without waiting. Idempotent."""
        handle = self._handles.get(request_id)
        if handle is None or handle.finished or self.engine is None:
            return
        handle.cancel_reason = handle.cancel_reason or reason
        engine = self.engine

        def abort_or_forget() -> None:
            # Commands run in order, so an earlier add has been decided by now. If the
            # engine does not know the request, it was refused or its final output is
            # already on its way; forgetting is a no-op in the latter case.
            if not self._abort_on_thread(engine, request_id, reason):
                self._post(self._forget, handle)

        self._send(abort_or_forget)

    async def abort_all(self, reason: FinishReason = FinishReason.ABORTED) -> list[str]:
        return await self.abort(list(self._handles), reason)

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; False on timeout."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # --------------------------------------------------- event-loop helpers
    def _send(self, fn: Callable[[], Any], fut: asyncio.Future | None = None) -> None:
        self._inbox.put((fn, fut))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread (between steps) and await its result."""
        if self._thread_done.is_set():
            raise EngineUnavailableError(f"server is {self.state.value}")
        fut = asyncio.get_running_loop().create_future()
        self._send(fn, fut)
        return await fut

    def _fail_pending(self) -> None:
        """Event loop, after the engine thread ended: nothing will run what is still queued."""
        while True:
            try:
                _, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fut is not None and not fut.done():
                fut.set_exception(EngineUnavailableError(f"server is {self.state.value}"))

    def _forget(self, handle: RequestHandle) -> None:
        handle.finished = True
        if self._handles.get(handle.request_id) is handle:
            del self._handles[handle.request_id]
        if not self._handles:
            self._idle.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Event loop: route one step's outputs to their handles."""
        for out in outputs:
            handle = self._handles.get(out.request_id)
            if handle is None:
                continue
            handle.push(out)
            if self._observer is not None:
                self._observer.on_output(handle, out)
            if out.finished:
                self._forget(handle)
                if self._observer is not None:
                    self._observer.on_finish(handle, out)

    # ---------------------------------------------------------- engine thread
    def _post(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop closed under us (interpreter shutdown)
            pass

    def _thread_main(self) -> None:
        try:
            self._serve()
        finally:
            self._thread_done.set()
            self._post(self._fail_pending)

    def _serve(self) -> None:
        try:
            engine = self._factory()
            t0 = time.monotonic()
            engine.runner.warmup()
            log.info("warm-up compiled every shape in %.1fs", time.monotonic() - t0)
        except BaseException as e:  # report instead of dying silently; the server exits non-zero
            log.exception("engine start-up failed")
            self.start_error = e
            self._post(self.set_state, ServerState.FAILED)
            return
        self.engine = engine
        self._expert_reader = engine.runner.expert_load_snapshot
        self._post(self._warmed_up)
        try:
            self._run(engine)
        except BaseException:  # a bug in the loop itself: fail loudly rather than hang every client
            log.exception("engine loop crashed")
            self._post(self.set_state, ServerState.FAILED)
        finally:
            self._shutdown(engine)

    def _run(self, engine: Engine) -> None:
        while not self._stop.is_set():
            idle = not engine.has_unfinished()
            self._drain_inbox(block=idle)
            if idle and engine.has_unfinished():
                self._gather_burst()
            if self._stop.is_set():
                break
            outputs = self._step(engine) if engine.has_unfinished() else []
            # The snapshot first: a client that got its final output never reads counters older
            # than that output.
            spec = engine.spec_stats.snapshot() if engine.spec_stats is not None else None
            self.snapshot = Snapshot(engine.num_waiting, engine.num_running, spec)
            if outputs:
                self._post(self._deliver, outputs)
            if self._observer is not None:
                self._observer.on_engine_state(engine.num_waiting, engine.num_running)
            self._maybe_read_expert_load()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _gather_burst(self) -> None:
        """Take the commands that follow the one that woke an idle engine (``BURST_WINDOW_S``)."""
        deadline = time.monotonic() + BURST_WINDOW_S
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._inbox.get(timeout=min(left, BURST_GAP_S))
            except queue.Empty:
                return
            self._run_command(*item)

    def _run_command(self, fn: Callable[[], Any], fut: asyncio.Future | None) -> None:
        try:
            result, error = fn(), None
        except Exception as e:  # refused requests travel back to the awaiting coroutine
            result, error = None, e
        if fut is not None:
            self._post(_resolve, fut, result, error)
        elif error is not None:
            log.warning("engine command failed: %s", error)

    def _abort_on_thread(self, engine: Engine, request_id: str, reason: FinishReason) -> bool:
        out = engine.abort(request_id, reason)
        if out is None:
            return False
        self._post(self._deliver, [out])
        return True

    def _step(self, engine: Engine) -> list[RequestOutput]:
        try:
            outputs = engine.step()
        except StepFailed as e:
            # The engine ended every request the failed work ran over (ERROR) and kept every other
            # output of the step (admissions, expiries): all of them are delivered.
            outputs = e.outputs
            self._count_failure(e, engine)
            return outputs
        except Exception as e:
            # A failure outside the device step (a bug in the engine's bookkeeping): fail the
            # running requests, keep the waiting ones.
            outputs = self._fail_running(engine, f"engine step failed: {type(e).__name__}: {e}")
            self._count_failure(e, engine)
            return outputs
        self._failures = 0
        return outputs

    def _count_failure(self, e: Exception, engine: Engine) -> None:
        self._failures += 1
        log.error("engine step failed (%d in a row)", self._failures, exc_info=e)
        if self._observer is not None:
            self._observer.on_step_failure()
        if self._failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            log.error("engine failed %d steps in a row; marking the server FAILED", self._failures)
            self._post(self.set_state, ServerState.FAILED)
            self._stop.set()

    def _fail_running(self, engine: Engine, message: str) -> list[RequestOutput]:
        outputs = []
        for live in list(engine.live.values()):
            rid = live.request.request_id
            try:
                out = engine.abort(rid, FinishReason.ERROR)
            except Exception:
                log.exception("could not release request %s after a failed step", rid)
                out = RequestOutput(rid, [], "", True, FinishReason.ERROR)
                self._failures = MAX_CONSECUTIVE_STEP_FAILURES  # engine state unknown: stop serving
            if out is not None:
                out.error = message
                outputs.append(out)
        return outputs

    def _maybe_read_expert_load(self) -> None:
        now = time.monotonic()
        if self._expert_reader is None or self._observer is None or now - self._last_expert_read < self._expert_load_interval:
            return
        self._last_expert_read = now
        try:
            self._observer.on_expert_load(self._expert_reader())
        except Exception:
            log.exception("reading expert load failed")

    def _shutdown(self, engine: Engine) -> None:
        """Engine thread, on stop: end whatever is left so every client gets a final message."""
        # Commands queued before the stop still run (an abort racing the stop, a late add).
        self._drain_inbox(block=False)
        outputs = []
        for rid in [r.request_id for r in engine.waiting] + [l.request.request_id for l in engine.live.values()]:
            try:
                out = engine.abort(rid, FinishReason.ABORTED)
            except Exception:
                log.exception("could not abort request %s at shutdown", rid)
                out = RequestOutput(rid, [], "", True, FinishReason.ERROR, error="server stopped")
            if out is not None:
                outputs.append(out)
        if outputs:
            self._post(self._deliver, outputs)
        self.snapshot = Snapshot()
        if self._expert_reader is not None and self._observer is not None:
            self._last_expert_read = 0.0
            self._maybe_read_expert_load()


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # the awaiting coroutine was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
