"""Paged attention: T new query tokens per row against that row's KV pages (Pallas, TPU and GPU).

Semantics: exactly ``paged_attention_reference`` (``jaxspec.models.layers.cached_attention``
on the K/V gathered through the page table): row b's key at position j lives at
``pages[page_table[b, j // page_size], j % page_size]`` and is visible to the query at
position p iff j <= p, j < kv_len (and j > p - sliding_window with a window);
grouped-query heads; online softmax over KV blocks in float32, scale 1/sqrt(Dh).

Layout. As in ``verify_attention``, the T*G query rows sharing a kv head (T tokens x
G = H / KVH heads, token-major) form one matrix: q is transposed to [B, KVH, R, Dh],
R = T*G padded to a multiple of ``block_rows`` (padding rows have position -1). A KV
block is ``block_kv`` keys = ``block_kv // page_size`` whole pages. For each (row, row
tile) the range of pages its queries can see is computed up front; blocks outside it
are skipped and pages outside it are never read, so the cost follows each row's real
length (and, in a causal prefill chunk split into row tiles, each tile's own length).
The page table is clamped into the pool, so unallocated entries (the sentinel P, -1)
are safe to leave in it.

* TPU: grid (rows, row tiles, KV blocks). The page table (flattened, only its first
  kv_len / page_size columns; batches whose table exceeds ``TPU_MAX_TABLE_ENTRIES`` go
  in several calls) and the page ranges come in by scalar prefetch; page i of a
  block is its own input whose index map looks the page up in the table, so Mosaic's
  pipeline DMAs pages straight from the pool. Index maps clamp to the visible range:
  skipped blocks, and pages of a block outside the range, name a page already resident
  (or, for a row's first block, a visible one), so no hidden page is fetched.
* GPU: grid (rows, kv heads, row tiles); each program loops over its visible blocks and
  loads each page with a masked load (no memory access for pages outside the range).

A query that sees no key (position -1 for a padding row, or a window ending before the
cache) gets zeros, as the reference specifies. A row with no visible page at all still
names one in-range page on TPU (a block index must be valid) but computes nothing.
Keys hidden inside a visible page (past a query's position) are weighed by exactly 0,
so they must be finite (stale values are fine; NaN would leak as 0 * NaN).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, default_interpret, matmul_precision, next_pow2, resolve_backend, round_up
from pallas_kernels.verify_attention_reference import MASK_VALUE

DEFAULT_BLOCK_KV = {"tpu": 128, "gpu": 64}  # keys per grid step / loop iteration (unmeasured)
DEFAULT_BLOCK_ROWS = {"tpu": 256, "gpu": 64}  # query rows (tokens x grouped heads) per program
TPU_MAX_TABLE_ENTRIES = 128 * 1024  # page-table entries per TPU call (512 KiB of SMEM)


def _visible(key_pos: jax.Array, q_pos: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    mask = (key_pos <= q_pos) & (key_pos < kv_len)
    if sliding_window is not None:
        mask &= key_pos > q_pos - sliding_window
    return mask


def _page_ranges(pos_rows: jax.Array, kv_len: int, page_size: int, block_rows: int, sliding_window: int | None):
    """Per (row, row tile), the first and last page any of its queries can see (last < first: none) -> [B * tiles]."""
    b, r = pos_rows.shape
    tiles = pos_rows.reshape(b, r // block_rows, block_rows)
    hi_pos = jnp.minimum(jnp.max(tiles, axis=2), kv_len - 1)
    if sliding_window is None:
        lo_pos = jnp.zeros_like(hi_pos)
    else:
        # Queries that see nothing (negative positions) must not widen the range.
        first = jnp.where(tiles >= 0, tiles - sliding_window + 1, kv_len)
        lo_pos = jnp.maximum(jnp.min(first, axis=2), 0)
    lo_page = (lo_pos // page_size).reshape(-1).astype(jnp.int32)
    hi_page = jnp.floor_divide(hi_pos, page_size).reshape(-1).astype(jnp.int32)  # hi_pos = -1 gives page -1: none
    return lo_page, hi_page


# ------------------------------------------------------------------------------------- TPU
def _tpu_kernel(
    lo_ref, hi_ref, table_ref,  # SMEM [B * tiles], [B * tiles], [B * used pages]
    q_ref, pos_ref,  # (KVH, rows, Dh), (rows, 1)
    *refs,  # ppb k pages (page_size, KVH, Dh), ppb v pages, out (KVH, rows, Dh), scratch m, l, acc
    heads: int, head_dim: int, page_size: int, pages_per_block: int, kv_len: int, sliding_window: int | None,
):
    ppb = pages_per_block
    k_refs, v_refs = refs[:ppb], refs[ppb : 2 * ppb]
    out_ref, m_ref, l_ref, acc_ref = refs[2 * ppb :]
    b, rt, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tile = b * pl.num_programs(1) + rt
    precision = matmul_precision(k_refs[0].dtype)
    block_kv = ppb * page_size

    @pl.when(kt == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((kt * ppb + ppb - 1 >= lo_ref[tile]) & (kt * ppb <= hi_ref[tile]))
    def _():
        key_pos = kt * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        # Pages of the block outside the visible range hold a visible page again: masked here.
        mask = _visible(key_pos, pos_ref[...], kv_len, sliding_window)  # (rows, block_kv)
        for h in range(heads):  # static: one matmul pair per kv head over the block's pages
            k = jnp.concatenate([r[:, h, :] for r in k_refs], axis=0) if ppb > 1 else k_refs[0][:, h, :]
            v = jnp.concatenate([r[:, h, :] for r in v_refs], axis=0) if ppb > 1 else v_refs[0][:, h, :]
            s = lax.dot_general(
                q_ref[h], k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )
            s = jnp.where(mask, s / math.sqrt(head_dim), MASK_VALUE)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # masked keys weigh exactly 0, whatever m is
            corr = jnp.exp(m_prev - m_new)
            l_ref[h] = corr * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[h] = corr * acc_ref[h] + lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )
            m_ref[h] = m_new

    @pl.when(kt == pl.num_programs(2) - 1)
    def _():
        l = l_ref[...]
        out_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(out_ref.dtype)


def _attention_tpu(qt, pos_rows, k_pages, v_pages, table, lo, hi, *, kv_len, block_kv, block_rows, sliding_window,
                   interpret):
    b, kv_heads, rows, dh = qt.shape
    num_pages, page_size = k_pages.shape[:2]
    ppb = block_kv // page_size
    used = kv_len // page_size
    row_tiles = rows // block_rows

    def page_map(i):
        def index_map(bi, rt, kt, lo_ref, hi_ref, table_ref):
            tile = bi * row_tiles + rt
            lo_p = lo_ref[tile]
            hi_p = jnp.maximum(hi_ref[tile], lo_p)  # nothing visible: any in-range page (compute is skipped)
            # Skipped blocks repeat the nearest visible one: no DMA. (lax.div: both are >= 0, and Mosaic
            # lowers floor division through sign(), which needs a real TPU to query.)
            kc = jnp.clip(kt, lax.div(lo_p, ppb), lax.div(hi_p, ppb))
            n = kc * ppb + i
            # Past the range: this input's page of the previous block, still resident, if that one was visible.
            n = jnp.where(n > hi_p, jnp.where(n - ppb >= lo_p, n - ppb, hi_p), n)
            n = jnp.clip(jnp.maximum(n, lo_p), 0, used - 1)
            return jnp.clip(table_ref[bi * used + n], 0, num_pages - 1), 0, 0, 0

        return pl.BlockSpec((None, page_size, kv_heads, dh), index_map)

    kernel = functools.partial(
        _tpu_kernel, heads=kv_heads, head_dim=dh, page_size=page_size, pages_per_block=ppb, kv_len=kv_len,
        sliding_window=sliding_window,
    )
    itemsize = jnp.dtype(k_pages.dtype).itemsize
    per_tile = lambda bi, rt, kt, *_: (bi, 0, rt, 0)  # noqa: E731
    page_specs = [page_map(i) for i in range(ppb)]
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, row_tiles, cdiv(used, ppb)),
            in_specs=[
                pl.BlockSpec((None, kv_heads, block_rows, dh), per_tile),
                pl.BlockSpec((None, block_rows, 1), lambda bi, rt, kt, *_: (bi, rt, 0)),
                *page_specs,
                *page_specs,
            ],
            out_specs=pl.BlockSpec((None, kv_heads, block_rows, dh), per_tile),
            scratch_shapes=[
                pltpu.VMEM((kv_heads, block_rows, 1), jnp.float32),
                pltpu.VMEM((kv_heads, block_rows, 1), jnp.float32),
                pltpu.VMEM((kv_heads, block_rows, dh), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(  # upper bound: every row at full length
            flops=4 * b * kv_heads * rows * kv_len * dh,
            transcendentals=b * kv_heads * rows * kv_len,
            bytes_accessed=2 * b * row_tiles * kv_len * kv_heads * dh * itemsize,
        ),
        name="paged_attention_tpu",
    )(lo, hi, table.reshape(-1), qt, pos_rows[..., None], *([k_pages] * ppb), *([v_pages] * ppb))


# ------------------------------------------------------------------------------------- GPU
def _gpu_kernel(
    lo_ref, hi_ref, table_ref, q_ref, pos_ref, k_ref, v_ref, out_ref,
    *, head_dim: int, block_rows: int, block_d: int, page_size: int, pages_per_block: int, kv_len: int,
    num_pages: int, sliding_window: int | None,
):
    b, h, rt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    tile = b * pl.num_programs(2) + rt
    ppb, used = pages_per_block, kv_len // page_size
    precision = matmul_precision(k_ref.dtype)
    d_ok = jnp.arange(block_d) < head_dim
    rows = pl.ds(rt * block_rows, block_rows)
    q = plgpu.load(q_ref.at[b, h, rows, pl.ds(0, block_d)], mask=d_ok[None, :], other=0)
    q_pos = plgpu.load(pos_ref.at[b, rows])[:, None]
    lo, hi = lo_ref[tile], hi_ref[tile]
    scale = 1.0 / math.sqrt(head_dim)
    in_page = jnp.arange(page_size)

    def body(blk, carry):
        m_prev, l_prev, acc = carry
        scores, masks, values = [], [], []
        for i in range(ppb):  # static: the block's pages
            n = blk * ppb + i
            live = (n >= lo) & (n <= hi)  # pages outside the range: every load masked off, nothing read
            page = jnp.clip(table_ref[b * used + jnp.clip(n, 0, used - 1)], 0, num_pages - 1)
            load_mask = live & (in_page[:, None] >= 0) & d_ok[None, :]
            at = (page, pl.ds(0, page_size), h, pl.ds(0, block_d))
            k = plgpu.load(k_ref.at[at], mask=load_mask, other=0)
            values.append(plgpu.load(v_ref.at[at], mask=load_mask, other=0))
            mask = _visible(n * page_size + in_page[None, :], q_pos, kv_len, sliding_window)
            masks.append(mask)
            scores.append(jnp.where(mask, plgpu.dot(q, k, trans_b=True, precision=precision) * scale, MASK_VALUE))
        m_new = m_prev
        for s in scores:
            m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
        corr = jnp.exp(m_prev - m_new)
        l_new, acc = corr * l_prev, corr[:, None] * acc
        for s, mask, v in zip(scores, masks, values):
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            l_new += jnp.sum(p, axis=1)
            acc += plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l_new, acc

    init = (
        jnp.full((block_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
        jnp.zeros((block_rows, block_d), jnp.float32),
    )
    # lo >= 0 and hi >= -1: both divisions are of non-negative numbers; hi < lo runs no iterations.
    _, l, acc = lax.fori_loop(lo // ppb, (hi + ppb) // ppb, body, init)
    out = jnp.where((l > 0)[:, None], acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    plgpu.store(out_ref.at[b, h, rows, pl.ds(0, block_d)], out.astype(out_ref.dtype), mask=d_ok[None, :])


def _attention_gpu(qt, pos_rows, k_pages, v_pages, table, lo, hi, *, kv_len, block_kv, block_rows, sliding_window,
                   interpret):
    b, kv_heads, rows, dh = qt.shape
    num_pages, page_size = k_pages.shape[:2]
    kernel = functools.partial(
        _gpu_kernel, head_dim=dh, block_rows=block_rows, block_d=max(16, next_pow2(dh)), page_size=page_size,
        pages_per_block=block_kv // page_size, kv_len=kv_len, num_pages=num_pages, sliding_window=sliding_window,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        grid=(b, kv_heads, rows // block_rows),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_attention_gpu",
    )(lo, hi, table.reshape(-1), qt, pos_rows, k_pages, v_pages)


# ---------------------------------------------------------------------------------- public
def _validate_blocks(variant: str, page_size: int, kv_len: int, block_kv: int, block_rows: int, rows: int) -> None:
    if block_kv <= 0 or block_kv % page_size or block_kv > kv_len:
        raise ValueError(
            f"paged_attention: block_kv={block_kv} must be a multiple of page_size={page_size} and at most "
            f"kv_len={kv_len} (a block is whole pages)"
        )
    if variant == "tpu":
        if block_rows <= 0 or not (block_rows % 8 == 0 or block_rows >= rows):
            raise ValueError(
                f"paged_attention: illegal TPU block_rows={block_rows}: the query block's second-minor dimension "
                f"needs to be divisible by 8 or to cover all {rows} rows (tokens x grouped heads)"
            )
    else:
        if page_size < 16 or page_size & (page_size - 1):
            raise ValueError(
                f"paged_attention: GPU page_size={page_size} must be a power of two >= 16 (a page is one Triton "
                "block of a dot)"
            )
        if block_rows < 16 or block_rows & (block_rows - 1):
            raise ValueError(f"paged_attention: illegal GPU block_rows={block_rows}: Triton blocks must be powers "
                             "of two >= 16")


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_positions: jax.Array,
    kv_len: int,
    sliding_window: int | None = None,
    *,
    backend: str | None = None,
    block_kv: int | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """q [B, T, H, Dh], pages [P, page_size, KVH, Dh], page_table [B, n_pages], q_positions [B, T]
    -> [B, T, H, Dh] (q's dtype). ``kv_len`` (static) bounds the positions attended to.

    ``backend``: "auto" (None) | "tpu" | "gpu"; ``interpret`` None: the interpreter where no
    accelerator is present. ``block_kv``: keys per KV block (whole pages); ``block_rows``:
    query rows (tokens x grouped heads) per program.
    """
    b, t, h, dh = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    if k_pages.shape[3] != dh or v_pages.shape != k_pages.shape or h % kv_heads:
        raise ValueError(
            f"paged_attention: q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape} do not describe "
            "[B, T, H, Dh] queries over [P, page_size, KVH, Dh] pages with H a multiple of KVH"
        )
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"paged_attention: page_table {page_table.shape} must be [B, n_pages] with B={b}")
    if q_positions.shape != (b, t):
        raise ValueError(f"paged_attention: q_positions {q_positions.shape} must be [B, T] = [{b}, {t}]")
    if kv_len <= 0 or kv_len % page_size or kv_len > page_table.shape[1] * page_size:
        raise ValueError(
            f"paged_attention: kv_len={kv_len} must be a positive multiple of page_size={page_size} and at most "
            f"n_pages * page_size = {page_table.shape[1] * page_size}"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"paged_attention: sliding_window must be positive or None, got {sliding_window}")
    if interpret is None:
        interpret = default_interpret()
    variant = resolve_backend(backend or "auto", interpret)
    group = h // kv_heads
    rows = t * group
    if block_kv is None:
        block_kv = max(page_size, min(DEFAULT_BLOCK_KV[variant], kv_len) // page_size * page_size)
    if block_rows is None:
        if variant == "tpu":  # all rows in one block when they fit (a full dimension is always legal)
            block_rows = rows if rows <= DEFAULT_BLOCK_ROWS["tpu"] else DEFAULT_BLOCK_ROWS["tpu"]
        else:
            block_rows = min(DEFAULT_BLOCK_ROWS["gpu"], max(16, next_pow2(rows)))
    _validate_blocks(variant, page_size, kv_len, block_kv, block_rows, rows)
    block_rows = min(block_rows, rows) if variant == "tpu" else block_rows
    padded = round_up(rows, block_rows)

    positions = q_positions.astype(jnp.int32)
    # [B, T, KVH, G, Dh] -> [B, KVH, T*G, Dh]: row r of a kv head is token r // G, head r % G.
    qt = q.reshape(b, t, kv_heads, group, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, dh)
    pos_rows = jnp.repeat(positions, group, axis=1)  # [B, T*G]
    if padded != rows:  # padding rows see nothing (position -1) and are cut off below
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))
        pos_rows = jnp.pad(pos_rows, ((0, 0), (0, padded - rows)), constant_values=-1)
    table = page_table[:, : kv_len // page_size].astype(jnp.int32)  # only the pages [0, kv_len) can be named
    impl = _attention_tpu if variant == "tpu" else _attention_gpu
    # The TPU variant holds its rows' page table in SMEM (1 MiB on v5e): larger batches go in several calls.
    step = max(1, TPU_MAX_TABLE_ENTRIES // table.shape[1]) if variant == "tpu" else b
    outs = []
    for start in range(0, b, step):
        sl = slice(start, min(b, start + step))
        lo, hi = _page_ranges(pos_rows[sl], kv_len, page_size, block_rows, sliding_window)
        outs.append(impl(qt[sl], pos_rows[sl], k_pages, v_pages, table[sl], lo, hi, kv_len=kv_len, block_kv=block_kv,
                         block_rows=block_rows, sliding_window=sliding_window, interpret=interpret))
    out = (outs[0] if len(outs) == 1 else jnp.concatenate(outs))[:, :, :rows]
    return out.reshape(b, kv_heads, t, group, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh)
