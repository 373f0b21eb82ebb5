"""Which Pallas kernels the engine picks by itself, and the warm-up self-test of the enabled ones.

A kernel is chosen by ``auto`` only on a platform where it has been validated on the hardware
(``VALIDATED``: ``tools/device_check.py`` passing there; see docs/kernels.md). No kernel has run on a
TPU or GPU yet, so ``auto`` uses XLA's own paths everywhere (``ragged_dot`` for MoE experts on an
accelerator) and a Pallas kernel runs only when asked for (``moe_backend="pallas"``) or trusted
with ``JAXSPEC_TRUST_KERNELS=gmm`` (or ``gmm:tpu``) after validating it on one's own hardware.

On an accelerator the warm-up of ``generate`` and ``serve`` checks the Pallas kernel a runner will
use against its jnp reference on random inputs of the served shapes (``--kernel-selftest off`` to
skip) and, if they disagree, falls back to the XLA path with one log line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger("jaxspec")

# kernel -> platforms ("tpu", "gpu") where it has run and passed tools/device_check.py.
VALIDATED: dict[str, frozenset[str]] = {
    "gmm": frozenset(),
    "rejection_sampling": frozenset(),
    "verify_attention": frozenset(),
}
TRUST_ENV = "JAXSPEC_TRUST_KERNELS"
ACCELERATORS = ("tpu", "gpu")


def platform_kind(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def validated(kernel: str, platform: str) -> bool:
    """Whether ``auto`` may pick ``kernel`` on ``platform``."""
    kind = platform_kind(platform)
    if kind not in ACCELERATORS:
        return False
    if kind in VALIDATED.get(kernel, ()):
        return True
    for item in filter(None, (s.strip() for s in os.environ.get(TRUST_ENV, "").split(","))):
        name, _, where = item.partition(":")
        if name == kernel and where in ("", kind):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    kernel: str
    ok: bool
    detail: str


def _tolerance(dtype) -> float:
    return 1e-4 if np.dtype(dtype) == np.float32 else 3e-2


def check_gmm(num_experts: int, d_model: int, mlp_dim: int, top_k: int, token_counts: Sequence[int], dtype="float32",
              *, interpret: bool = False, impl: Callable | None = None, seed: int = 0) -> KernelCheck:
    """The grouped matmul (the MoE expert projections: [D -> F] and [F -> D]) against
    ``gmm_reference`` for every token count, with random routing; relative max error."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.gmm import gmm
    from pallas_kernels.gmm_reference import gmm_reference

    impl = impl or gmm
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    worst = 0.0
    for n in sorted(set(int(t) for t in token_counts)):
        m = n * top_k
        sizes = np.bincount(rng.integers(0, num_experts, m), minlength=num_experts).astype(np.int32)
        for k, f in ((d_model, mlp_dim), (mlp_dim, d_model)):
            lhs = jnp.asarray(rng.normal(size=(m, k)), dt)
            rhs = jnp.asarray(rng.normal(size=(num_experts, k, f)) / np.sqrt(k), dt)
            got = np.asarray(impl(lhs, rhs, jnp.asarray(sizes), interpret=interpret).astype(jnp.float32))
            want = np.asarray(jax.jit(gmm_reference)(lhs, rhs, jnp.asarray(sizes)).astype(jnp.float32))
            err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30)) if np.all(np.isfinite(got)) \
                else float("inf")
            worst = max(worst, err)
            if not err <= _tolerance(dt):
                return KernelCheck("gmm", False, f"{m} rows x [{k} -> {f}] x {num_experts} experts ({dt.name}): "
                                   f"relative error {err:.3g} (tolerance {_tolerance(dt):.0e})")
    return KernelCheck("gmm", True, f"relative error {worst:.3g}")


def moe_uses_pallas(runner) -> bool:
    """Whether a ``ModelRunner``'s MoE steps run the Pallas grouped matmul."""
    from jaxspec.models.moe_dispatch import choose_backend

    if not runner.cfg.is_moe:
        return False
    backend = runner.moe_backend if runner.moe_backend is not None else runner.cfg.moe_backend
    if not isinstance(backend, str):
        return False  # a tuned table or a placed (mesh) backend: resolved per call
    return choose_backend(backend, 1, runner_platform(runner)) == "pallas"


def runner_platform(runner) -> str:
    platform, _, _ = runner.device_info()
    return platform


def target_runner(step_runner):
    """The ``ModelRunner`` of the target inside an engine's ``StepRunner``."""
    return getattr(step_runner, "target", None) or getattr(step_runner, "runner", None) or step_runner


def selftest(runner, *, interpret: bool = False, check: Callable[..., KernelCheck] = check_gmm,
             force: bool = False) -> list[KernelCheck]:
    """Check the Pallas kernels a ``ModelRunner`` will run (on an accelerator, or anywhere with
    ``force``); a kernel that disagrees with its reference is replaced by the XLA path, with one
    warning. Call before the first step. Returns the checks made."""
    runner = target_runner(runner)
    if runner.placement is not None:
        return []  # a mesh's expert dispatch is resolved per device (no fallback there yet)
    platform = platform_kind(runner_platform(runner))
    if not (force or platform in ACCELERATORS) or not moe_uses_pallas(runner):
        return []
    cfg = runner.cfg
    counts = sorted({b * t for b in runner.batch_buckets for t in (1, 2, 5, 9)} | {runner.buckets[0]})
    result = check(cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim, cfg.num_experts_per_tok, counts, cfg.dtype,
                   interpret=interpret)
    if result.ok:
        log.info("kernel self-test: Pallas %s on %s matches its reference (%s)", result.kernel, platform,
                 result.detail)
    else:
        log.warning("kernel self-test: Pallas %s on %s disagrees with its reference (%s); using XLA's ragged_dot "
                    "instead", result.kernel, platform, result.detail)
        runner.set_moe_backend("ragged")
    return [result]
