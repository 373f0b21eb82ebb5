"""Verification attention: T = k+1 new query tokens per slot against that slot's KV cache (Pallas, TPU and GPU).

Semantics: exactly ``verify_attention_reference`` / ``jaxspec.models.layers.cached_attention``
(key j visible to the query at position p iff j <= p, and j > p - sliding_window
with a window; grouped-query heads). Online softmax over KV tiles of ``block_kv``
keys in float32; keys past a query's position are masked and tiles past the slot's
largest query position (or before its smallest minus the window) are skipped:
neither read nor computed. Keys at positions >= M are never used.

Layout. The T*G query rows that share a kv head (T tokens x G = H / KVH heads) form
one [T*G, Dh] matrix, so each KV tile is loaded once and multiplied against all of
them. q is transposed to [B, KVH, T*G, Dh] (small); the cache is read in place.

* TPU: grid (slots, KV tiles), a block holding all kv heads of a tile (the only
  legal block over [.., KVH, Dh] that does not force a relayout copy of the cache);
  the per-slot tile range comes in by scalar prefetch and the KV index maps clamp
  to it, so skipped tiles issue no DMA.
* GPU: grid (slots, kv heads); each program loops over its slot's tile range with
  masked power-of-two loads.

One deliberate difference: a query that sees no key at all (a negative position, or
a position >= M + window with a window) gets zeros here, where the reference
averages every value (softmax over all-masked scores). The model never produces
such queries: a token always sees its own key.
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

from pallas_kernels._common import cdiv, default_interpret, matmul_precision, next_pow2, resolve_backend
from pallas_kernels.verify_attention_reference import MASK_VALUE

DEFAULT_BLOCK_KV = {"tpu": 256, "gpu": 64}


def _visible(key_pos: jax.Array, q_pos: jax.Array, num_keys: int, sliding_window: int | None) -> jax.Array:
    mask = (key_pos <= q_pos) & (key_pos < num_keys)  # keys past the cache (partial last tile) are never used
    if sliding_window is not None:
        mask &= key_pos > q_pos - sliding_window
    return mask


def _tile_range(q_positions: jax.Array, num_keys: int, block_kv: int, sliding_window: int | None):
    """Per slot, the first and last KV tile any of its queries can see (last < first: none)."""
    hi_pos = jnp.minimum(jnp.max(q_positions, axis=1), num_keys - 1)
    lo_pos = jnp.zeros_like(hi_pos)
    if sliding_window is not None:
        lo_pos = jnp.maximum(jnp.min(q_positions, axis=1) - sliding_window + 1, 0)
    # Floor division of a negative hi_pos gives -1: no tile.
    return (lo_pos // block_kv).astype(jnp.int32), jnp.floor_divide(hi_pos, block_kv).astype(jnp.int32)


# ------------------------------------------------------------------------------------- TPU
def _tpu_kernel(
    lo_ref, hi_ref,  # SMEM [B]
    q_ref, pos_ref, k_ref, v_ref,  # (KVH, R, Dh), (R, 1), (tkv, KVH, Dh), (tkv, KVH, Dh)
    out_ref,  # (KVH, R, Dh)
    m_ref, l_ref, acc_ref,  # (KVH, R, 1), (KVH, R, 1), (KVH, R, Dh) f32
    *, heads: int, head_dim: int, block_kv: int, num_keys: int, sliding_window: int | None,
):
    b, kt = pl.program_id(0), pl.program_id(1)
    precision = matmul_precision(k_ref.dtype)

    @pl.when(kt == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((kt >= lo_ref[b]) & (kt <= hi_ref[b]))
    def _():
        key_pos = kt * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = _visible(key_pos, pos_ref[...], num_keys, sliding_window)  # (R, tkv)
        # Rows of a partial last tile hold whatever follows the cache: zero them so 0 * garbage stays 0.
        key_ok = (kt * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)) < num_keys
        for h in range(heads):  # static: one matmul pair per kv head
            k = k_ref[:, h, :]
            v = jnp.where(key_ok, v_ref[:, h, :], 0)
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

    @pl.when(kt == pl.num_programs(1) - 1)
    def _():
        l = l_ref[...]
        out_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(out_ref.dtype)


def _attention_tpu(qt, pos_rows, k_cache, v_cache, lo, hi, *, block_kv, sliding_window, interpret):
    b, kv_heads, rows, dh = qt.shape
    num_keys = k_cache.shape[1]

    def kv_map(bi, kt, lo_ref, hi_ref):
        # Clamped to the slot's range: a skipped step names the block already resident, so no DMA.
        # (A slot with no visible tile, hi = -1, still needs a valid block index: tile 0.)
        hi_c = jnp.maximum(hi_ref[bi], 0)
        return bi, jnp.maximum(jnp.minimum(kt, hi_c), jnp.minimum(lo_ref[bi], hi_c)), 0, 0

    kernel = functools.partial(
        _tpu_kernel, heads=kv_heads, head_dim=dh, block_kv=block_kv, num_keys=num_keys, sliding_window=sliding_window
    )
    itemsize = jnp.dtype(k_cache.dtype).itemsize
    # The cache is read in its own [B, M, KVH, Dh] layout, all kv heads per block (KVH and Dh are whole
    # dimensions, which Mosaic accepts at any size): a reshaped view would make XLA copy the whole cache
    # into another tiled layout on every call.
    kv_block = pl.BlockSpec((None, block_kv, kv_heads, dh), kv_map)
    per_slot = lambda bi, kt, *_: (bi, 0, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, cdiv(num_keys, block_kv)),
            in_specs=[
                pl.BlockSpec((None, kv_heads, rows, dh), per_slot),
                pl.BlockSpec((None, rows, 1), lambda bi, kt, *_: (bi, 0, 0)),
                kv_block,
                kv_block,
            ],
            out_specs=pl.BlockSpec((None, kv_heads, rows, dh), per_slot),
            scratch_shapes=[
                pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((kv_heads, rows, dh), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=4 * b * kv_heads * rows * num_keys * dh,
            transcendentals=b * kv_heads * rows * num_keys,
            bytes_accessed=2 * b * num_keys * kv_heads * dh * itemsize,
        ),
        name="verify_attention_tpu",
    )(lo, hi, qt, pos_rows[..., None], k_cache, v_cache)


# ------------------------------------------------------------------------------------- GPU
def _gpu_kernel(
    lo_ref, hi_ref, q_ref, pos_ref, k_ref, v_ref, out_ref,
    *, rows: int, head_dim: int, block_rows: int, block_d: int, block_kv: int, num_keys: int,
    sliding_window: int | None,
):
    b, h = pl.program_id(0), pl.program_id(1)
    precision = matmul_precision(k_ref.dtype)
    r = jnp.arange(block_rows)
    d = jnp.arange(block_d)
    row_ok, d_ok = r < rows, d < head_dim
    q = plgpu.load(q_ref.at[b, h, pl.ds(0, block_rows), pl.ds(0, block_d)], mask=row_ok[:, None] & d_ok[None, :], other=0)
    q_pos = plgpu.load(pos_ref.at[b, pl.ds(0, block_rows)], mask=row_ok, other=-1)[:, None]
    scale = 1.0 / math.sqrt(head_dim)

    def body(kt, carry):
        m_prev, l_prev, acc = carry
        keys = kt * block_kv + jnp.arange(block_kv)
        kv_mask = (keys < num_keys)[:, None] & d_ok[None, :]
        k = plgpu.load(k_ref.at[b, pl.ds(kt * block_kv, block_kv), h, pl.ds(0, block_d)], mask=kv_mask, other=0)
        v = plgpu.load(v_ref.at[b, pl.ds(kt * block_kv, block_kv), h, pl.ds(0, block_d)], mask=kv_mask, other=0)
        mask = _visible(keys[None, :], q_pos, num_keys, sliding_window)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_new = corr * l_prev + jnp.sum(p, axis=1)
        acc = corr[:, None] * acc + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l_new, acc

    init = (
        jnp.full((block_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
        jnp.zeros((block_rows, block_d), jnp.float32),
    )
    # hi < lo (no visible key) runs no iterations.
    _, l, acc = lax.fori_loop(lo_ref[b], hi_ref[b] + 1, body, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    out = jnp.where((l > 0)[:, None], acc / safe_l[:, None], 0.0)
    plgpu.store(
        out_ref.at[b, h, pl.ds(0, block_rows), pl.ds(0, block_d)],
        out.astype(out_ref.dtype),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def _attention_gpu(qt, pos_rows, k_cache, v_cache, lo, hi, *, block_kv, sliding_window, interpret):
    b, kv_heads, rows, dh = qt.shape
    kernel = functools.partial(
        _gpu_kernel, rows=rows, head_dim=dh, block_rows=max(16, next_pow2(rows)), block_d=max(16, next_pow2(dh)),
        block_kv=block_kv, num_keys=k_cache.shape[1], sliding_window=sliding_window,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        grid=(b, kv_heads),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="verify_attention_gpu",
    )(lo, hi, qt, pos_rows, k_cache, v_cache)


# ---------------------------------------------------------------------------------- public
def validate_block_kv(block_kv: int, num_keys: int, backend: str) -> None:
    if backend == "tpu":
        if block_kv <= 0 or not (block_kv % 8 == 0 or block_kv == num_keys):
            raise ValueError(
                f"verify_attention: illegal TPU block_kv={block_kv}: the KV block (block_kv, heads*Dh) needs its "
                f"second-minor dimension divisible by 8 or equal to the cache length M={num_keys}"
            )
    elif block_kv < 16 or block_kv & (block_kv - 1):
        raise ValueError(f"verify_attention: illegal GPU block_kv={block_kv}: Triton blocks must be powers of two >= 16")


def verify_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    *,
    sliding_window: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    backend: str = "auto",
) -> jax.Array:
    """q [B, T, H, Dh], caches [B, M, KVH, Dh], q_positions [B, T] -> [B, T, H, Dh] (q's dtype)."""
    b, t, h, dh = q.shape
    _, num_keys, kv_heads, _ = k_cache.shape
    if k_cache.shape != (b, num_keys, kv_heads, dh) or v_cache.shape != k_cache.shape or h % kv_heads:
        raise ValueError(
            f"verify_attention: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape} do not describe "
            "[B, T, H, Dh] queries over [B, M, KVH, Dh] caches with H a multiple of KVH"
        )
    if q_positions.shape != (b, t):
        raise ValueError(f"verify_attention: q_positions {q_positions.shape} must be [B, T] = [{b}, {t}]")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"verify_attention: sliding_window must be positive or None, got {sliding_window}")
    variant = resolve_backend(backend, interpret)
    if block_kv is None:
        block_kv = DEFAULT_BLOCK_KV[variant]
        if variant == "tpu":  # a cache no longer than one tile is taken whole (always a legal block)
            block_kv = num_keys if num_keys <= block_kv else block_kv
        else:
            block_kv = min(block_kv, max(16, next_pow2(num_keys)))
    validate_block_kv(block_kv, num_keys, variant)
    group = h // kv_heads
    positions = q_positions.astype(jnp.int32)
    # [B, T, KVH, G, Dh] -> [B, KVH, T*G, Dh]: row r of a kv head is token r // G, head r % G.
    qt = q.reshape(b, t, kv_heads, group, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * group, dh)
    pos_rows = jnp.repeat(positions, group, axis=1)  # [B, T*G]
    lo, hi = _tile_range(positions, num_keys, block_kv, sliding_window)
    impl = _attention_tpu if variant == "tpu" else _attention_gpu
    out = impl(qt, pos_rows, k_cache, v_cache, lo, hi, block_kv=block_kv, sliding_window=sliding_window, interpret=interpret)
    return out.reshape(b, kv_heads, t, group, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh)


def cached_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """Drop-in for ``jaxspec.models.layers.cached_attention`` (interpreter on CPU)."""
    return verify_attention(q, k, v, q_positions, sliding_window=sliding_window, interpret=default_interpret())
