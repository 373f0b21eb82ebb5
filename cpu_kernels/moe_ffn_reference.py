"""jax.numpy specification of ``moe_ffn``: each routed (row, expert) pair computed on its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def moe_ffn_reference(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """x [N, D], expert_ids/weights [N, k], w_gate/w_up [E, D, F], w_down [E, F, D] -> [N, D]; an id
    outside [0, E) adds nothing."""
    hp = jax.lax.Precision.HIGHEST
    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(expert_ids.shape[1]):
        valid = (expert_ids[:, j] >= 0) & (expert_ids[:, j] < w_gate.shape[0])
        e = jnp.where(valid, expert_ids[:, j], 0)
        g = jnp.einsum("nd,ndf->nf", x, w_gate[e], precision=hp)
        u = jnp.einsum("nd,ndf->nf", x, w_up[e], precision=hp)
        out = jnp.einsum("nf,nfd->nd", jax.nn.silu(g) * u, w_down[e], precision=hp)
        y = y + jnp.where(valid, weights[:, j], 0.0)[:, None].astype(jnp.float32) * out
    return y
