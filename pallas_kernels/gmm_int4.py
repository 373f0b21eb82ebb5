"""Grouped matmul with a packed int4 right-hand side and grouped scales, dequantized in the kernel.

``gmm_int4(lhs[m, k], rhs_q[G, k/2, n] int8, scale[G, k/g, n], group_sizes[G]) -> [m, n]`` is
``gmm(lhs, dequantize(rhs_q, scale), group_sizes)`` (``gmm_reference`` gives the row/group
contract) without a float copy of the weights: each block is read from HBM as packed int4 (a
quarter of bfloat16's bytes) and unpacked and scaled on chip.

Format (``jaxspec.models.quant``'s int4, restated so the kernel needs nothing of jaxspec): byte
``rhs_q[e, i, c]`` holds contraction entries ``2i`` (low nibble, signed) and ``2i + 1`` (high
nibble); one float32 scale per ``g`` consecutive contraction entries and output column. The
interleaving is undone on the activations instead of the weights: the wrapper splits ``lhs`` into
its even and odd columns (``[m, k/2]`` each, small next to the weights), so the kernel multiplies
``even @ low + odd @ high``, both over the packed axis, with no in-kernel shuffle. Entries ``2i``
and ``2i + 1`` share a group (``g`` is even), so packed row ``i`` belongs to group ``i // (g/2)``.

TPU (Mosaic): ``gmm``'s work-item grid; a k block of ``tk`` packed rows covers ``tk / (g/2)``
whole groups, so ``tk`` is a multiple of ``g/2`` and of 8 of those groups (the scale block's
sublane tiling) unless it is the whole packed axis. Each group's rows are widened, scaled and
written to a VMEM tile in the lhs dtype, then one matrix-unit product per nibble.
GPU (Triton): a program per output tile as in ``gmm_int8``; its k loop steps one scale group at a
time (``tk = g/2`` packed rows), so a group's scale multiplies its partial product and the
weights are only widened (int4 values are exact in bf16). Forward only (inference).
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
from pallas_kernels.gmm_reference import gmm_reference, local_group_bounds

_TPU_K_TILES = (1024, 512)  # packed rows per k block: 8 or more groups of 64 (g = 128)


def _nibbles(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed int8 bytes -> (low, high) signed nibbles as int32 (shifts on 32 bits: every backend has them)."""
    q32 = q.astype(jnp.int32)
    return lax.shift_right_arithmetic(lax.shift_left(q32, 28), 28), lax.shift_right_arithmetic(q32, 4)


