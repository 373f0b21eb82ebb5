"""jax.numpy specification of ``slot_attention``: the rows' caches gathered, then masked softmax attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def slot_attention_reference(q, k_cache, v_cache, slots, positions, layer: int, kv_len: int,
                             window: int | None = None) -> jax.Array:
    """q [B, T, H, Dh], k_cache/v_cache [L, S, M, KVH, Dh], slots [B], positions [B, T] -> [B, T, H, Dh]."""
    b, t, h, dh = q.shape
    s, kvh = k_cache.shape[1], k_cache.shape[3]
    kv_len = min(kv_len, k_cache.shape[2])
    valid_row = (slots >= 0) & (slots < s)
    rows = jnp.where(valid_row, slots, 0)
    k = k_cache[layer][rows, :kv_len]  # [B, kv_len, KVH, Dh]
    v = v_cache[layer][rows, :kv_len]
    qg = q.reshape(b, t, kvh, h // kvh, dh)
    hp = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("btkgd,bmkd->bkgtm", qg, k, precision=hp) / math.sqrt(dh)
    j = jnp.arange(kv_len)[None, None, :]
    p = positions[:, :, None]
    visible = j <= p
    if window:
        visible &= j > p - window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    sees = visible.any(-1)  # [B, T]
    probs = jax.nn.softmax(jnp.where(sees[:, None, None, :, None], scores, 0.0), axis=-1)
    out = jnp.einsum("bkgtm,bmkd->btkgd", probs, v, precision=hp).reshape(b, t, h, dh)
    keep = (valid_row[:, None] & sees)[:, :, None, None]
    return jnp.where(keep, out, 0.0)
