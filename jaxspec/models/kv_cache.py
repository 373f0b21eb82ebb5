"""Slot-based KV cache shared by prefill, decode and speculative verification.

Layout: keys and values ``[layers, slots, max_len, kv_heads, head_dim]`` plus a
per-slot length ``[slots]``. A forward writes its tokens at
``start .. start+T-1`` of its slot *before* attending, and masks keys by absolute
position (key_pos <= query_pos). Every position a query may see has therefore
been written by the current or an earlier accepted forward, so rolling a slot
back is only setting its length: stale entries past the length are overwritten
before any query can reach them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxspec.config import ModelConfig

# Logical axis names, mapped to mesh axes by jaxspec.sharding rules.
KV_CACHE_AXES = ("layers", "slots", "seq", "kv_heads", "head_dim")
LENGTHS_AXES = ("slots",)


class KVCache(NamedTuple):
    k: jax.Array  # [L, S, M, KVH, Dh]
    v: jax.Array  # [L, S, M, KVH, Dh]
    lengths: jax.Array  # [S] int32: tokens held per slot

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, cfg: ModelConfig, num_slots: int, max_len: int | None = None, dtype=None) -> "KVCache":
        max_len = max_len or cfg.max_seq_len
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((num_slots,), jnp.int32))

    @classmethod
    def abstract(cls, cfg: ModelConfig, num_slots: int, max_len: int | None = None, dtype=None) -> "KVCache":
        """Shapes only (for ahead-of-time compilation and memory planning)."""
        max_len = max_len or cfg.max_seq_len
        dtype = dtype or jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            jax.ShapeDtypeStruct(shape, dtype),
            jax.ShapeDtypeStruct(shape, dtype),
            jax.ShapeDtypeStruct((num_slots,), jnp.int32),
        )

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self._replace(lengths=lengths)

    def set_length(self, slot: int | jax.Array, length: int | jax.Array) -> "KVCache":
        """Roll a slot back (or forward to a length already written)."""
        return self._replace(lengths=self.lengths.at[slot].set(length))

    def nbytes(self) -> int:
        return int(self.k.size * self.k.dtype.itemsize * 2 + self.lengths.size * 4)
