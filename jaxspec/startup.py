"""Process start of the command-line entry points: no noise from accelerator plugins on a CPU machine.

Installed GPU/TPU plugins (the ``aot`` and ``test`` extras bring ``jax-cuda12-plugin`` and ``libtpu``)
speak up on a machine without the hardware: jaxlib loads the CUDA plugin's native modules at
``import jax`` and each logs ``cudart_stub.cc ... Could not find cuda drivers`` through absl before
logging is initialised (straight to file descriptor 2, beyond Python's reach); backend discovery then
logs a CUDA plugin traceback and libtpu's host-bound warnings unless ``JAX_PLATFORMS`` names the
platform. ``quiet_start`` runs before jax is imported: with no accelerator device node present and
``JAX_PLATFORMS`` unset it selects the CPU, and it drops exactly those known lines from file
descriptor 2 while jax is imported and its backend starts (anything else written there is passed on).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from typing import Iterator, NoReturn

# Device nodes of the accelerators jax has plugins for: NVIDIA GPUs, TPU VMs (v4+ /dev/accel*, older
# /dev/vfio), AMD GPUs. A machine with one of them keeps jax's own platform choice.
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")

NOISE = re.compile(
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
)


# Set where a TPU is reached without a local device node (TPU pods' and Colab's runtimes).
_ACCELERATOR_ENV = ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR", "TPU_WORKER_HOSTNAMES")


def accelerator_present() -> bool:
    return any(os.environ.get(name) for name in _ACCELERATOR_ENV) or any(
        glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


@contextlib.contextmanager
def filtered_fd2(noise: re.Pattern = NOISE) -> Iterator[None]:
    """Capture file descriptor 2 for a block, then write back every line ``noise`` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not noise.search(line.rstrip("\n"))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# A one-shot CLI's collector thresholds (Python's defaults: 700, 10, 10).
ONE_SHOT_GC_THRESHOLDS = (50_000, 20, 100)


def one_shot_gc() -> None:
    """Collect garbage less often in a one-shot CLI: importing jax and flax, loading the models and
    tracing the steps create some hundreds of thousands of objects that live to the end, and the
    default thresholds walk them again and again (about 0.15 s of a 2 s generate on a CPU).
    Cycles are still collected, every 50,000 net allocations instead of 700."""
    import gc

    gc.set_threshold(*ONE_SHOT_GC_THRESHOLDS)


def quiet_start(backend: bool = True) -> None:
    """Call first in a CLI's ``__main__`` block, before anything imports jax. ``backend=False``:
    import jax but start no backend (``jax.distributed.initialize`` must come first)."""
    if "jax" in sys.modules:
        return
    if not os.environ.get("JAX_PLATFORMS") and not accelerator_present():
        os.environ["JAX_PLATFORMS"] = "cpu"
    with filtered_fd2():
        import jax

        if backend:
            jax.devices()  # plugin discovery imports the CUDA plugin module again (one more line)


def multiprocess_requested(argv: list[str]) -> bool:
    """Whether a command line (or the environment) asks for jax's multi-process runtime
    (``jaxspec.distributed``); decided before jax is imported, so that no backend starts first."""
    flags = {"--coordinator", "--num-processes"}
    return (any(a.split("=", 1)[0] in flags for a in argv) or bool(os.environ.get("JAXSPEC_COORDINATOR"))
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def fast_exit(code: int) -> NoReturn:
    """End a one-shot CLI at once with exit status ``code``: wait for jax's pending effects, flush
    logging and the standard streams, then leave without the interpreter's teardown (freeing the
    modules, jax's backends and XLA's objects one by one: about 0.5 s on a CPU after a generate,
    for memory the OS reclaims anyway). jax writes persistent-cache entries as it compiles, so
    nothing is lost. Call only from a ``__main__`` block: atexit handlers do not run."""
    import logging

    if "jax" in sys.modules:
        sys.modules["jax"].effects_barrier()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the status Python itself gives
            code = code or 120
    os._exit(code)