def unpack_reference(rhs_q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The float [G, k, n] weights a packed int4 ``rhs_q`` [G, k/2, n] with ``scale`` [G, k/g, n] stands for."""
    lo, hi = _nibbles(rhs_q)
    values = jnp.stack([lo, hi], axis=2).reshape(rhs_q.shape[0], 2 * rhs_q.shape[1], rhs_q.shape[2])
    full = jnp.repeat(scale.astype(jnp.float32), values.shape[1] // scale.shape[1], axis=1)
    return (values.astype(jnp.float32) * full).astype(dtype)


def gmm_int4_reference(lhs, rhs_q, scale, group_sizes, group_offset=0, *, preferred_element_type=None):
    """``gmm_reference`` against the dequantized weights, in float32."""
    out = gmm_reference(lhs.astype(jnp.float32), unpack_reference(rhs_q, scale), group_sizes, group_offset,
                        preferred_element_type=jnp.float32)
    return out.astype(jnp.dtype(preferred_element_type or lhs.dtype))


# --------------------------------------------------------------------------------------- TPU
def _gmm_int4_kernel(
    tile_ref, group_ref, active_ref, first_ref, dma_tile_ref, dma_group_ref, starts_ref, ends_ref,  # SMEM
    even_ref, odd_ref, rhs_ref, scale_ref, out_ref, acc_ref, w_ref,
    *, tm: int, tk: int, half_group: int, num_k_tiles: int, precision,
):
    del dma_tile_ref, dma_group_ref  # only the index maps read them
    i, kk = pl.program_id(1), pl.program_id(2)
    active = active_ref[i] == 1
    first = first_ref[i] == 1

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def product(lhs_ref, nibble: int):
        # One group's rows at a time: its scale row broadcasts over them, no [tk, tn] scale is built.
        for j in range(tk // half_group):
            rows = pl.ds(j * half_group, half_group)
            values = _nibbles(rhs_ref[rows, :])[nibble].astype(jnp.float32)
            w_ref[rows, :] = (values * scale_ref[pl.ds(j, 1), :].astype(jnp.float32)).astype(w_ref.dtype)
        return lax.dot_general(lhs_ref[...], w_ref[...], (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    @pl.when(active)
    def _():
        acc_ref[...] += product(even_ref, 0)
        acc_ref[...] += product(odd_ref, 1)

    @pl.when(kk == num_k_tiles - 1)
    def _():
        g = group_ref[i]
        rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = active & (rows >= starts_ref[g]) & (rows < ends_ref[g])
        # As in gmm: selects, not arithmetic (unwritten VMEM may hold NaN patterns).
        kept = jnp.where(first, jnp.zeros(out_ref.shape, out_ref.dtype), out_ref[...])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), kept)


def _gmm_int4_tpu(even, odd, rhs_q, scale, starts, ends, tiling: Tiling, out_dtype, interpret: bool) -> jax.Array:
    m, kh = even.shape
    g_local, _, n = rhs_q.shape
    half_group = kh // scale.shape[1]
    tm, tk, tn = tiling
    num_k_tiles = kh // tk
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

    def out_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return tile[i], j

    cost = pl.CostEstimate(
        flops=4 * m * kh * n,
        transcendentals=0,
        bytes_accessed=int(2 * m * kh * even.dtype.itemsize + rhs_q.size + scale.size * scale.dtype.itemsize
                           + m * n * jnp.dtype(out_dtype).itemsize),
    )
    return pl.pallas_call(
        functools.partial(_gmm_int4_kernel, tm=tm, tk=tk, half_group=half_group, num_k_tiles=num_k_tiles,
                          precision=matmul_precision(even.dtype)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(cdiv(n, tn), num_items, num_k_tiles),
            in_specs=[
                pl.BlockSpec((tm, tk), lhs_map),
                pl.BlockSpec((tm, tk), lhs_map),
                pl.BlockSpec((None, tk, tn), rhs_map),
                pl.BlockSpec((None, tk // half_group, tn), rhs_map),  # same block index: k blocks hold whole groups
            ],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32), pltpu.VMEM((tk, tn), even.dtype)],
        ),
        # Items revisit output blocks, so only the n axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost,
        name="gmm_int4_tpu",
    )(*scalars, even, odd, rhs_q, scale)


# --------------------------------------------------------------------------------------- GPU
def _gmm_int4_gpu_kernel(
    group_lo_ref, group_hi_ref, starts_ref, ends_ref, even_ref, odd_ref, rhs_ref, scale_ref, out_ref,
    *, m: int, kh: int, n: int, tm: int, tk: int, tn: int, precision,
):
    t, j = pl.program_id(0), pl.program_id(1)
    rows = t * tm + jnp.arange(tm)
    cols = j * tn + jnp.arange(tn)
    col_ok = cols < n
    num_k_tiles = kh // tk  # one scale group per k step

    def group_body(g, acc):
        start, end = starts_ref[g], ends_ref[g]
        row_ok = (rows >= start) & (rows < end) & (rows < m)

        def k_body(kk, part):
            lhs_block = (pl.ds(t * tm, tm), pl.ds(kk * tk, tk))
            # Masked-off rows (other groups, past m) load as 0 and contribute nothing.
            a = plgpu.load(even_ref.at[lhs_block], mask=row_ok[:, None], other=0)
            b = plgpu.load(odd_ref.at[lhs_block], mask=row_ok[:, None], other=0)
            q = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)], mask=col_ok[None, :], other=0)
            lo, hi = _nibbles(q)
            y = plgpu.dot(a, lo.astype(a.dtype), precision=precision) + plgpu.dot(b, hi.astype(b.dtype), precision=precision)
            s = plgpu.load(scale_ref.at[g, pl.ds(kk, 1), pl.ds(j * tn, tn)], mask=col_ok[None, :], other=0)  # [1, tn]
            return part + y * s.astype(jnp.float32)

        trips = (end > start).astype(jnp.int32) * num_k_tiles  # an empty group runs no k iterations
        return acc + lax.fori_loop(0, trips, k_body, jnp.zeros((tm, tn), jnp.float32))

    acc = lax.fori_loop(group_lo_ref[t], group_hi_ref[t], group_body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_ref.at[pl.ds(t * tm, tm), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                mask=(rows < m)[:, None] & col_ok[None, :])


def _gmm_int4_gpu(even, odd, rhs_q, scale, starts, ends, tiling: Tiling, out_dtype, interpret: bool) -> jax.Array:
    m, kh = even.shape
    n = rhs_q.shape[2]
    tm, tk, tn = tiling
    num_tiles = cdiv(m, tm)
    tile_first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    # Local groups overlapping tile t: those ending after its first row and starting before its end.
    group_lo = jnp.searchsorted(ends, tile_first_row, side="right", method="compare_all").astype(jnp.int32)
    group_hi = jnp.searchsorted(starts, tile_first_row + tm - 1, side="right", method="compare_all").astype(jnp.int32)
    kernel = functools.partial(_gmm_int4_gpu_kernel, m=m, kh=kh, n=n, tm=tm, tk=tk, tn=tn,
                               precision=matmul_precision(even.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_tiles, cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="gmm_int4_gpu",
    )(group_lo, group_hi, starts, ends, even, odd, rhs_q, scale)


# ---------------------------------------------------------------------------------- wrapper
def default_tiling(m: int, k: int, n: int, group: int, num_groups: int, dtype, backend: str) -> Tiling:
    """(tm, tk, tn) with ``tk`` in packed rows (of the k/2 each lhs half has)."""
    kh, half = k // 2, group // 2
    tm, _, tn = choose_tiling(m, kh, n, num_groups, dtype, backend)
    if backend == "tpu":
        return tm, next((t for t in _TPU_K_TILES if kh % t == 0 and t % (8 * half) == 0), kh), tn
    return tm, half, tn


def tiling_problems(tiling: Tiling, m: int, k: int, n: int, group: int, backend: str) -> list[str]:
    """Why ``tiling`` cannot run a [m, k] x [G, k/2 packed, n] product in int4 groups of ``group`` (empty: it can)."""
    tm, tk, tn = tiling
    kh, half = k // 2, group // 2
    problems = []
    try:
        validate_tiling(tiling, m, kh, n, backend, "gmm_int4")
    except ValueError as e:
        problems.append(str(e))
    if backend == "tpu":
        if tk % half:
            problems.append(f"tk={tk} packed rows is not a whole number of scale groups ({half} packed rows each)")
        elif not ((tk // half) % 8 == 0 or tk == kh):
            problems.append(f"tk={tk} covers {tk // half} scale rows, neither a multiple of 8 nor all of them")
        if half % 32 and half != tk:
            # Each group's rows are sliced from the int8 block, whose tiles are 32 rows.
            problems.append(f"a scale group of {half} packed rows does not fill whole int8 tiles (32 rows)")
    elif tk != half:
        problems.append(f"the GPU kernel steps one scale group per k block: tk must be {half}, got {tk}")
    return problems


def supports(m: int, k: int, n: int, group: int, num_groups: int, dtype, backend: str) -> bool:
    """Whether ``gmm_int4``'s default tiling can run this problem (else dequantize and use ``gmm``)."""
    return not tiling_problems(default_tiling(m, k, n, group, num_groups, dtype, backend), m, k, n, group, backend)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "backend", "preferred_element_type"))
