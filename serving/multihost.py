"""Leader and followers of a multi-host engine, at the ``StepRunner`` boundary.

Every process of a ``jax.distributed`` job holds a replica of the same step runner (same
model, same global mesh, same compiled steps), and each jitted step must run on every
process, in the same order, with the same host inputs. The engine (scheduler, requests,
tokenisation) runs on the leader only, unchanged: its runner is wrapped in a
``BroadcastingRunner``, which publishes every call that does device work (prefill, decode,
page assignment, release, warm-up) with its host arguments on a ``StepChannel`` before
running it locally. Followers run ``follow``: read call n, run it on their replica, drop the
outputs (the leader alone reads tokens back), repeat until the leader's stop record.

Records hold host values only (ints, lists, numpy arrays, the requests' dataclasses) and are
pickled: they travel from process 0 to its own job's processes through the coordination
service, the same trust boundary as the collectives themselves.

Failure handling. A follower that cannot run a call the leader ran (or that loses the
coordinator) exits non-zero at once, and the leader's next collective fails or hangs. Followers
bump a heartbeat counter in the key-value store every second (the runtime's ``get_live_nodes``
is collective: it returns only once every live process has called it, so the leader cannot ask
it alone). When a call raises, or runs longer than ``stall_s``, the leader checks the heartbeats;
a follower quiet for ``dead_after_s`` makes it raise ``FollowerLost`` (the engine fails that
step's requests with ERROR) and call ``on_lost`` (the server: NOT_SERVING, exit status 3). A step
stuck in a collective cannot be interrupted, so ``on_lost`` gives the orderly shutdown 30 s and
then ends the process. JAX's own heartbeat timeout (``--distributed-heartbeat-timeout``, 100 s by
default) aborts every process later still, should all of this fail.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import threading
import time
from typing import Any, Callable

import numpy as np

from jaxspec.distributed import StepChannel
from jaxspec.engine.slots import SlotTable
from jaxspec.engine.step import DecodePlan, PrefillChunk, StepResult
from serving.engine_loop import WrappedRunner
from serving.follower_health import FAILED, FOLLOWING, STOPPED, FollowerStatus

log = logging.getLogger("jaxspec.multihost")

EXIT_FOLLOWER_LOST = 3  # the leader's exit status when a follower died
EXIT_DIVERGED = 4  # a follower's exit status when it could not run what the leader ran
HEARTBEAT_S = 1.0  # how often followers beat and the leader looks
STOP = "stop"
# The slot table columns runners read (SlotTable.sampling, num_generated, last_token, active).
SLOT_COLUMNS = ("active", "last_token", "num_generated", "temperature", "top_k", "top_p", "min_p", "seed")


class FollowerLost(RuntimeError):
    """A follower process of the multi-host job is gone: no step can run any more."""


def host_lengths_for_reads(runner: Any, _depth: int = 0) -> int:
    """Make every ``ModelRunner`` inside ``runner`` answer ``lengths()`` from its host copy.

    ``ModelRunner.warmup`` saves the cache lengths by reading them from the device; they are split
    over the data axis, and a process cannot read shards on another host. The host copy
    (``host_lengths``) is what the device holds between steps, so reading it is equivalent.
    Returns how many runners were adjusted."""
    from jaxspec.engine.model_runner import ModelRunner

    if isinstance(runner, ModelRunner):
        runner.lengths = lambda r=runner: r.host_lengths.copy()
        return 1
    if _depth > 2 or not hasattr(runner, "__dict__"):
        return 0
    return sum(host_lengths_for_reads(v, _depth + 1) for v in vars(runner).values()
               if hasattr(v, "__dict__") and not isinstance(v, type))


def slot_columns(slots: SlotTable) -> dict[str, np.ndarray]:
    return {name: getattr(slots, name).copy() for name in SLOT_COLUMNS}


def load_columns(slots: SlotTable, columns: dict[str, np.ndarray]) -> None:
    for name, value in columns.items():
        getattr(slots, name)[...] = value


def encode(call: str, prev_ok: bool, prev_decode: tuple | None = None, **args: Any) -> bytes:
    """A record: the call and its host arguments, whether the leader's previous call succeeded and,
    if that call was a decode step, what it ran (``decode_summary``), for the follower to compare."""
    return pickle.dumps({"call": call, "prev_ok": prev_ok, "prev_decode": prev_decode, "args": args},
                        protocol=pickle.HIGHEST_PROTOCOL)


def decode_summary(result: StepResult) -> tuple[int, list[list[int]]]:
    """What a decode step ran and emitted: (kb, tokens per slot). The leader's and each follower's
    must be equal: a follower that ran another proposal length (a host-side choice such as prompt
    lookup finding nothing) or kept other tokens no longer holds the leader's state."""
    return int(result.kb), [[int(t) for t in toks] for toks in result.tokens]


