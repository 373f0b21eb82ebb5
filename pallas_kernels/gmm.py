"""Grouped matmul for mixture-of-experts layers: Pallas kernels for TPU (Mosaic) and GPU (Triton).

``gmm(lhs[m, k], rhs[G_local, k, n], group_sizes[G]) -> [m, n]`` multiplies each row
of ``lhs`` by the weight matrix of the group it belongs to. Rows are sorted by group
(see ``gmm_reference`` for the exact contract, shared by every variant):

* ragged and empty groups; ``m`` need not be a multiple of the row tile;
* rows past ``sum(group_sizes)`` come back as exact zeros;
* ``group_offset``: ``rhs`` may hold only an expert-parallel shard of the groups
  (``group_offset .. group_offset + G_local - 1``) while ``group_sizes`` still lists
  every group; rows of other shards' groups are zeros, so shard results sum to the
  full one. ``group_offset`` may be traced (``jax.lax.axis_index`` * G_local).
* float32 accumulation whatever the input dtype; the output dtype is
  ``preferred_element_type`` (default: ``lhs.dtype``).
* reverse-mode differentiable: d lhs is ``gmm`` against the transposed weights
  (``transpose_rhs``), d rhs the transposed grouped matmul ``tgmm``, which writes
  zeros for empty groups. Backward tilings are chosen by shape.

TPU variant: a sequential grid over ``(n tiles, work items, k tiles)``. A work item
is one (row tile, group) pair that overlaps; there are at most
``cdiv(m, tm) + G_local - 1`` of them, a static bound, and their list is computed
on device from ``group_sizes`` and handed to the kernel by scalar prefetch so that
block index maps can read it. Work items of one row tile are consecutive, so that
tile's output block stays resident in VMEM while each group fills in its rows; the
first visit zero-fills the rows no local group owns. Items past the real list, and
tiles no local group touches, repeat the previous item's input blocks so the
pipeline issues no DMA for them.

GPU variant: a static grid over (row tiles, n tiles) with power-of-two blocks. Each
program loops over the (few) groups overlapping its row tile and over k, loading
masked tiles, and stores its output tile once: no races, no atomics, and no
alignment requirements on any dimension.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, matmul_precision, next_pow2, resolve_backend
from pallas_kernels.gmm_reference import local_group_bounds

Tiling = tuple[int, int, int]  # (tm, tk, tn): rows, contraction, output columns

# TPU: lane-dim tiles tried from the largest; a dimension no candidate divides is taken whole
# (a block equal to the array dimension is always legal for Mosaic).
_TPU_LANE_TILES = (512, 256, 128)
_TPU_MAX_ROWS = 512
_GPU_MAX_ROWS = 128
_INT32_MAX = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one grouped-matmul call (hashable: a custom_vjp nondiff argument)."""

    tiling: Tiling | None  # None: chosen by shape
    backend: Literal["tpu", "gpu"]
    interpret: bool
    out_dtype: str | None  # None: lhs dtype
    transpose_rhs: bool
    num_warps: int = 4
    num_stages: int = 2


# ------------------------------------------------------------------------------------- tiling
def choose_tiling(m: int, k: int, n: int, num_groups: int, dtype, backend: Literal["tpu", "gpu"]) -> Tiling:
    """Default (tm, tk, tn) for an ``[m, k] x [G, k, n]`` problem (``k`` is always the contraction).

    Row tiles follow the mean group size: a tile much taller than a group multiplies
    rows that are masked away (every overlapping group visits the whole tile), while a
    short tile costs MXU/tensor-core efficiency only, not bandwidth.
    """
    mean_rows = cdiv(max(m, 1), max(num_groups, 1))
    if backend == "tpu":
        min_rows = 16 if jnp.dtype(dtype).itemsize == 2 else 8  # bf16 packs 16 rows per vreg
        tm = min(_TPU_MAX_ROWS, max(min_rows, next_pow2(mean_rows)))
        tm = m if m <= tm else tm  # a block equal to the whole dimension is legal at any size
        tk = next((t for t in _TPU_LANE_TILES if k % t == 0), k)
        tn = next((t for t in _TPU_LANE_TILES if n % t == 0), n if n <= 2048 else _TPU_LANE_TILES[0])
        return tm, tk, tn
    tm = min(_GPU_MAX_ROWS, max(16, next_pow2(mean_rows)))
    tk = min(64 if jnp.dtype(dtype).itemsize <= 2 else 32, max(16, next_pow2(k)))
    tn = min(128, max(16, next_pow2(n)))
    return tm, tk, tn


