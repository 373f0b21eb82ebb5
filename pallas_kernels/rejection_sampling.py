"""Fused speculative-decoding verification: accept/reject the drafts and draw the next token in one vocabulary pass.

Same interface and rule as ``rejection_sampling_reference.rejection_sample`` (read
its docstring), plus ``block_v`` / ``interpret`` / ``backend``.

Design. The accept/reject chain needs only 2K scalars per row, p_i(x_i) and
q_i(x_i); only the one position that draws (the first rejection, or the bonus
position) needs whole vocabulary rows. So each row reads its drafts' probabilities
first and then makes a single pass over that one position's p, q and noise rows in
``block_v`` tiles, keeping per-lane running argmaxes of the two exponential races
(residual max(0, p - q) / E and p / E) and a flag for a non-zero residual. No
normalised residual and no [B, K+1, V] intermediate.

* GPU (Triton): one program per row does everything: scalar loads of p and q at the
  drafts, the acceptance chain, then a loop over masked vocabulary tiles.
* TPU (Mosaic): the accepted count is computed first (a B x K gather) and handed to
  the kernel by scalar prefetch; the grid is (rows, vocabulary tiles) with VMEM
  accumulators. Mosaic's (8, 128) block rule admits no one-position block over
  [B, K+1, V], so each tile brings all K+1 positions and the kernel slices the
  drawing one out of VMEM (the reads are (K+1)x the GPU variant's; a manual-DMA
  version could fetch single rows).

Ties resolve to the lowest vocabulary index, as ``jnp.argmax`` does: each lane keeps
the first index reaching its maximum, and the final cross-lane reduction takes the
smallest index among lanes at the global maximum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import cdiv, next_pow2, resolve_backend, round_up
from pallas_kernels.rejection_sampling_reference import acceptance_counts, assemble_tokens

DEFAULT_BLOCK_V = {"tpu": 2048, "gpu": 1024}
_LANES = 128


def _race_scores(weights: jax.Array, noise: jax.Array, valid: jax.Array) -> jax.Array:
    # Same expression as rejection_sampling_reference.race_ratio on valid lanes; lanes past the
    # vocabulary get -1 so that they never win against a real entry (>= 0).
    return jnp.where(valid, jnp.where(weights > 0, weights / noise, 0.0), -1.0)


def _lane_update(best, best_idx, score, lanes):
    better = score > best  # strict: a lane keeps the first index reaching its maximum
    return jnp.where(better, score, best), jnp.where(better, lanes, best_idx)


def _first_argmax(best: jax.Array, best_idx: jax.Array, vocab: int) -> jax.Array:
    top = jnp.max(best)
    return jnp.min(jnp.where(best == top, best_idx, vocab))


# ------------------------------------------------------------------------------------- TPU
def _tpu_kernel(
    n_acc_ref, use_res_ref,  # SMEM scalar prefetch [B]
    p_ref, q_ref, e_ref,  # (K+1, block_v), (K, block_v), (K+1, block_v) tiles of one row's positions
    out_ref,  # (1, 128) int32: the drawn token, broadcast over lanes
    best_res, idx_res, best_p, idx_p, res_seen,  # (1, block_v) VMEM accumulators
    *, vocab: int, block_v: int, k: int,
):
    b, t = pl.program_id(0), pl.program_id(1)

    @pl.when(t == 0)
    def _():
        best_res[...] = jnp.full_like(best_res, -jnp.inf)
        best_p[...] = jnp.full_like(best_p, -jnp.inf)
        idx_res[...] = jnp.zeros_like(idx_res)
        idx_p[...] = jnp.zeros_like(idx_p)
        res_seen[...] = jnp.zeros_like(res_seen)

    j = n_acc_ref[b]  # the position that draws
    lanes = t * block_v + lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    valid = lanes < vocab  # the last tile may run past the vocabulary: mask, never trust its contents
    p = p_ref[pl.ds(j, 1), :]
    noise = e_ref[pl.ds(j, 1), :]
    best_p[...], idx_p[...] = _lane_update(best_p[...], idx_p[...], _race_scores(p, noise, valid), lanes)
    if k > 0:
        q = q_ref[pl.ds(jnp.minimum(j, k - 1), 1), :]
        # Rows that accepted every draft draw a bonus token: their residual is defined as zero.
        residual = jnp.where(valid & (use_res_ref[b] == 1), jnp.maximum(p - q, 0.0), 0.0)
        best_res[...], idx_res[...] = _lane_update(best_res[...], idx_res[...], _race_scores(residual, noise, valid), lanes)
        res_seen[...] = jnp.maximum(res_seen[...], residual)

    @pl.when(t == pl.num_programs(1) - 1)
    def _():
        from_target = _first_argmax(best_p[...], idx_p[...], vocab)
        if k > 0:
            from_res = _first_argmax(best_res[...], idx_res[...], vocab)
            token = jnp.where(jnp.max(res_seen[...]) > 0, from_res, from_target)
        else:
            token = from_target
        out_ref[...] = jnp.full(out_ref.shape, token, jnp.int32)


def _draw_tpu(target_probs, draft_probs, exp_noise, n_acc, num_draft, *, block_v: int, interpret: bool):
    b, k1, vocab = target_probs.shape
    k = k1 - 1
    use_res = (n_acc < num_draft).astype(jnp.int32)
    # Blocks span all K+1 positions: Mosaic's (8, 128) rule allows no single-row block over [B, K+1, V]
    # (and a [B*(K+1), 1, V] view would make XLA relayout all three arrays, several times the bytes
    # of reading K+1 rows). The kernel picks the drawing row out of VMEM with a dynamic sublane slice.
    tile = lambda rows: pl.BlockSpec((None, rows, block_v), lambda bi, t, *_: (bi, 0, t))  # noqa: E731
    q_in = draft_probs if k > 0 else target_probs  # K = 0: no draft distribution; passed, never read
    kernel = functools.partial(_tpu_kernel, vocab=vocab, block_v=block_v, k=k)
    acc = [pltpu.VMEM((1, block_v), dt) for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.int32, jnp.float32)]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, 1, _LANES), jnp.int32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, cdiv(vocab, block_v)),
            in_specs=[tile(k1), tile(q_in.shape[1]), tile(k1)],
            out_specs=pl.BlockSpec((None, 1, _LANES), lambda bi, t, *_: (bi, 0, 0)),
            scratch_shapes=acc,
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=8 * b * vocab, transcendentals=0, bytes_accessed=4 * b * vocab * (2 * k1 + max(k, 1))
        ),
        name="rejection_sample_tpu",
    )(n_acc, use_res, target_probs, q_in, exp_noise)
    return out[:, 0, 0]


# ------------------------------------------------------------------------------------- GPU
def _gpu_kernel(
    tokens_ref, num_draft_ref, uniforms_ref, p_ref, q_ref, e_ref,  # whole arrays in global memory
    out_tokens_ref, num_accepted_ref,
    *, k: int, vocab: int, block_v: int,
):
    b = pl.program_id(0)
    num_draft = jnp.clip(num_draft_ref[b], 0, k)
    # Acceptance chain from 2K scalar loads; K is small and static, so the loop unrolls.
    n_acc = jnp.int32(0)
    alive = jnp.bool_(True)
    for i in range(k):
        x = jnp.clip(tokens_ref[b, i], 0, vocab - 1)
        accept = (uniforms_ref[b, i] * q_ref[b, i, x] < p_ref[b, i, x]) & (i < num_draft)
        alive = alive & accept
        n_acc = n_acc + alive.astype(jnp.int32)
    rejected = n_acc < num_draft
    q_pos = jnp.minimum(n_acc, max(k - 1, 0))

    def body(t, carry):
        best_res, idx_res, best_p, idx_p, res_seen = carry
        lanes = t * block_v + jnp.arange(block_v)
        valid = lanes < vocab
        p = plgpu.load(p_ref.at[b, n_acc, pl.ds(t * block_v, block_v)], mask=valid, other=0.0)
        noise = plgpu.load(e_ref.at[b, n_acc, pl.ds(t * block_v, block_v)], mask=valid, other=1.0)
        best_p, idx_p = _lane_update(best_p, idx_p, _race_scores(p, noise, valid), lanes)
        if k > 0:
            q = plgpu.load(q_ref.at[b, q_pos, pl.ds(t * block_v, block_v)], mask=valid, other=0.0)
            residual = jnp.where(valid & rejected, jnp.maximum(p - q, 0.0), 0.0)
            best_res, idx_res = _lane_update(best_res, idx_res, _race_scores(residual, noise, valid), lanes)
            res_seen = jnp.maximum(res_seen, residual)
        return best_res, idx_res, best_p, idx_p, res_seen

    neg = jnp.full((block_v,), -jnp.inf, jnp.float32)
    zero_idx = jnp.zeros((block_v,), jnp.int32)
    init = (neg, zero_idx, neg, zero_idx, jnp.zeros((block_v,), jnp.float32))
    best_res, idx_res, best_p, idx_p, res_seen = lax.fori_loop(0, cdiv(vocab, block_v), body, init)
    token = _first_argmax(best_p, idx_p, vocab)
    if k > 0:
        token = jnp.where(jnp.max(res_seen) > 0, _first_argmax(best_res, idx_res, vocab), token)

    width = next_pow2(k + 1)
    pos = jnp.arange(width)
    drafts = plgpu.load(tokens_ref.at[b, pl.ds(0, width)], mask=pos < k, other=-1) if k > 0 else jnp.full((width,), -1)
    row = jnp.where(pos < n_acc, drafts, jnp.where(pos == n_acc, token, -1)).astype(jnp.int32)
    plgpu.store(out_tokens_ref.at[b, pl.ds(0, width)], row, mask=pos < k + 1)
    num_accepted_ref[b] = n_acc


def _verify_gpu(target_probs, draft_probs, draft_tokens, num_draft, uniforms, exp_noise, *, block_v, interpret):
    b, k1, vocab = target_probs.shape
    k = k1 - 1
    if k == 0:  # zero-sized operands cannot be passed to a kernel; K = 0 never reads them
        draft_tokens = jnp.full((b, 1), -1, jnp.int32)
        uniforms = jnp.zeros((b, 1), jnp.float32)
        draft_probs = target_probs
    kernel = functools.partial(_gpu_kernel, k=k, vocab=vocab, block_v=block_v)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, k1), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)),
        grid=(b,),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="rejection_sample_gpu",
    )(draft_tokens.astype(jnp.int32), num_draft, uniforms.astype(jnp.float32), target_probs, draft_probs, exp_noise)


# ---------------------------------------------------------------------------------- public
def validate_block_v(block_v: int, vocab: int, backend: str) -> None:
    if backend == "tpu":
        if not (block_v % _LANES == 0 or block_v == vocab) or block_v <= 0:
            raise ValueError(
                f"rejection_sample: illegal TPU block_v={block_v} (block shape (1, {block_v}) over a vocabulary of "
                f"{vocab}): Mosaic needs the lane dimension to be a multiple of 128 or the whole vocabulary"
            )
    elif block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"rejection_sample: illegal GPU block_v={block_v}: Triton blocks must be powers of two >= 16")


def rejection_sample(
    target_probs: jax.Array,
    draft_probs: jax.Array,
    draft_tokens: jax.Array,
    num_draft: jax.Array,
    uniforms: jax.Array,
    exp_noise: jax.Array,
    *,
    block_v: int | None = None,
    interpret: bool = False,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Fused kernel version of ``rejection_sampling_reference.rejection_sample`` -> (out_tokens, num_accepted).

    ``block_v`` is the vocabulary tile (default per backend, clipped to the vocabulary);
    a vocabulary that is not a multiple of it is masked.
    """
    b, k1, vocab = target_probs.shape
    k = k1 - 1
    if k < 0 or draft_probs.shape != (b, k, vocab) or exp_noise.shape != (b, k1, vocab):
        raise ValueError(
            f"rejection_sample: shapes disagree: target {target_probs.shape}, draft {draft_probs.shape}, "
            f"noise {exp_noise.shape} (expected [B, K+1, V], [B, K, V], [B, K+1, V])"
        )
    if draft_tokens.shape != (b, k) or uniforms.shape != (b, k) or num_draft.shape != (b,):
        raise ValueError(
            f"rejection_sample: draft_tokens {draft_tokens.shape} / uniforms {uniforms.shape} must be [B, K] = "
            f"[{b}, {k}] and num_draft {num_draft.shape} [B]"
        )
    variant = resolve_backend(backend, interpret)
    if block_v is None:
        block_v = DEFAULT_BLOCK_V[variant]
        # Never tile wider than the (lane-rounded / power-of-two) vocabulary.
        block_v = min(block_v, round_up(vocab, _LANES) if variant == "tpu" else max(16, next_pow2(vocab)))
    validate_block_v(block_v, vocab, variant)
    target_probs = target_probs.astype(jnp.float32)
    draft_probs = draft_probs.astype(jnp.float32)
    exp_noise = exp_noise.astype(jnp.float32)
    num_draft = jnp.clip(num_draft.astype(jnp.int32), 0, k)
    if variant == "gpu":
        return _verify_gpu(
            target_probs, draft_probs, draft_tokens, num_draft, uniforms, exp_noise, block_v=block_v, interpret=interpret
        )
    n_acc = acceptance_counts(target_probs, draft_probs, draft_tokens, num_draft, uniforms)
    drawn = _draw_tpu(target_probs, draft_probs, exp_noise, n_acc, num_draft, block_v=block_v, interpret=interpret)
    return assemble_tokens(draft_tokens, n_acc, drawn), n_acc