def speculative_runners(runner: Any, _depth: int = 0) -> list[Any]:
    """The ``SpeculativeRunner`` objects inside ``runner`` (itself or wrapped, a few levels deep)."""
    from jaxspec.speculative.runner import SpeculativeRunner

    if isinstance(runner, SpeculativeRunner):
        return [runner]
    if _depth > 2 or not hasattr(runner, "__dict__"):
        return []
    return [r for v in vars(runner).values() if hasattr(v, "__dict__") and not isinstance(v, type)
            for r in speculative_runners(v, _depth + 1)]


def decode_record(record: bytes) -> dict[str, Any]:
    return pickle.loads(record)


class BroadcastingRunner(WrappedRunner):
    """The leader's runner: publishes each device call, then runs it on the local replica.

    Not pipelined (the engine's overlap mode queues steps whose inputs stay on the device,
    which a follower could not be told about), so every decode is one published call."""

    pipelined = False
    queues_drafting = False

    def __init__(self, runner: Any, channel: StepChannel, *, stall_s: float = 30.0, dead_after_s: float = 5.0,
                 on_lost: Callable[[str], None] | None = None):
        super().__init__(runner)
        self.decode_steps = 1  # a follower replays one published step per call
        host_lengths_for_reads(runner)
        self.channel = channel
        self.stall_s = stall_s
        self.dead_after_s = dead_after_s
        self._beats: dict[int, tuple[int, float]] = {}  # follower -> (last count, when it changed)
        self.on_lost = on_lost or _exit_lost
        self.lost: str | None = None  # why the job cannot step any more
        self._prev_ok = True
        self._prev_decode: tuple | None = None  # decode_summary of the previous call, if a decode
        self.decode_kb: collections.Counter[int] = collections.Counter()  # decode steps run, by kb
        self._stopped = False
        self._busy_since: float | None = None
        self._in_call = False
        self._lock = threading.Lock()
        for spec in speculative_runners(runner):
            self._publish_measurements(spec)
        self._watchdog = threading.Thread(target=self._watch, name="jaxspec-multihost-watchdog", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------- published calls
    def prefill_batch(self, chunks: list[PrefillChunk], slots: SlotTable) -> list[int]:
        wire = [(c.slot, c.request, c.start, c.end) for c in chunks]
        return self._run("prefill_batch", lambda: self._inner.prefill_batch(chunks, slots),
                         chunks=wire, slots=slot_columns(slots))

    def decode(self, slots: SlotTable, plan: DecodePlan) -> StepResult:
        result = self._run("decode", lambda: self._inner.decode(slots, plan), slots=slot_columns(slots),
                           plan=(plan.slots, plan.k, plan.kb))
        self._prev_decode = decode_summary(result)
        self.decode_kb[result.kb] += 1
        return result

    def assign_pages(self, slot: int, pages: list[int]) -> None:
        self._run("assign_pages", lambda: self._inner.assign_pages(slot, pages), slot=int(slot),
                  pages=[int(p) for p in pages])

    def release(self, slot: int) -> None:
        self._run("release", lambda: self._inner.release(slot), slot=int(slot))

    def resume(self, slot: int, last_token: int) -> None:
        self._run("resume", lambda: self._inner.resume(slot, last_token), slot=int(slot),
                  token=int(last_token))

    def warmup(self) -> None:
        self._run("warmup", self._inner.warmup)

    def _publish_measurements(self, spec: Any) -> None:
        """Adaptive k measures a batch bucket's step costs when the scheduler first needs them
        (``SpecScheduler.costs_for``, while planning, outside any runner call) unless warm-up did:
        those timed steps run on the mesh, so every follower must run them too. ``spec``'s
        ``measure_costs`` is published as a call of its own, except inside a published call
        (warm-up), which followers replay whole. The leader's measurements alone steer k: what a
        follower measures is dropped, and it runs the kb of each published decode plan."""
        local = spec.measure_costs

        def measure_costs(reps: int = 5, rows: int | None = None):
            if self._in_call:
                return local(reps, rows)
            return self._run("measure_costs", lambda: local(reps, rows), reps=int(reps),
                             rows=None if rows is None else int(rows))

        spec.measure_costs = measure_costs

    def stop(self) -> None:
        """Tell the followers to exit (they return 0). Idempotent; safe after a failure."""
        # A step stuck in a collective holds the lock for good: then there is nobody to stop. With a
        # peer known lost, waiting for it only delays the exit until the coordination service aborts.
        if not self._lock.acquire(timeout=0.0 if self.lost is not None else 10.0):
            log.error("a step is still running; not publishing the stop record")
            return
        try:
            if self._stopped:
                return
            self._stopped = True
            self.channel.publish(encode(STOP, self._prev_ok, self._prev_decode))
            log.info("stopping the followers after %d calls; decode steps by proposal length kb: %s",
                     self.channel.seq, dict(sorted(self.decode_kb.items())))
        except Exception:  # noqa: BLE001  (the coordinator may be gone already)
            log.exception("could not publish the stop record")
        finally:
            self._lock.release()

    # --------------------------------------------------------------- machinery
    def _run(self, call: str, local: Callable[[], Any], **args: Any) -> Any:
        with self._lock:
            if self.lost is not None:
                raise FollowerLost(self.lost)
            if self._stopped:
                raise RuntimeError("multi-host runner already stopped")
            self.channel.publish(encode(call, self._prev_ok, self._prev_decode, **args))
            self._prev_decode = None
            self._busy_since = time.monotonic()
            self._in_call = True
            try:
                out = local()
            except Exception as e:
                self._prev_ok = False
                gone = self._missing(wait=True)
                if gone:
                    self._lose(f"follower process(es) {gone} left the job during {call}: {type(e).__name__}: {e}")
                    raise FollowerLost(self.lost) from e
                raise
            finally:
                self._busy_since = None
                self._in_call = False
            self._prev_ok = True
            return out

    def _poll_beats(self) -> None:
        now = time.monotonic()
        try:
            beats = self.channel.beats()
        except Exception as e:  # noqa: BLE001  (the coordination service itself failed)
            log.error("cannot read the followers' heartbeats: %s", e)
            return
        for p, count in beats.items():
            if self._beats.get(p, (None, 0.0))[0] != count:
                self._beats[p] = (count, now)

    def _missing(self, wait: bool = False) -> list[int]:
        """Followers whose heartbeat has not moved for ``dead_after_s``. ``wait`` (after a failed
        call): wait until each follower either beats again (alive) or stays quiet that long."""
        self._poll_beats()
        # A beat first seen now may predate the failure; only a later one proves life.
        before = {p: count for p, (count, _) in self._beats.items()}
        while True:
            now = time.monotonic()
            gone = [p for p, (_, t) in self._beats.items() if now - t > self.dead_after_s]
            if gone or not wait or all(self._beats[p][0] != c for p, c in before.items()):
                return gone
            time.sleep(HEARTBEAT_S / 4)
            self._poll_beats()

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.error("multi-host job broken: %s", why)
            self.on_lost(why)

    def _watch(self) -> None:
        """Follow the followers' heartbeats (and beat for their health endpoints); a step that has
        run for ``stall_s`` while a follower went quiet is stuck in a collective with a dead peer."""
        count = 0
        while self.lost is None and not self._stopped:
            time.sleep(HEARTBEAT_S)
            try:
                self.channel.beat(count)
                count += 1
            except Exception as e:  # noqa: BLE001  (the coordination service failed: _poll_beats logs it)
                log.debug("leader heartbeat failed: %s", e)
            since = self._busy_since
            if since is None or time.monotonic() - since < self.stall_s:
                self._poll_beats()
                continue
            gone = self._missing()
            if gone:
                self._lose(f"follower process(es) {gone} stopped beating; a step has been stuck for "
                           f"{time.monotonic() - since:.0f}s")


def _exit_lost(why: str) -> None:
    """Default ``on_lost``: nothing more can run; end the process non-zero with the reason."""
    log.critical("exiting: %s", why)
    logging.shutdown()
    os._exit(EXIT_FOLLOWER_LOST)


def follow(runner: Any, channel: StepChannel, *, idle_timeout_s: float | None = None,
           status: FollowerStatus | None = None) -> int:
    """A follower's loop: run the leader's calls on ``runner`` until the stop record; returns the
    exit status (0: the leader stopped; EXIT_DIVERGED: this replica failed a call the leader ran).
    ``status`` (the health endpoint's) counts the replayed calls and the leader's heartbeat."""
    host_lengths_for_reads(runner)
    slots = SlotTable(runner.num_slots)
    status = status or FollowerStatus(channel.process_id)
    status.set_state(FOLLOWING)
    done = threading.Event()
    beater = threading.Thread(target=_beat, args=(channel, done, status), name="jaxspec-heartbeat", daemon=True)
    beater.start()
    code = EXIT_FOLLOWER_LOST
    try:
        code = _follow(runner, channel, slots, idle_timeout_s, status)
        return code
    finally:
        status.set_state(STOPPED if code == 0 else FAILED)
        done.set()


def _beat(channel: StepChannel, done: threading.Event, status: FollowerStatus | None = None) -> None:
    count = 0
    while not done.is_set():
        try:
            channel.beat(count)
            leader = channel.beat_of(0)
        except Exception as e:  # noqa: BLE001  (the leader and its coordinator are gone)
            log.error("heartbeat failed: %s", e)
            return
        if leader is not None and status is not None:
            status.leader_beat(leader)
        count += 1
        done.wait(HEARTBEAT_S)


def _follow(runner: Any, channel: StepChannel, slots: SlotTable, idle_timeout_s: float | None,
            status: FollowerStatus) -> int:
    ok, last_error, mine = True, None, None
    while True:
        rec = decode_record(channel.receive(timeout_s=idle_timeout_s))
        if rec["prev_ok"] and not ok:
            log.critical("this process failed call %d, which the leader ran: %s", channel.seq - 1, last_error)
            return EXIT_DIVERGED
        leaders = rec.get("prev_decode")
        if leaders is not None and mine is not None and tuple(leaders) != tuple(mine):
            log.critical("decode call %d diverged from the leader's: the leader ran kb=%d and emitted %s, this "
                         "process ran kb=%d and emitted %s", channel.seq - 1, leaders[0], leaders[1], mine[0], mine[1])
            return EXIT_DIVERGED
        mine = None
        call, args = rec["call"], rec["args"]
        if call == STOP:
            channel.ack(force=True)
            log.info("leader stopped after %d calls", channel.seq - 1)
            return 0
        t = time.monotonic()
        try:
            out = _execute(runner, slots, call, args)
            ok, last_error = True, None
            if call == "decode":
                mine = decode_summary(out)
                status.decoded(mine[0])
        except Exception as e:  # the leader's replica probably failed alike (a bad prompt): compare next
            log.warning("call %d (%s) failed here: %s: %s", channel.seq, call, type(e).__name__, e)
            ok, last_error = False, f"{type(e).__name__}: {e}"
        status.replayed(call, channel.seq, time.monotonic() - t, ok)
        channel.ack()


def _execute(runner: Any, slots: SlotTable, call: str, args: dict[str, Any]) -> Any:
    if "slots" in args:
        load_columns(slots, args["slots"])
    if call == "prefill_batch":
        runner.prefill_batch([PrefillChunk(*c) for c in args["chunks"]], slots)
    elif call == "decode":
        # The leader's plan as it ran it: its kb, never a choice of this process's own.
        return runner.decode(slots, DecodePlan(*args["plan"]))
    elif call == "assign_pages":
        runner.assign_pages(args["slot"], args["pages"])
    elif call == "release":
        runner.release(args["slot"])
    elif call == "resume":
        runner.resume(args["slot"], args["token"])
    elif call == "warmup":
        runner.warmup()
    elif call == "measure_costs":  # the leader's adaptive policy timed the steps; the times here are dropped
        (spec,) = speculative_runners(runner)
        spec.measure_costs(args["reps"], args["rows"])
    else:
        raise ValueError(f"unknown multi-host call {call!r} (leader and follower versions differ?)")


# ------------------------------------------------------------------------------- the CLI
def run(info, engine_opts, server_opts, *, stall_s: float = 60.0) -> int:
    """``python -m jaxspec.serve`` in a multi-process job: the leader serves gRPC, the others
    follow. Returns the process's exit status."""
    import asyncio

    from jaxspec.mesh import mesh_for_option

    mesh = mesh_for_option(engine_opts.mesh)
    if mesh is None or mesh.num_devices != info.global_devices:
        # Every process must hold part of every array the steps touch: one mesh over all devices.
        log.error("a %d-process job needs --mesh over all %d devices of the job (got %s)", info.num_processes,
                  info.global_devices, "one device" if mesh is None else f"{mesh.name}: {mesh.num_devices} devices")
        return 2
    channel = StepChannel()
    if not info.is_leader:
        return run_follower(engine_opts, channel, server_opts)
    code, _ = asyncio.run(serve_leader(engine_opts, server_opts, channel, stall_s=stall_s))
    return code


def run_follower(engine_opts, channel: StepChannel, server_opts=None) -> int:
    """Build the same engine as the leader (its runner is this process's replica) and follow.
    ``server_opts.metrics_port`` (``--metrics-port``): this process's /health and /metrics
    (serving/follower_health.py), up from before loading (503 until it follows)."""
    import signal

    from serving.build import load_engine

    # An orchestrator signals every pod at once; the leader drains and then publishes the stop
    # record, which this process must still be here to see (its collectives need it until then).
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: waiting for the leader's stop record"))
    status = FollowerStatus(channel.process_id)
    if server_opts is not None and server_opts.metrics_port is not None:
        port = status.serve_http(server_opts.host, server_opts.metrics_port)
        log.info("follower %d: health and metrics on http://%s:%d/health, /metrics", channel.process_id,
                 server_opts.host, port)
    try:
        bundle = load_engine(engine_opts)
        log.info("follower %d ready: replaying the leader's steps", channel.process_id)
        return follow(bundle.engine.runner, channel, status=status)
    except Exception as e:  # noqa: BLE001  (the leader or the coordinator is gone)
        status.set_state(FAILED)
        log.critical("follower %d stops: %s: %s", channel.process_id, type(e).__name__, e)
        return EXIT_FOLLOWER_LOST
    finally:
        status.shutdown()


async def serve_leader(engine_opts, server_opts, channel: StepChannel, *, stall_s: float = 60.0):
    """``jaxspec.serve.serve`` with the runner broadcasting to the followers; returns
    (exit status, the BroadcastingRunner or None if loading failed before it existed)."""
    import asyncio
    import signal

    from serving.build import load_engine
    from serving.engine_loop import ServerState
    from serving.server import JaxSpecServer

    loop = asyncio.get_running_loop()
    holder: list[BroadcastingRunner] = []
    server: JaxSpecServer | None = None

    def fail(why: str) -> None:  # event loop: NOT_SERVING, in-flight requests end, exit non-zero
        server.engine_loop.set_state(ServerState.FAILED)
        server.exit_code = EXIT_FOLLOWER_LOST

    def on_lost(why: str) -> None:  # any thread
        loop.call_soon_threadsafe(fail, why)
        # A step stuck in a collective never returns: the orderly shutdown gets this long.
        timer = threading.Timer(30.0, _exit_lost, [why])
        timer.daemon = True
        timer.start()

    def wrap(runner):
        holder.append(BroadcastingRunner(runner, channel, stall_s=stall_s, on_lost=on_lost))
        return holder[0]

    server = JaxSpecServer(lambda: load_engine(engine_opts, wrap), server_opts)
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: draining (grace period %.1fs), then stopping the followers", sig.name,
                     server_opts.grace_period)
            asyncio.ensure_future(server.drain())
        else:
            asyncio.ensure_future(server.stop())

    try:
        await server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        code = await server.wait_stopped()
    finally:
        if holder:
            holder[0].stop()
        else:  # loading failed before the runner existed: the followers still wait for record 1
            channel.publish(encode(STOP, False))
    if holder and holder[0].lost is not None:
        # Every request has had its answer. Exit now: asyncio.run's shutdown joins the thread stuck in
        # the dead peer's collective, and jax's own shutdown waits on a barrier over every process,
        # while the coordination service aborts this process once it sees the peer gone.
        _exit_lost(holder[0].lost)
    return code, (holder[0] if holder else None)