def validate_tiling(tiling: Tiling, m: int, k: int, n: int, backend: Literal["tpu", "gpu"], op: str = "gmm") -> None:
    """Raise ValueError (naming the offending block shapes) for a tiling the backend cannot compile."""
    tm, tk, tn = (int(t) for t in tiling)
    if min(tm, tk, tn) <= 0:
        raise ValueError(f"{op}: tiling {tiling} must be positive")
    if backend == "tpu":
        problems = []
        if not (tm % 8 == 0 or tm == m):
            problems.append(f"tm={tm} is neither a multiple of 8 nor m={m}")
        if not (tk % 128 == 0 or tk == k):
            problems.append(f"tk={tk} is neither a multiple of 128 nor k={k}")
        if not (tn % 128 == 0 or tn == n):
            problems.append(f"tn={tn} is neither a multiple of 128 nor n={n}")
        if k % tk:
            # A partial contraction tile would add whatever lies past the array edge into every output.
            problems.append(f"tk={tk} does not divide the contraction dimension k={k}")
        if problems:
            raise ValueError(
                f"{op}: illegal TPU tiling (tm, tk, tn)={tuple(tiling)} for lhs block ({tm}, {tk}), "
                f"rhs block ({tk}, {tn}) and output block ({tm}, {tn}) of an [{m}, {k}] x [G, {k}, {n}] problem: "
                + "; ".join(problems)
                + ". Mosaic requires the last two dimensions of every block to be divisible by (8, 128) "
                "or equal to the array's dimensions."
            )
    else:
        bad = [f"{name}={t}" for name, t in zip(("tm", "tk", "tn"), (tm, tk, tn)) if t < 16 or t & (t - 1)]
        if bad:
            raise ValueError(
                f"{op}: illegal GPU tiling (tm, tk, tn)={tuple(tiling)} for lhs block ({tm}, {tk}) and rhs block "
                f"({tk}, {tn}): Triton blocks must be powers of two >= 16 (tl.dot minimum); bad: {', '.join(bad)}"
            )


def _resolve_tiling(cfg: _Config, m: int, k: int, n: int, num_groups: int, dtype, op: str) -> Tiling:
    tiling = cfg.tiling or choose_tiling(m, k, n, num_groups, dtype, cfg.backend)
    validate_tiling(tiling, m, k, n, cfg.backend, op)
    return tuple(int(t) for t in tiling)  # type: ignore[return-value]


# ------------------------------------------------------------------ TPU work-item metadata
def _carry_forward(values: jax.Array, active: jax.Array) -> jax.Array:
    """values[last active index <= i] (values[0] before the first): the blocks an idle item re-uses."""
    idx = jnp.arange(values.shape[0], dtype=jnp.int32)
    src = jnp.maximum(lax.cummax(jnp.where(active, idx, -1)), 0)
    return values[src]