def gmm_int4(
    lhs: jax.Array,  # [m, k], rows sorted by group
    rhs_q: jax.Array,  # [G_local, k/2, n] int8, two int4 values per byte along the contraction
    scale: jax.Array,  # [G_local, k/g, n] one scale per group of g contraction entries
    group_sizes: jax.Array,  # [G] int32
    group_offset: jax.Array | int = 0,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
    backend: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """out[r] = lhs[r] @ dequantize(rhs_q[g], scale[g]) for row r of local group g (f32 accumulation);
    other rows zero. ``tiling`` = (tm, tk, tn) with ``tk`` in packed rows (see the module doc)."""
    if interpret is None:
        interpret = default_interpret()
    variant = resolve_backend(backend, interpret)
    m, k = lhs.shape
    g_local, kh, n = rhs_q.shape
    if (rhs_q.dtype != jnp.int8 or k != 2 * kh or scale.ndim != 3 or scale.shape[0] != g_local or scale.shape[2] != n
            or not 0 < scale.shape[1] <= kh or kh % scale.shape[1]):
        raise ValueError(f"gmm_int4 needs lhs [m, k], packed int8 rhs [G, k/2, n] and scales [G, k/g, n], got "
                         f"{lhs.shape}, {rhs_q.dtype} {rhs_q.shape} and {scale.shape}")
    group = 2 * kh // scale.shape[1]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    tiling = tuple(int(t) for t in (tiling or default_tiling(m, k, n, group, g_local, lhs.dtype, variant)))
    problems = tiling_problems(tiling, m, k, n, group, variant)
    if problems:
        raise ValueError(f"gmm_int4 (k={k} in groups of {group}): " + "; ".join(problems))
    starts, ends = local_group_bounds(group_sizes, group_offset, g_local, m)
    pairs = lhs.reshape(m, kh, 2)
    even, odd = pairs[:, :, 0], pairs[:, :, 1]  # lhs columns 2i and 2i+1: they meet the low and high nibbles
    impl = _gmm_int4_tpu if variant == "tpu" else _gmm_int4_gpu
    return impl(even, odd, rhs_q, scale, starts, ends, tiling, out_dtype, interpret)

