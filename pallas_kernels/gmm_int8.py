"""Grouped matmul with an int8 right-hand side, dequantized in the kernel (TPU and GPU variants).

``gmm_int8(lhs[m, k], rhs_q[G, k, n] int8, scale[G, 1, n], group_sizes[G]) -> [m, n]`` is
``gmm(lhs, rhs_q * scale, group_sizes)`` (see ``gmm_reference`` for the row/group contract)
without a float copy of the weights: each rhs block is read from HBM as int8 (half the
bytes of bfloat16, a quarter of float32) and widened to the lhs dtype on chip for the
matrix unit; the per-output-column scale, constant along the contraction, multiplies the
float32 product of a group once, after its whole contraction.

Grids, tilings, work items and output protocols are ``gmm``'s (``pallas_kernels.gmm``):
TPU, the work-item grid whose accumulator belongs to one group, scaled when its last k
block is done; GPU (Triton), a program per output tile looping over the groups that
overlap its rows, each group's partial product scaled before it joins the tile's sum.
This file adds the scale operand and the widening. Forward only (inference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, default_interpret, matmul_precision, resolve_backend
from pallas_kernels.gmm import Tiling, _row_tile_metadata, choose_tiling, validate_tiling
from pallas_kernels.gmm_reference import local_group_bounds


def _gmm_int8_kernel(
    tile_ref, group_ref, active_ref, first_ref, dma_tile_ref, dma_group_ref, starts_ref, ends_ref,  # SMEM
    lhs_ref, rhs_ref, scale_ref, out_ref, acc_ref,
    *, tm: int, num_k_tiles: int, precision,
):
    del dma_tile_ref, dma_group_ref  # only the index maps read them
    i, kk = pl.program_id(1), pl.program_id(2)
    active = active_ref[i] == 1
    first = first_ref[i] == 1

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _():
        w = rhs_ref[...].astype(lhs_ref.dtype)  # [tk, tn]: int8 values are exact in bf16 and f32
        acc_ref[...] += lax.dot_general(
            lhs_ref[...], w, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    @pl.when(kk == num_k_tiles - 1)
    def _():
        g = group_ref[i]
        rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = active & (rows >= starts_ref[g]) & (rows < ends_ref[g])
        y = acc_ref[...] * scale_ref[...].astype(jnp.float32)  # [tm, tn] * [1, tn]
        # As in gmm: selects, not arithmetic (unwritten VMEM may hold NaN patterns).
        kept = jnp.where(first, jnp.zeros(out_ref.shape, out_ref.dtype), out_ref[...])
        out_ref[...] = jnp.where(mine, y.astype(out_ref.dtype), kept)


def _gmm_int8_tpu(lhs, rhs_q, scale, starts, ends, tiling: Tiling, out_dtype, interpret: bool) -> jax.Array:
    m, k = lhs.shape
    g_local, _, n = rhs_q.shape
    tm, tk, tn = tiling
    num_k_tiles = k // tk
    num_items = cdiv(m, tm) + g_local - 1
    meta = _row_tile_metadata(starts, ends, m, tm, num_items)
    scalars = (meta["tile"], meta["group"], meta["active"], meta["first"], meta["dma_tile"], meta["dma_group"], starts, ends)

    def k_block(i, kk, active_ref):
        # An idle item keeps the previous item's (last) k block so that its blocks are not re-fetched.
        return jnp.where(active_ref[i] == 1, kk, num_k_tiles - 1)

    def lhs_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return dma_tile[i], k_block(i, kk, active)

    def rhs_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return dma_group[i], k_block(i, kk, active), j

    def scale_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return dma_group[i], 0, j

    def out_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return tile[i], j

    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=int(m * k * lhs.dtype.itemsize + rhs_q.size + scale.size * scale.dtype.itemsize
                           + m * n * jnp.dtype(out_dtype).itemsize),
    )
    return pl.pallas_call(
        functools.partial(_gmm_int8_kernel, tm=tm, num_k_tiles=num_k_tiles, precision=matmul_precision(lhs.dtype)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(cdiv(n, tn), num_items, num_k_tiles),
            in_specs=[
                pl.BlockSpec((tm, tk), lhs_map),
                pl.BlockSpec((None, tk, tn), rhs_map),
                pl.BlockSpec((None, 1, tn), scale_map),
            ],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # Items revisit output blocks, so only the n axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_int8_tpu",
    )(*scalars, lhs, rhs_q, scale)


def _gmm_int8_gpu_kernel(
    group_lo_ref, group_hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, scale_ref, out_ref,
    *, m: int, k: int, n: int, tm: int, tk: int, tn: int, precision,
):
    t, j = pl.program_id(0), pl.program_id(1)
    rows = t * tm + jnp.arange(tm)
    cols = j * tn + jnp.arange(tn)
    col_ok = cols < n
    num_k_tiles = cdiv(k, tk)

    def group_body(g, acc):
        start, end = starts_ref[g], ends_ref[g]
        row_ok = (rows >= start) & (rows < end) & (rows < m)

        def k_body(kk, part):
            ks = kk * tk + jnp.arange(tk)
            k_ok = ks < k
            # Masked-off elements load as 0: rows of other groups and the k tail contribute nothing.
            a = plgpu.load(lhs_ref.at[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
            w = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)], mask=k_ok[:, None] & col_ok[None, :],
                           other=0)
            return part + plgpu.dot(a, w.astype(a.dtype), precision=precision)

        trips = (end > start).astype(jnp.int32) * num_k_tiles  # an empty group runs no k iterations
        part = lax.fori_loop(0, trips, k_body, jnp.zeros((tm, tn), jnp.float32))
        scale = plgpu.load(scale_ref.at[g, pl.ds(0, 1), pl.ds(j * tn, tn)], mask=col_ok[None, :], other=0)  # [1, tn]
        return acc + part * scale.astype(jnp.float32)

    acc = lax.fori_loop(group_lo_ref[t], group_hi_ref[t], group_body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(t * tm, tm), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                mask=(rows < m)[:, None] & col_ok[None, :])


def _gmm_int8_gpu(lhs, rhs_q, scale, starts, ends, tiling: Tiling, out_dtype, interpret: bool) -> jax.Array:
    m, k = lhs.shape
    n = rhs_q.shape[2]
    tm, tk, tn = tiling
    num_tiles = cdiv(m, tm)
    tile_first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    # Local groups overlapping tile t: those ending after its first row and starting before its end.
    group_lo = jnp.searchsorted(ends, tile_first_row, side="right", method="compare_all").astype(jnp.int32)
    group_hi = jnp.searchsorted(starts, tile_first_row + tm - 1, side="right", method="compare_all").astype(jnp.int32)
    kernel = functools.partial(_gmm_int8_gpu_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn,
                               precision=matmul_precision(lhs.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_tiles, cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="gmm_int8_gpu",
    )(group_lo, group_hi, starts, ends, lhs, rhs_q, scale)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "backend", "preferred_element_type"))
def gmm_int8(
    lhs: jax.Array,  # [m, k], rows sorted by group
    rhs_q: jax.Array,  # [G_local, k, n] int8
    scale: jax.Array,  # [G_local, 1, n] per-output-column scales
    group_sizes: jax.Array,  # [G] int32
    group_offset: jax.Array | int = 0,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
    backend: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """out[r] = (lhs[r] @ rhs_q[g]) * scale[g] for row r of local group g (f32 accumulation); other rows zero."""
    if interpret is None:
        interpret = default_interpret()
    variant = resolve_backend(backend, interpret)
    if rhs_q.dtype != jnp.int8 or scale.shape != (rhs_q.shape[0], 1, rhs_q.shape[2]):
        raise ValueError(f"gmm_int8 needs int8 rhs [G, k, n] and scales [G, 1, n], got {rhs_q.dtype} "
                         f"{rhs_q.shape} and {scale.shape}")
    m, k = lhs.shape
    g_local, _, n = rhs_q.shape
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    tiling = tuple(int(t) for t in (tiling or choose_tiling(m, k, n, g_local, lhs.dtype, variant)))
    validate_tiling(tiling, m, k, n, variant, "gmm_int8")
    starts, ends = local_group_bounds(group_sizes, group_offset, g_local, m)
    impl = _gmm_int8_tpu if variant == "tpu" else _gmm_int8_gpu
    return impl(lhs, rhs_q, scale, starts, ends, tiling, out_dtype, interpret)
