"""Pure jax.numpy grouped matmul: the specification the Pallas kernels in ``gmm.py`` are tested against.

Conventions shared with the kernels:

* ``lhs`` rows are sorted by group: rows ``[s_g, e_g)`` belong to group ``g`` where
  ``e_g = min(m, group_sizes[0] + ... + group_sizes[g])`` and ``s_g = e_{g-1}``.
* ``group_sizes`` lists *every* group in row order, starting at global group 0.
  ``rhs`` holds the ``G_local = rhs.shape[0]`` groups ``group_offset .. group_offset
  + G_local - 1`` (an expert-parallel shard). Rows of groups outside that range, and
  rows past ``sum(group_sizes)``, give exact zeros, so summing the results of all
  shards of the experts gives the unsharded result. The unsharded case is
  ``group_offset=0`` with ``len(group_sizes) == G_local``. Groups past the end of
  ``group_sizes`` (offset too large) are empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def local_group_bounds(
    group_sizes: jax.Array, group_offset: jax.Array | int, num_local_groups: int, num_rows: int
) -> tuple[jax.Array, jax.Array]:
    """Row ranges ``[starts, ends)`` [G_local] int32 of the shard's groups, clipped to ``num_rows``."""
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D, got shape {group_sizes.shape}")
    # Group sizes are non-negative by contract; clamping keeps a bad entry from reordering rows.
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.maximum(group_sizes, 0))])
    bounds = jnp.minimum(bounds, num_rows)
    total_groups = group_sizes.shape[0]
    first = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local_groups, dtype=jnp.int32)
    # Gathers clipped to the bounds array: a group past the end starts and ends at the last bound (empty).
    starts = bounds[jnp.clip(first, 0, total_groups)]
    ends = bounds[jnp.clip(first + 1, 0, total_groups)]
    return starts, ends


def _group_row_masks(starts: jax.Array, ends: jax.Array, num_rows: int) -> jax.Array:
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [G_local, m]


def gmm_reference(
    lhs: jax.Array,  # [m, k]
    rhs: jax.Array,  # [G_local, k, n], or [G_local, n, k] with transpose_rhs
    group_sizes: jax.Array,  # [G] int32
    group_offset: jax.Array | int = 0,
    *,
    preferred_element_type=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group(r) - group_offset] (f32 accumulation); zero rows outside the shard."""
    m = lhs.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    starts, ends = local_group_bounds(group_sizes, group_offset, rhs.shape[0], m)
    mask = _group_row_masks(starts, ends, m).astype(lhs.dtype)  # 0/1: exact in every dtype
    rhs_spec = "gnk" if transpose_rhs else "gkn"
    # Masking lhs per group first keeps every product a plain (exact-zero or full) term.
    masked = mask[:, :, None] * lhs[None]  # [G_local, m, k]
    out = jnp.einsum(f"gmk,{rhs_spec}->mn", masked, rhs, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,  # [m, k]
    rhs: jax.Array,  # [m, n]
    group_sizes: jax.Array,
    group_offset: jax.Array | int = 0,
    *,
    num_groups: int,
    preferred_element_type=None,
) -> jax.Array:
    """out[g] = lhs[rows of g]^T @ rhs[rows of g] -> [num_groups, k, n]; zeros for empty groups."""
    m = lhs.shape[0]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    starts, ends = local_group_bounds(group_sizes, group_offset, num_groups, m)
    mask = _group_row_masks(starts, ends, m).astype(lhs.dtype)
    masked = mask[:, :, None] * lhs[None]  # [G_local, m, k]
    out = jnp.einsum("gmk,mn->gkn", masked, rhs, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def gmm_int8_reference(
    lhs: jax.Array,  # [m, k]
    rhs_q: jax.Array,  # [G_local, k, n] int8
    scale: jax.Array,  # [G_local, 1, n]
    group_sizes: jax.Array,  # [G] int32
    group_offset: jax.Array | int = 0,
    *,
    preferred_element_type=None,
) -> jax.Array:
    """``gmm_reference`` against the dequantized weights ``rhs_q * scale``, in float32."""
    w = rhs_q.astype(jnp.float32) * scale.astype(jnp.float32)
    out = gmm_reference(lhs.astype(jnp.float32), w, group_sizes, group_offset, preferred_element_type=jnp.float32)
    return out.astype(jnp.dtype(preferred_element_type or lhs.dtype))
