"""JAX's multi-controller runtime for serving one model over several hosts.

One process per host; every process runs the same jitted programs, in the same
order, over one global mesh (``jax.devices()`` then lists every host's devices).
This module does the two pieces that are not model code:

* ``initialize``: start ``jax.distributed`` from flags or the environment
  (``--coordinator HOST:PORT --num-processes N --process-id I``; on Cloud TPU VMs,
  GKE TPU pods and SLURM, JAX's own cluster detection with no flags). On CPU the
  cross-process collectives need gloo, which must be chosen before the backend
  starts, so this runs before anything touches a device.
* ``StepChannel``: an ordered stream of small records from process 0 to the others
  through the distributed runtime's key-value store (the coordination service
  process 0 already runs), so no socket of our own is opened. Record ``n`` lives
  under ``jaxspec/step/<n>``; followers acknowledge what they have executed so the
  leader can delete old records (the store is in the coordinator's memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time

import jax

log = logging.getLogger("jaxspec.distributed")

ENV_COORDINATOR = "JAXSPEC_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSPEC_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSPEC_PROCESS_ID"
AUTO = "auto"  # --coordinator auto: JAX's cluster detection (TPU VM, GKE, SLURM)


class DistributedError(RuntimeError):
    """The multi-process runtime could not start, or a peer went away."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("multi-host (jax.distributed; see docs/multihost.md)")
    g.add_argument("--coordinator", default=os.environ.get(ENV_COORDINATOR),
                   help="HOST:PORT of process 0's coordination service, the same on every process; 'auto': "
                        f"JAX's cluster detection (Cloud TPU VM, GKE TPU, SLURM). Env: {ENV_COORDINATOR}. "
                        "Unset: one process (the default), unless a multi-host TPU environment is detected")
    g.add_argument("--num-processes", type=int, default=_env_int(ENV_NUM_PROCESSES),
                   help=f"processes in the job (one per host). Env: {ENV_NUM_PROCESSES}")
    g.add_argument("--process-id", type=int, default=_env_int(ENV_PROCESS_ID),
                   help=f"this process's index, 0 = the leader that serves. Env: {ENV_PROCESS_ID}")
    g.add_argument("--distributed-timeout", type=int, default=300,
                   help="seconds to wait for every process to join")
    g.add_argument("--distributed-heartbeat-timeout", type=int, default=100,
                   help="seconds of silence after which JAX's runtime declares a process dead and aborts the others "
                        "(the leader notices a dead follower sooner through its own heartbeats)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def tpu_cluster_detected() -> bool:
    """A multi-host TPU environment (GKE TPU pods and TPU VM slices set the worker host list):
    JAX's detection can then initialise with no flags."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def wanted(args: argparse.Namespace) -> bool:
    """Whether these arguments ask for the multi-process runtime."""
    return bool(args.coordinator or args.num_processes not in (None, 1) or tpu_cluster_detected())


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> ProcessInfo:
    """Start ``jax.distributed`` (call before any other jax work). ``coordinator`` None or "auto":
    JAX's cluster detection fills what is missing; otherwise all three must be given."""
    explicit = coordinator not in (None, AUTO)
    if explicit and (num_processes is None or process_id is None):
        raise DistributedError("--coordinator needs --num-processes and --process-id too")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is outside 0..{num_processes - 1}")
    if _platform() == "cpu":
        # CPU collectives across processes go through gloo (the default implementation is
        # single-process); it must be set before the CPU backend exists.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    try:
        if explicit:
            jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
        else:
            jax.distributed.initialize(num_processes=num_processes, process_id=process_id, **kwargs)
    except Exception as e:  # noqa: BLE001  (the runtime raises several types; the message is what matters)
        where = coordinator if explicit else "auto-detected cluster"
        raise DistributedError(f"jax.distributed.initialize ({where}) failed: {type(e).__name__}: {e}") from e
    info = ProcessInfo(jax.process_index(), jax.process_count(), len(jax.local_devices()), len(jax.devices()))
    log.info("process %d of %d: %d local device(s), %d in the job", info.process_id, info.num_processes,
             info.local_devices, info.global_devices)
    return info


def initialize_from_args(args: argparse.Namespace) -> ProcessInfo | None:
    """``initialize`` when the arguments ask for it (see ``wanted``), else None (one process)."""
    if not wanted(args):
        return None
    return initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.distributed_timeout,
                      heartbeat_timeout_s=args.distributed_heartbeat_timeout)


