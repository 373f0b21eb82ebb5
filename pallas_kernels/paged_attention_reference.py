"""Paged attention in plain jax.numpy: the specification of the kernel in ``paged_attention.py``.

The KV cache of one layer is a pool of pages ``[P, page_size, KVH, Dh]``; row b's key
at absolute position j is ``k_pages[page_table[b, j // page_size], j % page_size]``.
Gathering each row's first ``kv_len`` positions through the table gives a contiguous
``[B, kv_len, KVH, Dh]`` cache, and the result is then exactly
``jaxspec.models.layers.cached_attention`` on it: key j is visible to the query at
position p iff j <= p (and j > p - sliding_window with a window), grouped-query heads,
float32 scores and softmax, scale 1/sqrt(Dh).

One addition: a query that sees no key at all (a padding row with position -1, or a
window that ends before position 0 of the cache) gets zeros, where cached_attention
would average every value. The kernel does the same, and the zeros stay finite
whatever the unallocated pages hold.

Table entries a row has not allocated may hold anything (the sentinel P, negative
values): they are clamped into the pool, and only ever sit at positions the mask hides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.verify_attention_reference import verify_attention_reference


def gather_pages(pages: jax.Array, page_table: jax.Array, kv_len: int) -> jax.Array:
    """[P, page_size, KVH, Dh] pool, [B, n_pages] table -> each row's contiguous [B, kv_len, KVH, Dh]."""
    num_pages, page_size = pages.shape[:2]
    table = jnp.clip(page_table[:, : kv_len // page_size].astype(jnp.int32), 0, num_pages - 1)
    b = table.shape[0]
    return pages[table].reshape(b, kv_len, *pages.shape[2:])


def sees_a_key(q_positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """[B, T] bool: whether any position in [0, kv_len) is visible to the query."""
    pos = q_positions.astype(jnp.int32)
    first = jnp.zeros_like(pos) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
    return first <= jnp.minimum(pos, kv_len - 1)


def paged_attention_reference(
    q: jax.Array,  # [B, T, H, Dh]
    k_pages: jax.Array,  # [P, page_size, KVH, Dh]
    v_pages: jax.Array,  # [P, page_size, KVH, Dh]
    page_table: jax.Array,  # [B, n_pages] int32
    q_positions: jax.Array,  # [B, T] int32
    kv_len: int,
    sliding_window: int | None = None,
) -> jax.Array:
    """-> [B, T, H, Dh] in q's dtype."""
    page_size = k_pages.shape[1]
    if kv_len <= 0 or kv_len % page_size or kv_len > page_table.shape[1] * page_size:
        raise ValueError(
            f"paged_attention_reference: kv_len={kv_len} must be a positive multiple of page_size={page_size} "
            f"and at most n_pages * page_size = {page_table.shape[1] * page_size}"
        )
    k = gather_pages(k_pages, page_table, kv_len)
    v = gather_pages(v_pages, page_table, kv_len)
    out = verify_attention_reference(q, k, v, q_positions, sliding_window)
    return jnp.where(sees_a_key(q_positions, kv_len, sliding_window)[:, :, None, None], out, 0).astype(q.dtype)