def _row_tile_metadata(starts: jax.Array, ends: jax.Array, m: int, tm: int, num_items: int) -> dict[str, jax.Array]:
    """Work items in row-tile order for ``gmm``: every row tile once per overlapping local group, or once if none."""
    num_tiles = cdiv(m, tm)
    g = starts.shape[0]
    nonempty = ends > starts
    one = nonempty.astype(jnp.int32)
    first_tile = starts // tm
    last_tile = (ends - 1) // tm
    # Groups overlapping each tile, by a difference array over the tiles.
    diff = jnp.zeros((num_tiles + 1,), jnp.int32)
    diff = diff.at[jnp.where(nonempty, first_tile, num_tiles)].add(one)
    diff = diff.at[jnp.where(nonempty, last_tile + 1, num_tiles)].add(-one)
    count = jnp.cumsum(diff)[:num_tiles]
    visits = jnp.maximum(count, 1)
    tile_end = jnp.cumsum(visits)
    tile_start = tile_end - visits
    total = tile_end[-1]

    item = jnp.arange(num_items, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(tile_end, item, side="right", method="compare_all"), num_tiles - 1).astype(jnp.int32)
    j = item - tile_start[tile]
    valid = item < total
    # Non-empty local groups in order; the first overlapping a tile is the first not ending before it.
    rank = jnp.cumsum(one) - one
    ne_ids = jnp.zeros((g,), jnp.int32).at[jnp.where(nonempty, rank, g)].set(jnp.arange(g, dtype=jnp.int32), mode="drop")
    ne_ends = jnp.where(jnp.arange(g) < jnp.sum(one), ends[ne_ids], _INT32_MAX)
    first_rank = jnp.searchsorted(ne_ends, tile * tm, side="right", method="compare_all").astype(jnp.int32)
    group = ne_ids[jnp.clip(first_rank + j, 0, g - 1)]
    active = valid & (count[tile] > 0)
    return {
        "tile": tile,
        "group": group,
        "active": active.astype(jnp.int32),
        "first": (valid & (j == 0)).astype(jnp.int32),
        "dma_tile": _carry_forward(tile, active),
        "dma_group": _carry_forward(group, active),
    }


