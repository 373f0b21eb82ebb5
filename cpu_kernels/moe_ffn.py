"""Routed SwiGLU experts on the CPU in one XLA FFI call (``moe_ffn.cc``).

``moe_ffn(x, expert_ids, weights, w_gate, w_up, w_down)`` computes
``y[n] = sum_j weights[n, j] * (silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])) @ w_down[e]``,
``e = expert_ids[n, j]`` (an id outside [0, E), a padding row's, adds nothing), for float32 arrays
on the CPU. Only the experts some row chose are read, each once per call, in place: no slice of the
stacked weights is copied. A row's result does not
depend on the other rows of the call (the sums run in a fixed order), so a verification step and a
decode step give a token the same output. Forward only (no derivative is defined).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import native

TARGET = "jaxspec_moe_ffn"


def available() -> bool:
    """Whether the kernel is built and registered here (built on the first call)."""
    return native.register("moe_ffn", (TARGET,)) is None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    return native.register("moe_ffn", (TARGET,))


def moe_ffn(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array) -> jax.Array:
    """x [N, D] f32, expert_ids [N, k] int, weights [N, k], w_gate/w_up [E, D, F] f32, w_down [E, F, D]
    f32 -> [N, D] f32."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU MoE kernel is unavailable here: {reason}")
    for name, w in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != jnp.float32:
            raise TypeError(f"moe_ffn takes float32 arrays; {name} is {w.dtype}")
    n, d = x.shape
    e, _, f = w_gate.shape
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != n:
        raise ValueError(f"expert_ids {expert_ids.shape} and weights {weights.shape} must both be [{n}, k]")
    if w_gate.shape != (e, d, f) or w_up.shape != (e, d, f) or w_down.shape != (e, f, d):
        raise ValueError(f"expert weights must be [E, {d}, F], [E, {d}, F], [E, F, {d}]; got "
                         f"{w_gate.shape}, {w_up.shape}, {w_down.shape}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((n, d), jnp.float32))
    return call(x, expert_ids.astype(jnp.int32), weights.astype(jnp.float32), w_gate, w_up, w_down)
