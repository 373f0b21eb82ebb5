"""Which Pallas kernels the engine picks by itself, and the warm-up self-test of the enabled ones.

A kernel is chosen by ``auto`` only on a platform where it has been validated on the hardware
(``VALIDATED``: its tests passing there compiled, by ``tools/device_check.py``; see docs/kernels.md).
All four kernels passed on an NVIDIA H200 (jax 0.11.2); none has run on a TPU, so there ``auto``
uses XLA's own paths (``ragged_dot`` for MoE experts) and a Pallas kernel runs only when asked for
(``moe_backend="pallas"``) or trusted with ``JAXSPEC_TRUST_KERNELS=gmm:tpu`` after validating it on
one's own hardware. Of the validated kernels only the grouped matmul is picked by ``auto``, and on
a GPU only for steps where it measured faster than ``ragged_dot`` (``moe_dispatch.choose_backend``);
verification attention and the sampler stay opt-in.

The grouped matmuls for quantized experts (``gmm_int8``, ``gmm_int4``) are registered separately
and validated nowhere yet: ``auto`` keeps int8 / int4 experts on ``ragged_dot`` until they are.

On an accelerator the warm-up of ``generate`` and ``serve`` checks each Pallas kernel a runner will
use (grouped matmul, or its int8 / int4 variant for quantized experts, verification attention,
verification sampler) against its jnp reference on random inputs of the served shapes (``--kernel-selftest off`` to skip) and, if one disagrees, falls
back to the XLA path for it with one log line.
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
    "gmm": frozenset({"gpu"}),
    # Quantized-weight grouped matmuls: interpreter-tested and compiled ahead of time for v5e and H100 only.
    "gmm_int8": frozenset(),
    "gmm_int4": frozenset(),
    "rejection_sampling": frozenset({"gpu"}),
    "verify_attention": frozenset({"gpu"}),
    "paged_attention": frozenset({"gpu"}),
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


def _grouped_matmul(quantization: str | None, group_size: int):
    """(kernel name, fn(lhs, w float [G, k, n], sizes, interpret) -> out, reference(lhs, w, sizes)) for
    the grouped matmul that experts of this format run through (the weights quantized first)."""
    import jax.numpy as jnp

    from jaxspec.models.quant import quantize
    from pallas_kernels.gmm_reference import gmm_reference

    if quantization is None:
        from pallas_kernels.gmm import gmm

        return "gmm", lambda lhs, w, sizes, interpret: gmm(lhs, w, sizes, interpret=interpret), gmm_reference
    bits = {"int8": 8, "int4": 4}[quantization]
    if bits == 8:
        from pallas_kernels.gmm_int8 import gmm_int8 as kernel
        from pallas_kernels.gmm_reference import gmm_int8_reference as reference
    else:
        from pallas_kernels.gmm_int4 import gmm_int4 as kernel, gmm_int4_reference as reference

    def run(fn, lhs, w, sizes, **kw):
        qa = quantize(w, (1,), bits, group_size)
        return fn(lhs, qa.q, qa.scale, sizes, **kw).astype(jnp.float32)

    return (f"gmm_{quantization}", lambda lhs, w, sizes, interpret: run(kernel, lhs, w, sizes, interpret=interpret),
            lambda lhs, w, sizes: run(reference, lhs, w, sizes))


def check_gmm(num_experts: int, d_model: int, mlp_dim: int, top_k: int, token_counts: Sequence[int], dtype="float32",
              *, interpret: bool = False, impl: Callable | None = None, seed: int = 0,
              quantization: str | None = None, group_size: int = 128) -> KernelCheck:
    """The grouped matmul (the MoE expert projections: [D -> F] and [F -> D]) against its
    reference for every token count, with random routing; relative max error. ``quantization``
    ("int8" / "int4"): the quantized-weight kernel (``gmm_int8`` / ``gmm_int4``) on the same
    weights quantized, against its reference on the same quantized values."""
    import jax
    import jax.numpy as jnp

    name, kernel, reference = _grouped_matmul(quantization, group_size)
    if impl is not None:
        kernel = lambda lhs, w, sizes, interpret: impl(lhs, w, sizes, interpret=interpret)  # noqa: E731
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    worst = 0.0
    for n in sorted(set(int(t) for t in token_counts)):
        m = n * top_k
        sizes = np.bincount(rng.integers(0, num_experts, m), minlength=num_experts).astype(np.int32)
        for k, f in ((d_model, mlp_dim), (mlp_dim, d_model)):
            lhs = jnp.asarray(rng.normal(size=(m, k)), dt)
            rhs = jnp.asarray(rng.normal(size=(num_experts, k, f)) / np.sqrt(k), dt)
            got = np.asarray(kernel(lhs, rhs, jnp.asarray(sizes), interpret).astype(jnp.float32))
            want = np.asarray(jax.jit(reference)(lhs, rhs, jnp.asarray(sizes)).astype(jnp.float32))
            err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30)) if np.all(np.isfinite(got)) \
                else float("inf")
            worst = max(worst, err)
            if not err <= _tolerance(dt):
                return KernelCheck(name, False, f"{m} rows x [{k} -> {f}] x {num_experts} experts ({dt.name}): "
                                   f"relative error {err:.3g} (tolerance {_tolerance(dt):.0e})")
    return KernelCheck(name, True, f"relative error {worst:.3g}")


def _rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


def check_attention(num_heads: int, num_kv_heads: int, head_dim: int, rows: Sequence[int], tokens: Sequence[int],
                    kv_len: int, dtype="float32", sliding_window: int | None = None, *, interpret: bool = False,
                    impl: Callable | None = None, seed: int = 0) -> KernelCheck:
    """Verification attention against ``verify_attention_reference`` (random caches, every row at
    a different context length)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.verify_attention import verify_attention
    from pallas_kernels.verify_attention_reference import verify_attention_reference

    impl = impl or verify_attention
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    worst = 0.0
    for b in sorted(set(rows)):
        for t in sorted(set(tokens)):
            q = jnp.asarray(rng.normal(size=(b, t, num_heads, head_dim)), dt)
            k, v = (jnp.asarray(rng.normal(size=(b, kv_len, num_kv_heads, head_dim)), dt) for _ in range(2))
            start = rng.integers(0, max(1, kv_len - t + 1), b)
            pos = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
            got = impl(q, k, v, pos, sliding_window=sliding_window, interpret=interpret)
            want = jax.jit(verify_attention_reference, static_argnums=4)(q, k, v, pos, sliding_window)
            err = _rel_error(got, want)
            worst = max(worst, err)
            if not err <= _tolerance(dt):
                return KernelCheck("verify_attention", False, f"{b} rows x {t} tokens over {kv_len} positions "
                                   f"({dt.name}): relative error {err:.3g} (tolerance {_tolerance(dt):.0e})")
    return KernelCheck("verify_attention", True, f"relative error {worst:.3g}")


