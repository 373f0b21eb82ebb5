"""A few rows times a dense float32 weight matrix on the CPU, in one XLA FFI call (``dense_matmul.cc``).

``dense_matmul(x, w)`` is ``x [N, D] @ w [D, F]``, and ``dense_matmul_nt(x, w)`` is
``x [N, D] @ w [F, D]^T`` for a weight stored with its contracted axis last (a tied embedding as the
output head), read as it lies. Each output element is summed over d in ascending order: a row's result does not depend on the other rows of the call, so a verification
and a decode step give a token the same bits. The weights are read where they lie, once per block of
output columns. Forward only (no derivative is defined).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import native

TARGET = "jaxspec_dense_matmul"
TARGET_NT = "jaxspec_dense_matmul_nt"


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (built on the first call), or None when it can."""
    return native.register("dense_matmul", (TARGET, TARGET_NT))


def available() -> bool:
    return unavailable_reason() is None


def _call(target: str, name: str, x: jax.Array, w: jax.Array, contracted: int, out: int) -> jax.Array:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU dense matmul kernel is unavailable here: {reason}")
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[contracted]:
        layout = "[D, F]" if contracted == 0 else "[F, D]"
        raise ValueError(f"{name} takes x [N, D] and w {layout}; got {x.shape} and {w.shape}")
    for arg, a in (("x", x), ("w", w)):
        if a.dtype != jnp.float32:
            raise TypeError(f"{name} takes float32 arrays; {arg} is {a.dtype}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[out]), jnp.float32))(x, w)


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, D] f32, w [D, F] f32 -> [N, F] f32."""
    return _call(TARGET, "dense_matmul", x, w, contracted=0, out=1)


def dense_matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N, D] f32, w [F, D] f32 -> x @ w.T [N, F] f32 (the same bits as ``dense_matmul(x, w.T)``)."""
    return _call(TARGET_NT, "dense_matmul_nt", x, w, contracted=1, out=0)
