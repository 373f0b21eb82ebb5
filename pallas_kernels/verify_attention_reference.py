"""Verification attention in plain jax.numpy: the specification of the kernel in ``verify_attention.py``.

The semantics are those of ``jaxspec.models.layers.cached_attention``: T new query
tokens per slot (the k drafts plus one) attend to their slot's cache, which already
holds their own keys; the key at position j is visible to the query at absolute
position p iff j <= p (and j > p - sliding_window when a window is set). Query heads
are grouped: head h uses kv head h // (H / KVH). Scores and softmax are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # as cached_attention: finite, so a fully masked row cannot produce NaN


def verify_attention_reference(
    q: jax.Array,  # [B, T, H, Dh]
    k_cache: jax.Array,  # [B, M, KVH, Dh]
    v_cache: jax.Array,  # [B, M, KVH, Dh]
    q_positions: jax.Array,  # [B, T] int32
    sliding_window: int | None = None,
) -> jax.Array:
    """-> [B, T, H, Dh] in q's dtype."""
    b, t, h, dh = q.shape
    kv_heads = k_cache.shape[2]
    group = h // kv_heads
    qg = q.reshape(b, t, kv_heads, group, dh)
    scores = jnp.einsum("btkgd,bmkd->bkgtm", qg, k_cache, preferred_element_type=jnp.float32) / math.sqrt(dh)
    key_pos = jnp.arange(k_cache.shape[1], dtype=jnp.int32)[None, None, :]
    pos = q_positions.astype(jnp.int32)[:, :, None]
    visible = key_pos <= pos
    if sliding_window is not None:
        visible &= key_pos > pos - sliding_window
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgtm,bmkd->btkgd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q.dtype)
