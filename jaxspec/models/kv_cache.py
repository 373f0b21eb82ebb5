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

Split pages (``page_groups`` set, a mesh whose data axis splits the slots D ways): the pool's
pages form D equal groups, group g (pages ``g * P/D ..``) on data shard g beside slots ``g * S/D
..``, and a slot's table only ever names pages of its own group. A step whose rows are the slots
in order reads each group's pages on its own shard (a gather batched over the groups, nothing
moved between shards); other steps (prefill of a few rows) address pages by their global ids.

Both layouts keep a per-slot length ``[slots]``. A forward writes its tokens at
``start .. start+T-1`` of its slot *before* attending, and masks keys by absolute
position (key_pos <= query_pos). Every position a query may see has therefore
been written by the current or an earlier accepted forward, so rolling a slot
back is only setting its length: stale entries past the length are overwritten
before any query can reach them.

int8 caches (``kv_dtype="int8"``): each new token's key and value vectors are quantized per kv
head, symmetrically (scale = absmax / 127), as they are written; ``k_scale`` / ``v_scale`` hold
the float32 scales. A step reads the int8 values and scales of the positions it attends to and
dequantizes only those (``read_slots`` / ``read_pages``). The scales keep the token axis minor
(slot: ``[L, S, KVH, M]``; paged: ``[L, KVH, P * page_size]``): TPU memory tiles an array's two
minor dimensions in (8, 128) blocks, so a trailing KVH axis of a few heads would be padded to
128 lanes and take more memory than the int8 values it scales.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.config import ModelConfig

# Logical axis names, mapped to mesh axes by jaxspec.sharding rules.
KV_CACHE_AXES = ("layers", "slots", "seq", "kv_heads", "head_dim")
# Pages whole on every device (any row of a step may read any page) or, split, in groups that
# follow the slots: the pages axis takes the slots' mesh axes.
KV_PAGED_AXES = ("layers", None, None, "kv_heads", "head_dim")
KV_SPLIT_PAGED_AXES = ("layers", "slots", None, "kv_heads", "head_dim")
LENGTHS_AXES = ("slots",)
KV_SCALE_AXES = ("layers", "slots", "kv_heads", "seq")  # slot: [L, S, KVH, M]
KV_PAGED_SCALE_AXES = ("layers", "kv_heads", None)  # paged: [L, KVH, P * page_size]
KV_SPLIT_PAGED_SCALE_AXES = ("layers", "kv_heads", "slots")

# --kv-cache-dtype values: "auto" keeps the model's dtype, "int8" quantizes (per head, per token).
KV_DTYPES = ("auto", "int8")
# Scales are floored so an all-zero vector (padding, a zeroed head) never divides by zero.
KV_SCALE_FLOOR = 1e-30


def check_kv_dtype(name: str | None) -> str | None:
    """None for a float cache in the model's dtype ("auto" or None), "int8" for a quantized one."""
    if name is None or name == "auto":
        return None
    if name != "int8":
        raise ValueError(f"unknown KV cache dtype {name!r}; choose from {', '.join(KV_DTYPES)}")
    return name


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., Dh] -> (int8 [..., Dh], float32 scale [...]): symmetric, one scale per vector, so the
    error of each element is at most scale / 2 = absmax / 254."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1) / 127.0, KV_SCALE_FLOOR)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int8 [..., Dh] and scale [...] -> dtype [..., Dh]."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