def _group_metadata(starts: jax.Array, ends: jax.Array, m: int, tm: int, num_items: int) -> dict[str, jax.Array]:
    """Work items in group order for ``tgmm``: every local group once per overlapping row tile, or once if empty."""
    num_tiles = cdiv(m, tm)
    g = starts.shape[0]
    nonempty = ends > starts
    first_tile = starts // tm
    span = jnp.where(nonempty, (ends - 1) // tm - first_tile + 1, 0)
    visits = jnp.maximum(span, 1)
    group_end = jnp.cumsum(visits)
    group_start = group_end - visits
    total = group_end[-1]

    item = jnp.arange(num_items, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(group_end, item, side="right", method="compare_all"), g - 1).astype(jnp.int32)
    j = item - group_start[group]
    valid = item < total
    active = valid & nonempty[group]
    tile = jnp.clip(first_tile[group] + j, 0, num_tiles - 1)
    return {
        "group": group,
        "active": active.astype(jnp.int32),
        "first": (valid & (j == 0)).astype(jnp.int32),
        "last": (valid & (j == visits[group] - 1)).astype(jnp.int32),
        "tile": tile,
        "dma_tile": _carry_forward(tile, active),
    }


# ----------------------------------------------------------------------------- TPU kernels
def _gmm_tpu_kernel(
    tile_ref, group_ref, active_ref, first_ref, dma_tile_ref, dma_group_ref, starts_ref, ends_ref,  # SMEM
    lhs_ref, rhs_ref, out_ref, acc_ref,
    *, tm: int, num_k_tiles: int, transpose_rhs: bool, precision,
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
        contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
        acc_ref[...] += lax.dot_general(
            lhs_ref[...], rhs_ref[...], (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    @pl.when(kk == num_k_tiles - 1)
    def _():
        g = group_ref[i]
        rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = active & (rows >= starts_ref[g]) & (rows < ends_ref[g])
        # The first visit of a row tile starts from zeros (rows no local group owns stay zero); later
        # visits keep the resident block and fill in this group's rows. Idle padding items rewrite
        # the block unchanged. Selects, not arithmetic: unwritten VMEM may hold NaN patterns.
        kept = jnp.where(first, jnp.zeros(out_ref.shape, out_ref.dtype), out_ref[...])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), kept)


def _gmm_tpu(lhs, rhs, starts, ends, cfg: _Config, tiling: Tiling, out_dtype) -> jax.Array:
    m, k = lhs.shape
    g_local = rhs.shape[0]
    n = rhs.shape[1] if cfg.transpose_rhs else rhs.shape[2]
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
        if cfg.transpose_rhs:
            return dma_group[i], j, k_block(i, kk, active)
        return dma_group[i], k_block(i, kk, active), j

    def out_map(j, i, kk, tile, group, active, first, dma_tile, dma_group, s, e):
        return tile[i], j

    rhs_block = (None, tn, tk) if cfg.transpose_rhs else (None, tk, tn)
    kernel = functools.partial(
        _gmm_tpu_kernel, tm=tm, num_k_tiles=num_k_tiles, transpose_rhs=cfg.transpose_rhs,
        precision=matmul_precision(lhs.dtype),
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=int(m * k * itemsize + rhs.size * itemsize + m * n * jnp.dtype(out_dtype).itemsize),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(cdiv(n, tn), num_items, num_k_tiles),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # Items revisit output blocks, so only the n axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name="gmm_tpu",
    )(*scalars, lhs, rhs)


def _tgmm_tpu_kernel(
    group_ref, active_ref, first_ref, last_ref, tile_ref, dma_tile_ref, starts_ref, ends_ref,  # SMEM
    lhs_ref, rhs_ref, out_ref, acc_ref,
    *, tm: int, precision,
):
    del dma_tile_ref
    i = pl.program_id(2)

    @pl.when(first_ref[i] == 1)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active_ref[i] == 1)
    def _():
        g = group_ref[i]
        rows = tile_ref[i] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mask = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        # Both operands are masked: rows past m in a partial tile hold garbage (possibly NaN), and 0 * NaN = NaN.
        a = jnp.where(mask, lhs_ref[...], 0)
        b = jnp.where(mask, rhs_ref[...], 0)
        acc_ref[...] += lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    @pl.when(last_ref[i] == 1)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_tpu(lhs, rhs, starts, ends, cfg: _Config, tiling: Tiling, out_dtype) -> jax.Array:
    """lhs [m, k], rhs [m, n] -> [G_local, k, n]; tiling (tm, tk, tn) with tm the contraction here."""
    m, k = lhs.shape
    n = rhs.shape[1]
    g_local = starts.shape[0]
    tm, tk, tn = tiling
    num_items = cdiv(m, tm) + g_local - 1
    meta = _group_metadata(starts, ends, m, tm, num_items)
    scalars = (meta["group"], meta["active"], meta["first"], meta["last"], meta["tile"], meta["dma_tile"], starts, ends)

    def lhs_map(ki, ni, i, group, active, first, last, tile, dma_tile, s, e):
        return dma_tile[i], ki

    def rhs_map(ki, ni, i, group, active, first, last, tile, dma_tile, s, e):
        return dma_tile[i], ni

    def out_map(ki, ni, i, group, active, first, last, tile, dma_tile, s, e):
        return group[i], ki, ni

    itemsize = jnp.dtype(lhs.dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=int((m * k + m * n) * itemsize + g_local * k * n * jnp.dtype(out_dtype).itemsize),
    )
    return pl.pallas_call(
        functools.partial(_tgmm_tpu_kernel, tm=tm, precision=matmul_precision(lhs.dtype)),
        out_shape=jax.ShapeDtypeStruct((g_local, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(cdiv(k, tk), cdiv(n, tn), num_items),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), rhs_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name="tgmm_tpu",
    )(*scalars, lhs, rhs)


# ----------------------------------------------------------------------------- GPU kernels
def _gmm_gpu_kernel(
    group_lo_ref, group_hi_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref,
    *, m: int, k: int, n: int, tm: int, tk: int, tn: int, transpose_rhs: bool, precision,
):
    t, j = pl.program_id(0), pl.program_id(1)
    rows = t * tm + jnp.arange(tm)
    cols = j * tn + jnp.arange(tn)
    col_ok = cols < n
    num_k_tiles = cdiv(k, tk)

    def group_body(g, acc):
        start, end = starts_ref[g], ends_ref[g]
        row_ok = (rows >= start) & (rows < end) & (rows < m)

        def k_body(kk, acc):
            ks = kk * tk + jnp.arange(tk)
            k_ok = ks < k
            # Masked-off elements load as 0: rows of other groups and the k tail contribute nothing.
            a = plgpu.load(lhs_ref.at[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
            if transpose_rhs:
                w = plgpu.load(
                    rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)], mask=col_ok[:, None] & k_ok[None, :], other=0
                )
                return acc + plgpu.dot(a, w, trans_b=True, precision=precision)
            w = plgpu.load(
                rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)], mask=k_ok[:, None] & col_ok[None, :], other=0
            )
            return acc + plgpu.dot(a, w, precision=precision)

        # An empty group in the range runs no k iterations. (Not jnp.where(c, int, int): the Triton
        # lowering of jax 0.10.2 turns a select of two Python-int literals into i1 constants.)
        trips = (end > start).astype(jnp.int32) * num_k_tiles
        return lax.fori_loop(0, trips, k_body, acc)

    acc = lax.fori_loop(group_lo_ref[t], group_hi_ref[t], group_body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(
        out_ref.at[pl.ds(t * tm, tm), pl.ds(j * tn, tn)],
        acc.astype(out_ref.dtype),
        mask=(rows < m)[:, None] & col_ok[None, :],
    )


def _gmm_gpu(lhs, rhs, starts, ends, cfg: _Config, tiling: Tiling, out_dtype) -> jax.Array:
    m, k = lhs.shape
    n = rhs.shape[1] if cfg.transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    num_tiles = cdiv(m, tm)
    tile_first_row = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    # Local groups overlapping tile t: those ending after its first row and starting before its end.
    group_lo = jnp.searchsorted(ends, tile_first_row, side="right", method="compare_all").astype(jnp.int32)
    group_hi = jnp.searchsorted(starts, tile_first_row + tm - 1, side="right", method="compare_all").astype(jnp.int32)
    kernel = functools.partial(
        _gmm_gpu_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn, transpose_rhs=cfg.transpose_rhs,
        precision=matmul_precision(lhs.dtype),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_tiles, cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="gmm_gpu",
    )(group_lo, group_hi, starts, ends, lhs, rhs)


def _tgmm_gpu_kernel(
    starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, m: int, k: int, n: int, tm: int, tk: int, tn: int, precision
):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]
    ks = i * tk + jnp.arange(tk)
    cols = j * tn + jnp.arange(tn)
    k_ok, col_ok = ks < k, cols < n

    def body(s, acc):
        row0 = start + s * tm  # row blocks start at the group's first row: no partly foreign first block
        rows = row0 + jnp.arange(tm)
        row_ok = (rows < end) & (rows < m)
        a = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(i * tk, tk)], mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = plgpu.load(rhs_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)], mask=row_ok[:, None] & col_ok[None, :], other=0)
        return acc + plgpu.dot(a, b, trans_a=True, precision=precision)

    # An empty group loops zero times and stores zeros.
    acc = lax.fori_loop(0, pl.cdiv(jnp.maximum(end - start, 0), tm), body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(
        out_ref.at[g, pl.ds(i * tk, tk), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype), mask=k_ok[:, None] & col_ok[None, :]
    )


def _tgmm_gpu(lhs, rhs, starts, ends, cfg: _Config, tiling: Tiling, out_dtype) -> jax.Array:
    m, k = lhs.shape
    n = rhs.shape[1]
    g_local = starts.shape[0]
    tm, tk, tn = tiling
    kernel = functools.partial(_tgmm_gpu_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn, precision=matmul_precision(lhs.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g_local, k, n), out_dtype),
        grid=(g_local, cdiv(k, tk), cdiv(n, tn)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="tgmm_gpu",
    )(starts, ends, lhs, rhs)


# --------------------------------------------------------------------------- dispatch + VJP
def _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg: _Config) -> jax.Array:
    m, k = lhs.shape
    g_local = rhs.shape[0]
    n = rhs.shape[1] if cfg.transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(cfg.out_dtype or lhs.dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:
        return jnp.zeros((m, n), out_dtype)
    tiling = _resolve_tiling(cfg, m, k, n, g_local, lhs.dtype, "gmm")
    starts, ends = local_group_bounds(group_sizes, group_offset, g_local, m)
    impl = _gmm_tpu if cfg.backend == "tpu" else _gmm_gpu
    return impl(lhs, rhs, starts, ends, cfg, tiling, out_dtype)


def _tgmm_impl(lhs, rhs, group_sizes, group_offset, num_groups: int, cfg: _Config) -> jax.Array:
    m, k = lhs.shape
    n = rhs.shape[1]
    out_dtype = jnp.dtype(cfg.out_dtype or lhs.dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    if cfg.tiling is not None:
        tiling = tuple(int(t) for t in cfg.tiling)
    elif cfg.backend == "tpu":
        # The row tile is the contraction here; k and n are output block dims (second-minor and minor).
        tm = choose_tiling(m, 128, 128, num_groups, lhs.dtype, "tpu")[0]
        tk = next((t for t in _TPU_LANE_TILES if k % t == 0), k)
        tn = next((t for t in _TPU_LANE_TILES if n % t == 0), n)
        tiling = (tm, tk, tn)
    else:
        tiling = choose_tiling(m, k, n, num_groups, lhs.dtype, "gpu")
    _validate_tgmm_tiling(tiling, m, k, n, cfg.backend)
    starts, ends = local_group_bounds(group_sizes, group_offset, num_groups, m)
    impl = _tgmm_tpu if cfg.backend == "tpu" else _tgmm_gpu
    return impl(lhs, rhs, starts, ends, cfg, tiling, out_dtype)


def _validate_tgmm_tiling(tiling: Tiling, m: int, k: int, n: int, backend: str) -> None:
    tm, tk, tn = tiling
    if backend == "gpu":
        validate_tiling(tiling, m, k, n, "gpu", "tgmm")
        return
    problems = []
    if not (tm % 8 == 0 or tm == m):
        problems.append(f"tm={tm} is neither a multiple of 8 nor m={m}")
    if not (tk % 128 == 0 or tk == k):
        problems.append(f"tk={tk} is neither a multiple of 128 nor k={k}")
    if not (tn % 128 == 0 or tn == n):
        problems.append(f"tn={tn} is neither a multiple of 128 nor n={n}")
    if problems:
        raise ValueError(
            f"tgmm: illegal TPU tiling (tm, tk, tn)={tuple(tiling)} for lhs block ({tm}, {tk}), rhs block ({tm}, {tn}) "
            f"and output block ({tk}, {tn}): " + "; ".join(problems)
            + ". Mosaic requires the last two dimensions of every block to be divisible by (8, 128) "
            "or equal to the array's dimensions."
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_vjp(lhs, rhs, group_sizes, group_offset, cfg: _Config):
    return _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg)


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, cfg: _Config):
    return _gmm_impl(lhs, rhs, group_sizes, group_offset, cfg), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg: _Config, residuals, dout):
    lhs, rhs, group_sizes, group_offset = residuals
    # Backward problems have other shapes (k and n swap roles), so their tiles are chosen by shape.
    grad_cfg = dataclasses.replace(cfg, tiling=None)
    dout = dout.astype(rhs.dtype)  # the MXU / tensor cores multiply equal dtypes; accumulation stays f32
    d_lhs = _gmm_impl(
        dout, rhs, group_sizes, group_offset,
        dataclasses.replace(grad_cfg, transpose_rhs=not cfg.transpose_rhs, out_dtype=jnp.dtype(lhs.dtype).name),
    )
    tcfg = dataclasses.replace(grad_cfg, out_dtype=jnp.dtype(rhs.dtype).name)
    if cfg.transpose_rhs:  # rhs[g] is [n, k]: d rhs[g] = dout_g^T lhs_g
        d_rhs = _tgmm_impl(dout, lhs, group_sizes, group_offset, rhs.shape[0], tcfg)
    else:  # d rhs[g] = lhs_g^T dout_g
        d_rhs = _tgmm_impl(lhs, dout, group_sizes, group_offset, rhs.shape[0], tcfg)
    # Integer inputs have no cotangent.
    return d_lhs, d_rhs, None, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _check_operands(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm expects lhs [m, k] and rhs [G, k, n]; got {lhs.shape} and {rhs.shape}")
    contract = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != contract:
        layout = "[G, n, k]" if transpose_rhs else "[G, k, n]"
        raise ValueError(f"gmm: lhs {lhs.shape} and rhs {rhs.shape} ({layout}) disagree on k")
    if rhs.shape[0] < 1:
        raise ValueError("gmm: rhs must hold at least one group")
    if jnp.ndim(group_sizes) != 1 or not jnp.issubdtype(jnp.result_type(group_sizes), jnp.integer):
        raise ValueError(f"gmm: group_sizes must be a 1-D integer array, got {jnp.shape(group_sizes)}")
    if jnp.shape(group_sizes)[0] < rhs.shape[0]:
        raise ValueError(
            f"gmm: group_sizes lists {jnp.shape(group_sizes)[0]} groups but rhs holds {rhs.shape[0]}; "
            "group_sizes must list every group (the shard's groups start at group_offset)"
        )
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"gmm: lhs and rhs dtypes differ ({lhs.dtype} vs {rhs.dtype}); cast one of them")


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int = 0,
    preferred_element_type=None,
    tiling: Tiling | None = None,
    interpret: bool = False,
    backend: str = "auto",
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped matmul ``out[r] = lhs[r] @ rhs[group(r) - group_offset]``, f32 accumulation -> [m, n].

    Args:
      lhs: [m, k], rows sorted by group.
      rhs: [G_local, k, n] (or [G_local, n, k] with ``transpose_rhs``): weights of groups
        ``group_offset .. group_offset + G_local - 1``.
      group_sizes: [G] int32, rows per group for *all* groups (G >= G_local), in row order.
      group_offset: first group held by ``rhs`` (int or traced int32 scalar).
      preferred_element_type: output dtype (default ``lhs.dtype``).
      tiling: (tm, tk, tn) = rows, contraction and output-column block sizes; None
        chooses by shape (``choose_tiling``). Validated per backend (``validate_tiling``).
      interpret: run in the Pallas interpreter (needed on CPU).
      backend: "tpu" (Mosaic), "gpu" (Triton) or "auto" (the default platform's; TPU
        variant in the interpreter on CPU).
      transpose_rhs: contract over rhs's last dimension.
    """
    _check_operands(lhs, rhs, group_sizes, transpose_rhs)
    cfg = _Config(
        tiling=None if tiling is None else tuple(int(t) for t in tiling),
        backend=resolve_backend(backend, interpret),
        interpret=bool(interpret),
        out_dtype=None if preferred_element_type is None else jnp.dtype(preferred_element_type).name,
        transpose_rhs=transpose_rhs,
    )
    if cfg.tiling is not None:  # fail early, before tracing the custom VJP
        n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        validate_tiling(cfg.tiling, lhs.shape[0], lhs.shape[1], n, cfg.backend)
    return _gmm_vjp(lhs, rhs, jnp.asarray(group_sizes, jnp.int32), jnp.asarray(group_offset, jnp.int32), cfg)


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int,
    group_offset: jax.Array | int = 0,
    preferred_element_type=None,
    tiling: Tiling | None = None,
    interpret: bool = False,
    backend: str = "auto",
) -> jax.Array:
    """Transposed grouped matmul ``out[g] = lhs[rows of g]^T @ rhs[rows of g]`` -> [num_groups, k, n].

    ``lhs`` [m, k] and ``rhs`` [m, n] share the row grouping of ``gmm`` (same
    ``group_sizes`` / ``group_offset`` contract); empty groups give zero matrices.
    ``tiling`` is (tm, tk, tn) with tm the (contracted) row block. This is the weight
    gradient of ``gmm``.
    """
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm expects lhs [m, k] and rhs [m, n]; got {lhs.shape} and {rhs.shape}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"tgmm: lhs and rhs dtypes differ ({lhs.dtype} vs {rhs.dtype})")
    cfg = _Config(
        tiling=None if tiling is None else tuple(int(t) for t in tiling),
        backend=resolve_backend(backend, interpret),
        interpret=bool(interpret),
        out_dtype=None if preferred_element_type is None else jnp.dtype(preferred_element_type).name,
        transpose_rhs=False,
    )
    return _tgmm_impl(
        lhs, rhs, jnp.asarray(group_sizes, jnp.int32), jnp.asarray(group_offset, jnp.int32), int(num_groups), cfg
    )
