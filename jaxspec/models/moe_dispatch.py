"""Expert dispatch: compute sum_k w[n,k] * expert_{e[n,k]}(x[n]) with a selectable backend.

Every backend is dropless (no capacity): a token's output never depends on which
other tokens share the batch, which speculative verification relies on.

Backends (``BACKENDS``):
  dense   every expert computes every token (one batched matmul per projection); masked
          combine. The reference, and on CPU the fastest where a step routes at least as many
          rows as there are experts (a verification, decode at 4+ rows): every expert is read
          anyway, and three batched matmuls cost less than a chosen expert's dozen small ones.
  sorted  assignments sorted by expert and packed into row tiles that each belong
          to one expert; each tile multiplies only its expert's weights; results
          scattered back. Work ~ assigned rows, not rows x experts.
  per_expert  a loop over experts that skips (``lax.cond``) every expert no token
          chose; a chosen expert computes all N rows, weighted by the combine
          matrix. Reads only the chosen experts' weights and copies none, so on
          CPU it is the fastest for decode and verification-sized batches, where
          the step is bound by reading expert weights.
  per_expert_static  per_expert unrolled over experts, each expert's weights a static slice
          (XLA:CPU still copies a slice of a stacked [E, D, F] array before its matmul; held
          per expert, ``ExpertSlices``, they are read in place).
  expert_rows  each chosen expert computes only its routed rows, their count rounded up to a
          power of two (``lax.switch`` over sizes): work ~ assignments; for verification-sized
          batches on CPU.
  expert_chunks  assignments sorted by expert; each expert loops over its own rows in fixed-size
          chunks (``while_loop``; experts unrolled, static weight slices): work ~ assignments, and it
          compiles in about a second where ``expert_rows`` takes several. On CPU the fastest from
          about 40 routed tokens up (prefill, verification at several rows). Forward only.
  ragged  sorted rows through ``jax.lax.ragged_dot`` (XLA's grouped matmul; on CPU
          it computes every group densely, so it is only chosen on accelerators).
  pallas  sorted rows through the Pallas grouped matmul ``pallas_kernels.gmm`` (``moe_pallas``).
  expert_parallel  experts split over the mesh of ``jax.set_mesh`` (``moe_parallel``).
  cpu_fused  every routed (row, expert) pair in one C++ call per layer (``cpu_kernels.moe_ffn``,
          ``moe_cpu``): chosen experts read once, in place, over XLA's threads; float32, CPU, forward
          only. Chosen by measurement (the first candidate: ties go to it); on this machine it wins
          or ties every count for the built-in target and the Mixtral-shaped model (docs/kernels.md).
``pallas``, ``expert_parallel`` and ``cpu_fused`` live in their own modules, which import this one and
register themselves; ``choose_backend`` imports them by module path on first use
(``load_backend``), so importing jaxspec loads no Pallas code, and no module imports
back into one that is importing it.
``auto`` picks per platform and token count (see ``choose_backend``); on an accelerator it picks
``ragged`` until the Pallas kernel is recorded as validated there (``jaxspec.kernels``), and on a GPU
where it is, the kernel only for steps that route enough rows to beat ``ragged_dot``.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from jaxspec.models.expert_slices import whole
from jaxspec.models.quant import QArray, qeinsum, qragged_dot

# fn(x[N,D], expert_ids[N,k], weights[N,k], w_gate[E,D,F], w_up[E,D,F], w_down[E,F,D]) -> [N,D]
DispatchFn = Callable[..., jax.Array]
BACKENDS: dict[str, DispatchFn] = {}
# Backends that only index expert weights one expert at a time (``w[e]``, e static): they take
# weights held per expert (``ExpertSlices``) as they are; every other backend gets them stacked.
SLICE_BACKENDS: set[str] = set()


def register_backend(name: str, fn: DispatchFn, per_expert_slices: bool = False) -> None:
    BACKENDS[name] = fn
    if per_expert_slices:
        SLICE_BACKENDS.add(name)


def run_backend(name: str, x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """Backend ``name`` on these weights, stacked first unless it reads them per expert."""
    if name not in SLICE_BACKENDS:
        w_gate, w_up, w_down = whole(w_gate), whole(w_up), whole(w_down)
    return BACKENDS[name](x, expert_ids, weights, w_gate, w_up, w_down)


def _swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, spec: str, out_spec: str) -> jax.Array:
    h = jax.nn.silu(qeinsum(spec, x, w_gate)) * qeinsum(spec, x, w_up)
    return qeinsum(out_spec, h, w_down)


def every_expert(x, w_gate, w_up, w_down) -> jax.Array:
    """Every expert's SwiGLU FFN on every row of x [N, D] -> [E, N, D] (x's dtype)."""
    if any(isinstance(w, QArray) for w in (w_gate, w_up, w_down)):
        # One expert at a time, so only that expert's weights are ever widened or dequantized.
        return jax.lax.map(lambda ws: _swiglu(x, *ws, "nd,df->nf", "nf,fd->nd"), (w_gate, w_up, w_down))
    # x broadcast over experts makes E a batch dimension of each product: contracting D out of the
    # middle of w [E, D, F] without one would make XLA copy the weights into [D, E*F] first.
    xb = jnp.broadcast_to(x, (w_gate.shape[0],) + x.shape)  # [E, N, D]
    return _swiglu(xb, w_gate, w_up, w_down, "end,edf->enf", "enf,efd->end")


def dispatch_dense(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N,E]
    y = every_expert(x, w_gate, w_up, w_down)  # [E,N,D]
    return jnp.sum(y.astype(jnp.float32) * combine.T[:, :, None], axis=0).astype(x.dtype)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sorted_tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile: about the mean group size, a power of two in [1, 128]."""
    return int(min(128, _next_pow2(max(1, num_assignments // num_experts))))


def sort_assignments(expert_ids: jax.Array, num_experts: int):
    """The N*k assignments sorted by expert (stable): (order, token of each sorted row, its expert,
    rows per expert [E] int32). Shared by the grouped backends (``sorted``, ``ragged``, ``pallas``)."""
    n, k = expert_ids.shape
    flat_e = expert_ids.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # [A]
    token_of = (order // k).astype(jnp.int32)  # token index of each sorted assignment
    sorted_e = flat_e[order]
    group_sizes = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
    return order, token_of, sorted_e, group_sizes


def dispatch_sorted(x, expert_ids, weights, w_gate, w_up, w_down, tile_rows: int | None = None) -> jax.Array:
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    a = n * k
    tile = tile_rows or sorted_tile_rows(a, num_experts)
    order, token_of, sorted_e, group_sizes = sort_assignments(expert_ids, num_experts)
    # Pad every group to a multiple of `tile` so each tile holds one expert's rows.
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    dest = padded_starts[sorted_e] + jnp.arange(a, dtype=jnp.int32) - group_starts[sorted_e]  # [A]
    num_tiles = -(-(a + num_experts * (tile - 1)) // tile)  # static bound on padded rows / tile
    rows = num_tiles * tile
    row_token = jnp.full((rows,), n, jnp.int32).at[dest].set(token_of)  # n = the zero row
    row_weight = jnp.zeros((rows,), jnp.float32).at[dest].set(weights.reshape(-1)[order].astype(jnp.float32))
    tile_expert = jnp.minimum(
        jnp.searchsorted(padded_ends, jnp.arange(num_tiles, dtype=jnp.int32) * tile, side="right"), num_experts - 1
    )
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    xs = x_pad[row_token].reshape(num_tiles, tile, -1)  # [tiles, tile, D]
    y = _swiglu(xs, w_gate[tile_expert], w_up[tile_expert], w_down[tile_expert], "trd,tdf->trf", "trf,tfd->trd")
    y = y.reshape(rows, -1).astype(jnp.float32) * row_weight[:, None]
    out = jnp.zeros((n + 1, x.shape[1]), jnp.float32).at[row_token].add(y)
    return out[:n].astype(x.dtype)


def dispatch_ragged(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    order, token_of, sorted_e, group_sizes = sort_assignments(expert_ids, num_experts)
    xs = x[token_of]  # [A, D], rows grouped by expert
    mm = lambda lhs, w: qragged_dot(lhs, w, group_sizes, sorted_e)  # noqa: E731  (w float or quantized)
    h = jax.nn.silu(mm(xs, w_gate)) * mm(xs, w_up)
    y = mm(h, w_down).astype(jnp.float32)
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token_of].add(y).astype(x.dtype)


def dispatch_per_expert(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    return per_expert_f32(x, expert_ids, weights, w_gate, w_up, w_down).astype(x.dtype)


def per_expert_f32(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """``per_expert`` summed in float32 [N, D]. Ids outside [0, E) count for no expert (expert
    parallelism passes other devices' experts that way)."""
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N,E]
    chosen = jnp.any(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.bool_), axis=(0, 1))  # [E]

    def one_expert(e, out):  # out [N, D] f32
        def run(out):
            take = lambda w: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), w)  # noqa: E731
            y = _swiglu(x, take(w_gate), take(w_up), take(w_down), "nd,df->nf", "nf,fd->nd")
            return out + y.astype(jnp.float32) * jax.lax.dynamic_slice_in_dim(combine, e, 1, axis=1)

        return jax.lax.cond(chosen[e], run, lambda out: out, out)

    return jax.lax.fori_loop(0, num_experts, one_expert, jnp.zeros(x.shape, jnp.float32))


def dispatch_per_expert_static(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """``per_expert`` with the expert loop unrolled: each expert's weights are a static slice,
    which XLA:CPU reads in place where the loop's dynamic slice copies them first."""
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    chosen = jnp.any(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.bool_), axis=(0, 1))  # [E]
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        def run(out, e=e):
            y = _swiglu(x, w_gate[e], w_up[e], w_down[e], "nd,df->nf", "nf,fd->nd")
            return out + y.astype(jnp.float32) * combine[:, e : e + 1]

        out = jax.lax.cond(chosen[e], run, lambda out: out, out)
    return out.astype(x.dtype)


def _row_buckets(n: int, max_sizes: int = 8) -> list[int]:
    """Powers of two below n, then n; at most ``max_sizes`` of them (the smallest dropped: an expert
    with few rows then computes up to n / 2^(max_sizes-1) rows), bounding the branches compiled."""
    sizes, c = [], 1
    while c < n:
        sizes.append(c)
        c *= 2
    return (sizes + [n])[-max_sizes:]


def dispatch_expert_rows(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """Each chosen expert computes only the rows routed to it: their count is rounded up to a power
    of two (a ``lax.switch`` over compiled sizes), so the work is ~ the assignments, not tokens x
    chosen experts, with no weight copies (experts unrolled). Dropless: the largest size is N."""
    n, d = x.shape
    num_experts = w_gate.shape[0]
    routed = jnp.any(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.bool_), axis=1)  # [N, E]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    combine = jnp.concatenate([combine, jnp.zeros((1, num_experts), jnp.float32)])  # row n: the empty row
    counts = jnp.sum(routed, axis=0)  # [E]
    sizes = _row_buckets(n)
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    out = jnp.zeros((n + 1, d), jnp.float32)
    for e in range(num_experts):
        def make(c, e=e):
            def run(out):
                rows = jnp.nonzero(routed[:, e], size=c, fill_value=n)[0]  # [c]; n = the empty row
                y = _swiglu(x_pad[rows], w_gate[e], w_up[e], w_down[e], "nd,df->nf", "nf,fd->nd")
                return out.at[rows].add(y.astype(jnp.float32) * combine[rows, e][:, None])

            return run

        which = jnp.where(counts[e] > 0, jnp.searchsorted(jnp.asarray(sizes), counts[e]) + 1, 0)
        out = jax.lax.switch(which, [lambda out: out] + [make(c) for c in sizes], out)
    return out[:n].astype(x.dtype)


def dispatch_expert_chunks(x, expert_ids, weights, w_gate, w_up, w_down, chunk: int | None = None) -> jax.Array:
    """Assignments sorted by expert; each expert runs over its own rows in chunks of ``chunk`` rows
    (a ``while_loop`` per expert, experts unrolled: static weight slices, no copies), rows of the
    chunk past the expert's last one masked out. Work ~ the assignments plus under a chunk per
    expert. Like ``expert_rows`` without its switch over row counts: one small loop body per expert
    to compile. Ids outside [0, E) (padding) sort outside every expert's range and count for none."""
    n, k = expert_ids.shape
    d = x.shape[1]
    num_experts = w_gate.shape[0]
    a = n * k
    c = chunk or sorted_tile_rows(a + num_experts - 1, num_experts)  # about the mean rows per expert
    flat_e = expert_ids.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # [A]
    token_of = (order // k).astype(jnp.int32)
    sorted_e = flat_e[order]
    experts = jnp.arange(num_experts, dtype=sorted_e.dtype)
    starts = jnp.searchsorted(sorted_e, experts, side="left").astype(jnp.int32)  # [E]
    ends = jnp.searchsorted(sorted_e, experts, side="right").astype(jnp.int32)
    # c zero rows past the end keep the last chunk's slice in bounds.
    xs = jnp.concatenate([x[token_of], jnp.zeros((c, d), x.dtype)])  # [A + c, D]
    ys = jnp.zeros((a + c, d), jnp.float32)
    offsets = jnp.arange(c, dtype=jnp.int32)
    for e in range(num_experts):
        def body(carry, e=e):
            pos, ys = carry
            y = _swiglu(jax.lax.dynamic_slice_in_dim(xs, pos, c), w_gate[e], w_up[e], w_down[e], "nd,df->nf", "nf,fd->nd")
            keep = (pos + offsets < ends[e])[:, None]  # the chunk's rows that are this expert's
            old = jax.lax.dynamic_slice_in_dim(ys, pos, c)
            return pos + c, jax.lax.dynamic_update_slice_in_dim(ys, jnp.where(keep, y.astype(jnp.float32), old), pos, 0)

        _, ys = jax.lax.while_loop(lambda carry, e=e: carry[0] < ends[e], body, (starts[e], ys))
    y = ys[:a] * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((n, d), jnp.float32).at[token_of].add(y).astype(x.dtype)


register_backend("dense", dispatch_dense)
register_backend("per_expert_static", dispatch_per_expert_static, per_expert_slices=True)
register_backend("expert_rows", dispatch_expert_rows, per_expert_slices=True)
register_backend("expert_chunks", dispatch_expert_chunks, per_expert_slices=True)
register_backend("per_expert", dispatch_per_expert)
register_backend("sorted", dispatch_sorted)
register_backend("ragged", dispatch_ragged)

# Measured on the 2-core CPU (jitted dispatch alone, 8 experts, top-2): per_expert up to this many
# tokens (decode, verification, prefills up to 128; 8 experts of 192x384: per_expert 11.8 ms vs sorted
# 13.5 ms at 128 tokens, 21 vs 15 at 256), expert_chunks above (Mixtral-shaped layer, 8 experts of
# 256x512: 10.4 ms vs sorted 17.4 and per_expert 20.5 at 512 tokens; 22 vs 54 and 58 at 1536).
# expert_rows measured faster above 4 tokens (40 tokens: 1.6 vs 2.3 ms per_expert; 512: 7.4 vs 9.9
# sorted) but stays opt-in (moe_backend="expert_rows", or a measured DispatchTable): in a long test
# process that had the persistent compilation cache enabled, XLA:CPU crashed compiling such steps.
CPU_PER_EXPERT_MAX_TOKENS = 128
# ``dense`` from as many routed rows as experts up to this many per expert (Mixtral-shaped layer,
# 8 experts of 256x512, top-2, one layer's dispatch: 8 tokens 0.65 ms vs per_expert 2.1 ms,
# 40 tokens 2.3 vs 3.4 ms; 64 tokens 3.8 vs expert_rows 3.4 ms): above, computing every expert
# for every row costs more FLOPs than computing only the chosen ones saves in op count.
CPU_DENSE_MAX_ROWS_PER_EXPERT = 12


def cpu_computes_every_expert(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``auto`` on a CPU runs float experts through ``dense``: a step routing E to 12·E rows."""
    return num_experts <= num_tokens * top_k <= CPU_DENSE_MAX_ROWS_PER_EXPERT * num_experts


# Backends registered by their own module, imported on first use: name -> (module, optional).
# An optional one whose import fails (Pallas missing from this jax build) is just unavailable.
LAZY_BACKENDS: dict[str, tuple[str, bool]] = {
    "expert_parallel": ("jaxspec.models.moe_parallel", False),
    "pallas": ("jaxspec.models.moe_pallas", True),
    "cpu_fused": ("jaxspec.models.moe_cpu", True),
}


def load_backend(name: str) -> bool:
    """Whether backend ``name`` is registered, importing its module first if it is a lazy one."""
    if name not in BACKENDS and name in LAZY_BACKENDS:
        module, optional = LAZY_BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            if not optional:
                raise
    return name in BACKENDS


def available_backends() -> list[str]:
    """Every backend name that can be used here (lazy ones imported), sorted."""
    for name in LAZY_BACKENDS:
        load_backend(name)
    return sorted(BACKENDS)


# On an H200 (docs/device/nvidia-h200-2026-11-30.md) the Pallas grouped matmul beat ragged_dot from
# 512 routed rows (Qwen3-30B-A3B decode of 64 tokens, every prefill: 1.8x to 26x) and lost below
# (Mixtral-8x7B decode of 64 tokens: 0.85x; the 334M bench MoE's decode steps: 0.55-0.9x).
GPU_PALLAS_MIN_ROWS = 512


def grouped_kernel(w) -> str:
    """The Pallas grouped-matmul kernel (``jaxspec.kernels`` name) the pallas backend runs for expert weight ``w``."""
    return {8: "gmm_int8", 4: "gmm_int4"}[w.bits] if isinstance(w, QArray) else "gmm"


def choose_backend(requested: str, num_tokens: int, platform: str | None = None, top_k: int = 1,
                   kernel: str = "gmm", num_experts: int | None = None) -> str:
    """Resolve ``auto`` to a concrete backend for this platform and token count (static ints; a
    step routes ``num_tokens * top_k`` rows to the experts). ``kernel``: the grouped matmul the
    experts' format needs (``grouped_kernel``); ``auto`` picks Pallas only where that one is validated.
    ``num_experts`` (when given) lets a CPU step that routes about as many rows as there are
    experts compute them all densely."""
    if requested != "auto":
        if not load_backend(requested):
            raise ValueError(
                f"unknown MoE dispatch backend {requested!r}; available: {', '.join(available_backends())}, auto"
            )
        return requested
    platform = platform or jax.default_backend()
    if platform in ("tpu", "gpu", "cuda", "rocm"):
        from jaxspec.kernels import validated

        # The Pallas grouped matmul only where it has been validated on the hardware (jaxspec.kernels).
        if not (validated(kernel, platform) and load_backend("pallas")):
            return "ragged"
        if platform != "tpu" and num_tokens * top_k < GPU_PALLAS_MIN_ROWS:
            return "ragged"
        return "pallas"
    if kernel == "gmm" and num_experts and cpu_computes_every_expert(num_tokens, top_k, num_experts):
        return "dense"  # float experts only: quantized ones would be dequantized one expert at a time
    return "per_expert" if num_tokens <= CPU_PER_EXPERT_MAX_TOKENS else "expert_chunks"


def dispatch(x, expert_ids, weights, w_gate, w_up, w_down, backend: str | DispatchFn = "auto") -> jax.Array:
    """x [N, D], expert_ids/weights [N, k], expert weights [E, D, F] / [E, F, D] -> [N, D].

    ``backend`` is a name, or a hashable callable with the dispatch signature that carries its
    own configuration (``moe_parallel.ExpertParallel`` holds its mesh this way)."""
    if callable(backend):  # a DispatchTable stacks what its choice needs; others get whole arrays
        if not getattr(backend, "takes_expert_slices", False):
            w_gate, w_up, w_down = whole(w_gate), whole(w_up), whole(w_down)
        return backend(x, expert_ids, weights, w_gate, w_up, w_down)
    name = choose_backend(backend, x.shape[0], top_k=expert_ids.shape[1], kernel=grouped_kernel(w_gate),
                          num_experts=w_gate.shape[0])
    return run_backend(name, x, expert_ids, weights, w_gate, w_up, w_down)