def check_paged_attention(num_heads: int, num_kv_heads: int, head_dim: int, rows: Sequence[int], tokens: Sequence[int],
                          kv_len: int, dtype="float32", sliding_window: int | None = None, *, page_size: int = 16,
                          interpret: bool = False, impl: Callable | None = None, seed: int = 0) -> KernelCheck:
    """Paged attention against ``paged_attention_reference``: every row at a different length, its
    pages scattered through a shared pool in random order, unallocated table entries = the sentinel."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import paged_attention
    from pallas_kernels.paged_attention_reference import paged_attention_reference

    impl = impl or paged_attention
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    n_pages = kv_len // page_size
    worst = 0.0
    for b in sorted(set(rows)):
        num_pages = b * n_pages + 1
        k, v = (jnp.asarray(rng.normal(size=(num_pages, page_size, num_kv_heads, head_dim)), dt) for _ in range(2))
        for t in sorted(set(tokens)):
            q = jnp.asarray(rng.normal(size=(b, t, num_heads, head_dim)), dt)
            ends = rng.integers(t, kv_len + 1, b)  # cache lengths after the step
            table = np.full((b, n_pages), num_pages, np.int32)
            perm = iter(rng.permutation(num_pages))
            for row, end in enumerate(ends):
                for j in range(-(-int(end) // page_size)):
                    table[row, j] = next(perm)
            pos = jnp.asarray(ends[:, None] - t + np.arange(t)[None], jnp.int32)
            args = (q, k, v, jnp.asarray(table), pos, kv_len, sliding_window)
            got = impl(*args, interpret=interpret)
            want = jax.jit(paged_attention_reference, static_argnums=(5, 6))(*args)
            err = _rel_error(got, want)
            worst = max(worst, err)
            if not err <= _tolerance(dt):
                return KernelCheck("paged_attention", False, f"{b} rows x {t} tokens over {kv_len} positions in "
                                   f"{page_size}-key pages ({dt.name}): relative error {err:.3g} "
                                   f"(tolerance {_tolerance(dt):.0e})")
    return KernelCheck("paged_attention", True, f"relative error {worst:.3g}")


def check_rejection(vocab_size: int, rows: Sequence[int], ks: Sequence[int], *, interpret: bool = False,
                    impl: Callable | None = None, seed: int = 0) -> KernelCheck:
    """The verification sampler against its reference: the same tokens and accept counts, with
    every draft count 0..K, half the rows drafting from the target's own distribution (all accepted)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.rejection_sampling import rejection_sample
    from pallas_kernels.rejection_sampling_reference import rejection_sample as reference

    impl = impl or rejection_sample
    rng = np.random.default_rng(seed)
    for b in sorted(set(rows)):
        for k in sorted(set(ks)):
            n = max(b, 2 * (k + 1))
            p = rng.dirichlet(np.full(vocab_size, 0.1), (n, k + 1)).astype(np.float32)
            q = rng.dirichlet(np.full(vocab_size, 0.1), (n, k)).astype(np.float32)
            q[::2] = p[::2, :k]
            drafts = np.stack([[rng.choice(vocab_size, p=q[i, j] / q[i, j].sum()) for j in range(k)]
                               for i in range(n)]).reshape(n, k).astype(np.int32)
            args = (jnp.asarray(p), jnp.asarray(q), jnp.asarray(drafts),
                    jnp.asarray(np.arange(n) % (k + 1), jnp.int32),
                    jnp.asarray(rng.random((n, k)), jnp.float32),
                    jnp.asarray(rng.exponential(size=(n, k + 1, vocab_size)), jnp.float32))
            got = [np.asarray(x) for x in impl(*args, interpret=interpret)]
            want = [np.asarray(x) for x in jax.jit(reference)(*args)]
            if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                return KernelCheck("rejection_sampling", False,
                                   f"{n} rows, K={k}, V={vocab_size}: tokens or accept counts differ")
    return KernelCheck("rejection_sampling", True, "identical tokens")