class KVCache(NamedTuple):
    k: jax.Array  # slot: [L, S, M, KVH, Dh]; paged: [L, P, page_size, KVH, Dh]
    v: jax.Array
    lengths: jax.Array  # [S] int32: tokens held per slot
    page_table: jax.Array | None = None  # paged: [S, M // page_size] int32 page ids (P: none)
    # int8 caches: float32 scales, slot [L, S, KVH, M], paged [L, KVH, P * page_size] (see above)
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    # Split pages: [D] int32, the first page id of each group (g * P / D); its shape is the group count.
    page_groups: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def kv_dtype(self) -> str:
        """What the keys and values are stored in: "int8" or the float dtype's name."""
        return "int8" if self.quantized else str(self.k.dtype)

    @property
    def paged(self) -> bool:
        return self.page_table is not None

    @property
    def groups(self) -> int:
        """How many page groups the pool is split into (1: pages whole on every device)."""
        return 1 if self.page_groups is None else self.page_groups.shape[0]

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
               num_pages: int | None = None, page_size: int | None = None, kv_dtype: str | None = None,
               page_groups: int = 1) -> "KVCache":
        """A zeroed cache; paged when ``page_size`` is given (``num_pages`` pages in the pool, split
        into ``page_groups`` groups); int8 with per-head-per-token scales when ``kv_dtype`` is "int8"."""
        a = cls.abstract(cfg, num_slots, max_len, dtype, num_pages, page_size, kv_dtype, page_groups)
        table = groups = None
        if a.page_table is not None:
            table = jnp.full(a.page_table.shape, a.k.shape[1], jnp.int32)
        if a.page_groups is not None:
            groups = jnp.arange(page_groups, dtype=jnp.int32) * (num_pages // page_groups)
        zeros = lambda x: None if x is None else jnp.zeros(x.shape, x.dtype)  # noqa: E731
        return cls(zeros(a.k), zeros(a.v), zeros(a.lengths), table, zeros(a.k_scale), zeros(a.v_scale), groups)

    @classmethod
    def abstract(cls, cfg: ModelConfig, num_slots: int, max_len: int | None = None, dtype=None,
                 num_pages: int | None = None, page_size: int | None = None, kv_dtype: str | None = None,
                 page_groups: int = 1) -> "KVCache":
        """Shapes only (for ahead-of-time compilation and memory planning)."""
        max_len = max_len or cfg.max_seq_len
        quantized = check_kv_dtype(kv_dtype) is not None
        dtype = jnp.int8 if quantized else dtype or jnp.dtype(cfg.dtype)
        layers, heads = cfg.num_layers, cfg.num_kv_heads
        table = None
        if page_size is None:
            shape = (layers, num_slots, max_len, heads, cfg.head_dim)
            scale_shape = (layers, num_slots, heads, max_len)
        else:
            check_paging(max_len, num_pages, page_size, num_slots, page_groups)
            shape = (layers, num_pages, page_size, heads, cfg.head_dim)
            scale_shape = (layers, heads, num_pages * page_size)
            table = jax.ShapeDtypeStruct((num_slots, max_len // page_size), jnp.int32)
        # float32 scales: exact, and 4 / head_dim of the int8 bytes (3% at head_dim 128); bfloat16
        # scales would add up to 0.4% error to every vector, as much as the int8 rounding itself.
        scale = jax.ShapeDtypeStruct(scale_shape, jnp.float32) if quantized else None
        groups = jax.ShapeDtypeStruct((page_groups,), jnp.int32) if table is not None and page_groups > 1 else None
        return cls(jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct(shape, dtype),
                   jax.ShapeDtypeStruct((num_slots,), jnp.int32), table, scale, scale, groups)

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self._replace(lengths=lengths)

    def set_length(self, slot: int | jax.Array, length: int | jax.Array) -> "KVCache":
        """Roll a slot back (or forward to a length already written)."""
        return self._replace(lengths=_set_at(self.lengths, slot, length))

    def nbytes(self) -> int:
        table = 0 if self.page_table is None else self.page_table.size * 4
        scales = 0 if self.k_scale is None else self.k_scale.size * 4 * 2
        return int(self.k.size * self.k.dtype.itemsize * 2 + self.lengths.size * 4 + table + scales)


@jax.jit
def _set_at(lengths: jax.Array, slot, length) -> jax.Array:
    # Jitted: an eager ``.at[].set`` costs about 0.8 ms of host time per call here, 25 us
    # jitted (once per finished request, on the engine thread).
    return lengths.at[slot].set(length)


def check_paging(max_len: int, num_pages: int | None, page_size: int, num_slots: int = 1, page_groups: int = 1
                 ) -> None:
    """Refuse page geometries the forward cannot address, naming the numbers."""
    if page_size < 1 or max_len % page_size:
        raise ValueError(f"page size {page_size} must be >= 1 and divide the context length {max_len}")
    if num_pages is None or num_pages < 1:
        raise ValueError(f"a paged cache needs a page count >= 1, got {num_pages}")
    if page_groups < 1 or num_pages % page_groups or num_slots % page_groups:
        raise ValueError(f"pages split {page_groups} ways (the mesh's data axis) need a page count and a slot "
                         f"count divisible by {page_groups}, got {num_pages} pages and {num_slots} slots")


def page_groups(placement, num_slots: int, page_size: int | None) -> int:
    """How many groups a paged cache on ``placement`` splits its pages into: the ways its slots are
    split (the mesh's data axes), when they divide the slots; 1 for a slot cache or one device."""
    if page_size is None or placement is None:
        return 1
    ways = placement.axis_size("slots")
    return ways if ways > 1 and num_slots % ways == 0 else 1


def whole_groups(num_pages: int, groups: int) -> int:
    """``num_pages`` rounded down to whole page groups (one per data shard)."""
    if num_pages < groups:
        raise ValueError(f"a KV pool split over {groups} data shards needs at least {groups} pages, got {num_pages}")
    return num_pages - num_pages % groups


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


# ------------------------------------------------------------------ one layer's writes and reads
def write_slots(cache: KVCache, layer: int, rows: jax.Array, positions: jax.Array, k: jax.Array, v: jax.Array
                ) -> KVCache:
    """Slot layout: new keys/values k, v [B, T, K, Dh] of rows [B] (slot ids) at positions [B, T].
    Positions >= M and padding rows (slot id S) are dropped."""
    r = rows[:, None]
    if not cache.quantized:
        return cache._replace(k=cache.k.at[layer, r, positions].set(k.astype(cache.k.dtype), mode="drop"),
                              v=cache.v.at[layer, r, positions].set(v.astype(cache.v.dtype), mode="drop"))
    (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)  # int8 [B, T, K, Dh], scales [B, T, K]
    # Scales [L, S, K, M]: the indices around the K slice broadcast to [B, T] and lead, so the
    # update is [B, T, K], as the scales come.
    return cache._replace(k=cache.k.at[layer, r, positions].set(qk, mode="drop"),
                          v=cache.v.at[layer, r, positions].set(qv, mode="drop"),
                          k_scale=cache.k_scale.at[layer, r, :, positions].set(sk, mode="drop"),
                          v_scale=cache.v_scale.at[layer, r, :, positions].set(sv, mode="drop"))


def read_slots(cache: KVCache, layer: int, kv_len: int, slot_ids: jax.Array | None, dtype
               ) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, kv_len, K, Dh] in ``dtype`` of rows ``slot_ids`` [B] (None: row b is slot
    b, every slot): only the first kv_len positions are read, and only they are dequantized."""
    keys, values = cache.k[layer, :, :kv_len], cache.v[layer, :, :kv_len]
    if slot_ids is not None:
        keys = jnp.take(keys, slot_ids, axis=0, mode="clip")
        values = jnp.take(values, slot_ids, axis=0, mode="clip")
    if not cache.quantized:
        return keys, values
    ks, vs = cache.k_scale[layer, :, :, :kv_len], cache.v_scale[layer, :, :, :kv_len]  # [S, K, kv_len]
    if slot_ids is not None:
        ks = jnp.take(ks, slot_ids, axis=0, mode="clip")
        vs = jnp.take(vs, slot_ids, axis=0, mode="clip")
    ks, vs = jnp.swapaxes(ks, 1, 2), jnp.swapaxes(vs, 1, 2)  # [B, kv_len, K]
    return dequantize_kv(keys, ks, dtype), dequantize_kv(values, vs, dtype)


def write_pages(cache: KVCache, layer: int, page: jax.Array, offset: jax.Array, k: jax.Array, v: jax.Array
                ) -> KVCache:
    """Paged layout: k, v [B, T, K, Dh] to (page, offset) [B, T] (``page_slots``); page P is dropped."""
    if not cache.quantized:
        return cache._replace(k=cache.k.at[layer, page, offset].set(k.astype(cache.k.dtype), mode="drop"),
                              v=cache.v.at[layer, page, offset].set(v.astype(cache.v.dtype), mode="drop"))
    (qk, sk), (qv, sv) = quantize_kv(k), quantize_kv(v)
    flat = page * cache.k.shape[2] + offset  # [B, T] index into P * page_size: page P lands past the end
    return cache._replace(k=cache.k.at[layer, page, offset].set(qk, mode="drop"),
                          v=cache.v.at[layer, page, offset].set(qv, mode="drop"),
                          k_scale=cache.k_scale.at[layer, :, flat].set(sk, mode="drop"),
                          v_scale=cache.v_scale.at[layer, :, flat].set(sv, mode="drop"))


def gather_grouped_pages(pool: jax.Array, tables: jax.Array, kv_len: int, base: jax.Array) -> jax.Array:
    """``gather_pages`` for split pages when row b is slot b (tables [S, n], S a multiple of the D
    groups ``base`` [D] starts): each group's rows read its own pages, one gather batched over the
    groups, so a step split over the data axis reads only pages on its own shard."""
    groups, slots = base.shape[0], tables.shape[0]
    pools = pool.reshape(groups, pool.shape[0] // groups, *pool.shape[1:])  # [D, P/D, page_size, K, Dh]
    out = jax.vmap(lambda p, t: gather_pages(p, t, kv_len))(pools, _local_tables(tables, base))
    return out.reshape(slots, *out.shape[2:])


def _local_tables(tables: jax.Array, base: jax.Array) -> jax.Array:
    """Rows-in-slot-order tables [S, n] of split pages -> each group's [D, S/D, n], as page ids within
    the group (pages not handed out land at or past P/D: clipped, and masked)."""
    groups = base.shape[0]
    return tables.reshape(groups, tables.shape[0] // groups, tables.shape[1]) - base[:, None, None]


def _gather_scales(scale: jax.Array, tables: jax.Array, n: int, page_size: int) -> jax.Array:
    """One layer's int8 scales [K, P * page_size] read through tables [B, n'] -> [B, n * page_size, K]
    (pages not handed out clip to the last: masked)."""
    flat = (tables[:, :n, None] * page_size + jnp.arange(page_size)).reshape(tables.shape[0], n * page_size)
    return jnp.moveaxis(jnp.take(scale, flat, axis=1, mode="clip"), 0, 2)


def _gather_grouped_scales(scale: jax.Array, tables: jax.Array, n: int, page_size: int, base: jax.Array
                           ) -> jax.Array:
    """``_gather_scales`` for split pages, rows in slot order: each group's scales [K, P/D * page_size]
    through its own tables, on its own shard (as ``gather_grouped_pages``)."""
    heads, groups, slots = scale.shape[0], base.shape[0], tables.shape[0]
    out = jax.vmap(lambda sc, t: _gather_scales(sc, t, n, page_size), in_axes=(1, 0))(
        scale.reshape(heads, groups, -1), _local_tables(tables, base))  # [D, S/D, n * page_size, K]
    return out.reshape(slots, n * page_size, heads)


def read_pages(cache: KVCache, layer: int, tables: jax.Array, kv_len: int, dtype, in_order: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, kv_len', K, Dh] in ``dtype`` read through rows' tables [B, n] (kv_len rounded
    up to whole pages, ``gather_pages``); an int8 pool is dequantized after the gather. ``in_order``:
    row b is slot b (split pages are then read group by group, each on its own shard)."""
    grouped = cache.page_groups is not None and in_order and tables.shape[0] == cache.num_slots
    if grouped:
        gather = functools.partial(gather_grouped_pages, base=cache.page_groups)
    else:
        gather = gather_pages
    keys, values = gather(cache.k[layer], tables, kv_len), gather(cache.v[layer], tables, kv_len)
    if not cache.quantized:
        return keys, values
    page_size = cache.k.shape[2]
    n = -(-kv_len // page_size)

    def scales(scale):
        if grouped:
            return _gather_grouped_scales(scale, tables, n, page_size, cache.page_groups)
        return _gather_scales(scale, tables, n, page_size)

    ks, vs = scales(cache.k_scale[layer]), scales(cache.v_scale[layer])
    return dequantize_kv(keys, ks, dtype), dequantize_kv(values, vs, dtype)


def write_through_tables(cache: KVCache, layer: int, rows: jax.Array, positions: jax.Array, k: jax.Array,
                         v: jax.Array) -> tuple[KVCache, jax.Array]:
    """Paged layout: k, v [B, T, K, Dh] of rows [B] (slot ids; padding rows: S) written at positions
    [B, T] through the rows' page tables -> (cache, the rows' tables [B, n])."""
    num_pages, page_size = cache.k.shape[1], cache.k.shape[2]
    tables = row_tables(cache.page_table, rows, num_pages)  # [B, n]
    page, offset = page_slots(tables, positions, num_pages, page_size)  # [B, T] each
    return write_pages(cache, layer, page, offset, k, v), tables


def write_and_read(cache: KVCache, layer: int, rows: jax.Array, slot_ids: jax.Array | None, positions: jax.Array,
                   k: jax.Array, v: jax.Array, kv_len: int | None) -> tuple[KVCache, jax.Array, jax.Array]:
    """One layer's step through either layout (the XLA path): write the new k, v [B, T, K, Dh] of rows
    [B] (slot ids; padding rows: S) at positions [B, T], then read keys and values [B, kv_len', K,
    Dh] over positions [0, kv_len) (None: the whole context). ``slot_ids`` None: row b is slot b.
    Writes come first, so a query sees its own token; positions past the context are dropped."""
    # Only the first kv_len positions (and the rows' own slots or pages): cost follows the live contexts.
    kv_len = cache.max_len if kv_len is None else min(kv_len, cache.max_len)
    if cache.page_table is not None:
        cache, tables = write_through_tables(cache, layer, rows, positions, k, v)
        return cache, *read_pages(cache, layer, tables, kv_len, k.dtype, in_order=slot_ids is None)
    cache = write_slots(cache, layer, rows, positions, k, v)
    return cache, *read_slots(cache, layer, kv_len, slot_ids, k.dtype)


def set_table_row(cache: KVCache, table: np.ndarray, slot: int, pages, sharding=None) -> KVCache:
    """Host page table ``table`` [S, n]: row ``slot`` holds ``pages`` (the rest: none, page P); the
    cache gets the table placed as ``sharding`` (default: as its table is now), so a step's input
    keeps its compiled layout."""
    if len(pages) > table.shape[1]:
        raise ValueError(f"{len(pages)} pages exceed a slot's {table.shape[1]}")
    table[slot] = cache.num_pages
    table[slot, : len(pages)] = pages
    return cache._replace(page_table=jax.device_put(table, cache.page_table.sharding if sharding is None else sharding))
