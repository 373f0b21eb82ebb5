"""Attention of new tokens against their slot's cache, read in place, on the CPU (``slot_attention.cc``).

``slot_attention(q, k_cache, v_cache, slots, positions, layer, kv_len, window)``: for row b (slot
``slots[b]``) and its query at absolute position p = positions[b, t], causal grouped-query attention
over the keys j of layer ``layer`` that it sees: j <= p, j < kv_len and, with a window W, j > p - W
(``jaxspec.models.layers.cached_attention``'s semantics over a slot cache that already holds the new
keys). Float32; the whole [L, S, M, KVH, Dh] cache is passed and read in place, each query reading
only the keys it sees. A row whose slot is outside [0, S) (padding) gets zeros, and so does a query
that sees no key. A query's result does not depend on the other rows or tokens of the call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import native

TARGET = "jaxspec_slot_attention"
MAX_GROUP = 64  # query heads per kv head (the kernel's kMaxGroup)


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (built on the first call), or None when it can."""
    return native.register("slot_attention", (TARGET,))


def available() -> bool:
    return unavailable_reason() is None


def slot_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, positions: jax.Array,
                   layer: int, kv_len: int, window: int | None = None) -> jax.Array:
    """q [B, T, H, Dh] f32, k_cache/v_cache [L, S, M, KVH, Dh] f32, slots [B] int, positions [B, T]
    int -> [B, T, H, Dh] f32. ``layer``, ``kv_len`` and ``window`` are static."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU attention kernel is unavailable here: {reason}")
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if a.dtype != jnp.float32:
            raise TypeError(f"slot_attention takes float32 arrays; {name} is {a.dtype}")
    b, t, h, dh = q.shape
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape or k_cache.shape[4] != dh or h % k_cache.shape[3]:
        raise ValueError(f"k_cache and v_cache must be [L, S, M, KVH, {dh}] with KVH dividing {h}; got "
                         f"{k_cache.shape} and {v_cache.shape}")
    if h // k_cache.shape[3] > MAX_GROUP:
        raise ValueError(f"{h // k_cache.shape[3]} query heads per kv head exceed the kernel's {MAX_GROUP}")
    if slots.shape != (b,) or positions.shape != (b, t):
        raise ValueError(f"slots must be [{b}] and positions [{b}, {t}]; got {slots.shape} and {positions.shape}")
    if not 0 <= layer < k_cache.shape[0]:
        raise ValueError(f"layer {layer} is outside the cache's {k_cache.shape[0]} layers")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, slots.astype(jnp.int32), positions.astype(jnp.int32), layer=np.int64(layer),
                kv_len=np.int64(kv_len), window=np.int64(window or 0))