def moe_uses_pallas(runner) -> bool:
    """Whether a ``ModelRunner``'s MoE steps run the Pallas grouped matmul."""
    from jaxspec.models.moe_dispatch import choose_backend

    if not runner.cfg.is_moe:
        return False
    backend = runner.moe_backend if runner.moe_backend is not None else runner.cfg.moe_backend
    if not isinstance(backend, str):
        return False  # a tuned table or a placed (mesh) backend: resolved per call
    # Any step may route enough rows for ``auto`` to pick the kernel (a prefill does): the largest.
    kernel = f"gmm_{runner.cfg.quantization}" if runner.cfg.quantization else "gmm"
    return choose_backend(backend, 1 << 30, runner_platform(runner), kernel=kernel) == "pallas"


def runner_platform(runner) -> str:
    platform, _, _ = runner.device_info()
    return platform


def target_runner(step_runner):
    """The ``ModelRunner`` of the target inside an engine's ``StepRunner``."""
    return getattr(step_runner, "target", None) or getattr(step_runner, "runner", None) or step_runner


def _failing_as_check(kernel: str, fn: Callable[..., KernelCheck]) -> Callable[..., KernelCheck]:
    """A kernel that does not lower, compile or run here fails its check (and falls back) too."""

    def check(*args, **kwargs) -> KernelCheck:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  any failure of the kernel is a reason to fall back
            first_line = (str(e).splitlines() or [""])[0][:300]
            return KernelCheck(kernel, False, f"{type(e).__name__}: {first_line}")

    return check


