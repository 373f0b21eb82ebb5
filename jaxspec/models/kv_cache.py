"""KV cache shared by prefill, decode and speculative verification: slot or paged layout.

Slot layout: keys and values ``[layers, slots, max_len, kv_heads, head_dim]``; slot s owns
``max_len`` positions whatever its request needs.

Paged layout (``page_table`` set): keys and values ``[layers, pages, page_size, kv_heads,
head_dim]``, one pool per model, and a page table ``[slots, pages_per_slot]``: position j of slot
s lives at page ``page_table[s, j // page_size]``, offset ``j % page_size``. Pages are handed out
by the host (``jaxspec.engine.pages``) as requests need them, so memory follows the requests'
real lengths, and a page holding a shared prompt prefix can sit in several slots' tables at once.
Entries a slot has not been given hold ``num_pages`` (one past the pool): writes there are
dropped, and reads (clamped) only ever reach positions the attention mask hides.

Both layouts keep a per-slot length ``[slots]``. A forward writes its tokens at
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
# Pages are not split over devices: any row of a step may read any page.
KV_PAGED_AXES = ("layers", None, None, "kv_heads", "head_dim")
LENGTHS_AXES = ("slots",)


class KVCache(NamedTuple):
    k: jax.Array  # slot: [L, S, M, KVH, Dh]; paged: [L, P, page_size, KVH, Dh]
    v: jax.Array
    lengths: jax.Array  # [S] int32: tokens held per slot
    page_table: jax.Array | None = None  # paged: [S, M // page_size] int32 page ids (P: none)

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        if self.paged:
            return self.page_table.shape[1] * self.k.shape[2]
        return self.k.shape[2]

    @property
    def page_size(self) -> int | None:
        return self.k.shape[2] if self.paged else None

    @property
    def num_pages(self) -> int | None:
        return self.k.shape[1] if self.paged else None

    @classmethod
    def create(cls, cfg: ModelConfig, num_slots: int, max_len: int | None = None, dtype=None,
               num_pages: int | None = None, page_size: int | None = None) -> "KVCache":
        """A zeroed cache; paged when ``page_size`` is given (``num_pages`` pages in the pool)."""
        a = cls.abstract(cfg, num_slots, max_len, dtype, num_pages, page_size)
        table = None
        if a.page_table is not None:
            table = jnp.full(a.page_table.shape, a.k.shape[1], jnp.int32)
        return cls(jnp.zeros(a.k.shape, a.k.dtype), jnp.zeros(a.v.shape, a.v.dtype),
                   jnp.zeros(a.lengths.shape, jnp.int32), table)

    @classmethod
    def abstract(cls, cfg: ModelConfig, num_slots: int, max_len: int | None = None, dtype=None,
                 num_pages: int | None = None, page_size: int | None = None) -> "KVCache":
        """Shapes only (for ahead-of-time compilation and memory planning)."""
        max_len = max_len or cfg.max_seq_len
        dtype = dtype or jnp.dtype(cfg.dtype)
        table = None
        if page_size is None:
            shape = (cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim)
        else:
            check_paging(max_len, num_pages, page_size)
            shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
            table = jax.ShapeDtypeStruct((num_slots, max_len // page_size), jnp.int32)
        return cls(jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, dtype),
                   jax.ShapeDtypeStruct((num_slots,), jnp.int32), table)

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self._replace(lengths=lengths)

    def set_length(self, slot: int | jax.Array, length: int | jax.Array) -> "KVCache":
        """Roll a slot back (or forward to a length already written)."""
        return self._replace(lengths=self.lengths.at[slot].set(length))

    def nbytes(self) -> int:
        table = 0 if self.page_table is None else self.page_table.size * 4
        return int(self.k.size * self.k.dtype.itemsize * 2 + self.lengths.size * 4 + table)


def check_paging(max_len: int, num_pages: int | None, page_size: int) -> None:
    """Refuse page geometries the forward cannot address, naming the numbers."""
    if page_size < 1 or max_len % page_size:
        raise ValueError(f"page size {page_size} must be >= 1 and divide the context length {max_len}")
    if num_pages is None or num_pages < 1:
        raise ValueError(f"a paged cache needs a page count >= 1, got {num_pages}")


def row_tables(page_table: jax.Array, rows: jax.Array, num_pages: int) -> jax.Array:
    """The page-table rows [B, n] of a step's batch rows; rows past the table (padding) get pages
    ``num_pages`` (none)."""
    return jnp.take(page_table, rows, axis=0, mode="fill", fill_value=num_pages)


def page_slots(tables: jax.Array, positions: jax.Array, num_pages: int, page_size: int
               ) -> tuple[jax.Array, jax.Array]:
    """(page [B, T], offset [B, T]) where tokens at ``positions`` of rows with page tables ``tables``
    [B, n] live; positions past the context and pages not handed out give page ``num_pages``, which
    a ``mode="drop"`` scatter skips."""
    n = tables.shape[1]
    idx = jnp.clip(positions // page_size, 0, n - 1)
    page = jnp.take_along_axis(tables, idx, axis=1)
    inside = (positions >= 0) & (positions < n * page_size)
    return jnp.where(inside, page, num_pages), positions % page_size


def gather_pages(pool: jax.Array, tables: jax.Array, kv_len: int) -> jax.Array:
    """One layer's pool [P, page_size, K, Dh] read through rows' tables [B, n] -> [B, kv_len', K, Dh]
    (kv_len rounded up to whole pages). Pages not handed out read page P - 1: masked anyway."""
    page_size = pool.shape[1]
    n = -(-kv_len // page_size)
    out = jnp.take(pool, tables[:, :n], axis=0, mode="clip")  # [B, n, page_size, K, Dh]
    return out.reshape(out.shape[0], n * page_size, *pool.shape[2:])