def _platform() -> str:
    """The platform jax will pick, without starting a backend (that would be too early)."""
    names = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return names.split(",")[0].strip().lower() if names else ""


def runtime_client():
    """The distributed runtime's client (key-value store, barriers, liveness)."""
    from jax._src import distributed as _dist  # the public module exposes no accessor for the client

    client = _dist.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not initialised")
    return client


class StepChannel:
    """Ordered records from process 0 to every other process, through the key-value store.

    ``publish`` (leader) writes record n+1; ``receive`` (followers) blocks for the next one.
    Followers ``ack`` what they have executed (every ``ack_every`` records); the leader deletes
    records every follower has acknowledged. Record bytes are opaque here."""

    PREFIX = "jaxspec/step"

    def __init__(self, client=None, *, num_processes: int | None = None, process_id: int | None = None,
                 ack_every: int = 32, namespace: str = "jaxspec"):
        self.client = client if client is not None else runtime_client()
        self.num_processes = jax.process_count() if num_processes is None else num_processes
        self.process_id = jax.process_index() if process_id is None else process_id
        self.ack_every = ack_every
        self._prefix = f"{namespace}/step"
        self._acks = f"{namespace}/ack"
        self._beats = f"{namespace}/beat"
        self.seq = 0  # leader: last published; follower: last received
        self._pruned = 0  # leader: records below this are deleted

    def _key(self, n: int) -> str:
        return f"{self._prefix}/{n}"

    # ----------------------------------------------------------------- leader
    def publish(self, record: bytes) -> int:
        self.seq += 1
        self.client.key_value_set_bytes(self._key(self.seq), record)
        if self.seq % self.ack_every == 0:
            self._prune()
        return self.seq

    def _prune(self) -> None:
        acked = [self._acked(p) for p in range(1, self.num_processes)]
        upto = min(acked, default=self.seq)
        for n in range(self._pruned + 1, upto + 1):
            self.client.key_value_delete(self._key(n))
        self._pruned = max(self._pruned, upto)

    def _acked(self, process: int) -> int:
        try:
            return int(self.client.key_value_try_get_bytes(f"{self._acks}/{process}"))
        except Exception:  # noqa: BLE001  (not acknowledged anything yet: NOT_FOUND)
            return 0

    # Liveness. The runtime's own ``get_live_nodes`` is collective (it returns once every live
    # process has called it), so it cannot tell the leader alone who is gone. Every process bumps
    # a counter instead; the leader watches the followers' and the followers report the leader's.
    def beat(self, count: int) -> None:
        self.client.key_value_set_bytes(f"{self._beats}/{self.process_id}", str(count).encode(), allow_overwrite=True)

    def beat_of(self, process: int) -> int | None:
        """One process's last heartbeat count (None: none yet). Followers read the leader's."""
        try:
            return int(self.client.key_value_try_get_bytes(f"{self._beats}/{process}"))
        except Exception:  # noqa: BLE001  (NOT_FOUND: no beat yet)
            return None

    def beats(self) -> dict[int, int]:
        """Each follower's last heartbeat count (-1: none yet)."""
        out = {}
        for p in range(1, self.num_processes):
            try:
                out[p] = int(self.client.key_value_try_get_bytes(f"{self._beats}/{p}"))
            except Exception:  # noqa: BLE001  (NOT_FOUND: no beat yet)
                out[p] = -1
        return out

    # --------------------------------------------------------------- follower
    def receive(self, timeout_s: float | None = None, poll_s: float = 5.0) -> bytes:
        """The next record; waits ``timeout_s`` at most (None: forever). Raises TimeoutError, or
        DistributedError where the coordination service went away (the leader died)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        key = self._key(self.seq + 1)
        while True:
            wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            try:
                record = self.client.blocking_key_value_get_bytes(key, max(1, int(wait * 1000)))
                break
            except Exception as e:  # noqa: BLE001
                if "DEADLINE_EXCEEDED" not in str(e) and "deadline" not in str(e).lower():
                    raise DistributedError(f"lost the coordination service (leader gone?): {e}") from e
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no record {self.seq + 1} within {timeout_s}s") from e
        self.seq += 1
        return record

    def ack(self, force: bool = False) -> None:
        if force or self.seq % self.ack_every == 0:
            self.client.key_value_set_bytes(f"{self._acks}/{self.process_id}", str(self.seq).encode(),
                                            allow_overwrite=True)