def selftest(step_runner, *, interpret: bool = False, force: bool = False,
             checks: dict[str, Callable[..., KernelCheck]] | None = None) -> list[KernelCheck]:
    """Check the Pallas kernels an engine's runner will use (on an accelerator, or anywhere with
    ``force``) on random inputs of its shapes; each one that disagrees with its reference is
    replaced by the XLA path, with one warning. Call before the first step. Returns the checks made.
    ``checks`` replaces check functions by kernel name (tests)."""
    fns = {name: _failing_as_check(name, fn) for name, fn in
           {"gmm": check_gmm, "verify_attention": check_attention, "paged_attention": check_paged_attention,
            "rejection_sampling": check_rejection, **(checks or {})}.items()}
    runner = target_runner(step_runner)
    platform = platform_kind(runner_platform(runner))
    if not (force or platform in ACCELERATORS) or runner.placement is not None:
        return []  # (a mesh's dispatch is resolved per device: no fallback there yet)
    cfg = runner.cfg
    ks = sorted({0, *getattr(step_runner, "buckets", ())})
    rows = runner.batch_buckets
    results = []
    if moe_uses_pallas(runner):
        counts = sorted({b * (k + 1) for b in rows for k in ks} | {runner.buckets[0]})
        quant = {"quantization": cfg.quantization, "group_size": cfg.quant_group_size} if cfg.quantization else {}
        result = fns["gmm"](cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim, cfg.num_experts_per_tok, counts,
                            cfg.dtype, interpret=interpret, **quant)
        results.append(result)
        if not result.ok:
            runner.set_backends(moe="ragged")
    # An int8 paged cache is gathered and dequantized, then attended by verify_attention (the paged
    # kernel has no int8 input yet): that is the kernel to check then.
    if runner.statics.attention_backend == "pallas" and runner.paging is not None and runner.kv_dtype is None:
        result = fns["paged_attention"](cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rows,
                                        sorted({k + 1 for k in ks}), runner.kv_buckets[-1], cfg.dtype,
                                        cfg.sliding_window, page_size=runner.paging[1], interpret=interpret)
        results.append(result)
        if not result.ok:
            runner.set_backends(attention="xla")
    elif runner.statics.attention_backend == "pallas":
        result = fns["verify_attention"](cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rows,
                                         sorted({k + 1 for k in ks}), runner.kv_buckets[-1], cfg.dtype,
                                         cfg.sliding_window, interpret=interpret)
        results.append(result)
        if not result.ok:
            runner.set_backends(attention="xla")
    if getattr(step_runner, "verify_backend", None) == "pallas":
        result = fns["rejection_sampling"](cfg.vocab_size, rows, [k for k in ks if k > 0], interpret=interpret)
        results.append(result)
        if not result.ok:
            step_runner.verify_backend = "xla"
    for result in results:
        if result.ok:
            log.info("kernel self-test: Pallas %s on %s matches its reference (%s)", result.kernel, platform,
                     result.detail)
        else:
            log.warning("kernel self-test: Pallas %s on %s disagrees with its reference (%s); using the XLA "
                        "path instead", result.kernel, platform, result.detail)
    return results
