"""jax.numpy specification of ``dense_matmul``: the product at HIGHEST precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_matmul_reference(x, w) -> jax.Array:
    """x [N, D] @ w [D, F] -> [N, F] float32."""
    return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
