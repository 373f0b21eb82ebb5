"""Speculative-decoding verification (exact rejection sampling) in plain jax.numpy.

This is both the specification of the fused Pallas kernel in ``rejection_sampling.py``
and the XLA path used by the engine. All randomness comes in as arguments, so the
kernel and this reference produce identical tokens from identical inputs.

Rule, per batch row b with n = num_draft[b] drafts (0 <= n <= K):

* Draft i < n, token x = draft_tokens[b, i], is accepted iff
  ``uniforms[b, i] * q_i(x) < p_i(x)`` in float32, i.e. u < min(1, p/q) without a
  division (q(x) = 0 < p(x) accepts, p(x) = 0 always rejects). Verification stops at
  the first rejection.
* At the first rejected position j the replacement is drawn from the residual
  max(0, p_j - q_j) by an exponential race, ``argmax_v r(v) / E[b, j, v]`` with
  E ~ Exp(1): the race samples from the normalised residual without normalising it.
  If the residual is all zero (p_j == q_j), the draw falls back to p_j itself.
* If all n drafts are accepted, the bonus token at position n is
  ``argmax_v p_n(v) / E[b, n, v]``.
* out_tokens[b, :n_acc] are the accepted drafts, out_tokens[b, n_acc] the
  replacement or bonus token, later entries -1.

Greedy rows are one-hot target distributions (acceptance = draft equals the argmax,
the draw = the argmax); deterministic drafters are one-hot draft distributions.

Ratios of zero-probability entries are defined as 0 rather than 0 / E: an Exp(1)
sample can be exactly 0 (-log1p(-u) with u = 0), and 0 / 0 = NaN would otherwise win
the argmax and emit a token of probability zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def race_ratio(weights: jax.Array, exp_noise: jax.Array) -> jax.Array:
    """weights / E for positive weights, 0 elsewhere: the exponential-race score (argmax samples ~ weights)."""
    return jnp.where(weights > 0, weights / exp_noise, 0.0)


def acceptance_counts(
    target_probs: jax.Array, draft_probs: jax.Array, draft_tokens: jax.Array, num_draft: jax.Array, uniforms: jax.Array
) -> jax.Array:
    """Accepted drafts per row [B] int32: the length of the leading run of accepted positions."""
    b, vocab = target_probs.shape[0], target_probs.shape[-1]
    k = draft_tokens.shape[1]
    tokens = jnp.clip(draft_tokens, 0, vocab - 1)  # entries past num_draft may be padding
    # Point gathers (2K scalars per row) straight from the full arrays: no [B, K, V] slice is materialised.
    rows = jnp.arange(b)[:, None]
    pos = jnp.arange(k)[None, :]
    p_at = target_probs[rows, pos, tokens]
    q_at = draft_probs[rows, pos, tokens]
    live = jnp.arange(k, dtype=jnp.int32)[None, :] < jnp.clip(num_draft, 0, k)[:, None]
    accept = (uniforms.astype(jnp.float32) * q_at < p_at) & live
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def assemble_tokens(draft_tokens: jax.Array, num_accepted: jax.Array, drawn: jax.Array) -> jax.Array:
    """[B, K+1]: accepted drafts, then the drawn token, then -1."""
    b, k = draft_tokens.shape
    pos = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    drafts = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    n = num_accepted[:, None]
    return jnp.where(pos < n, drafts, jnp.where(pos == n, drawn[:, None], -1)).astype(jnp.int32)


def rejection_sample(
    target_probs: jax.Array,  # [B, K+1, V] f32
    draft_probs: jax.Array,  # [B, K, V] f32
    draft_tokens: jax.Array,  # [B, K] i32
    num_draft: jax.Array,  # [B] i32 in 0..K
    uniforms: jax.Array,  # [B, K] f32 in [0, 1)
    exp_noise: jax.Array,  # [B, K+1, V] f32 Exp(1) samples
) -> tuple[jax.Array, jax.Array]:
    """-> (out_tokens [B, K+1] i32, num_accepted [B] i32). See the module docstring for the rule."""
    b, k1, vocab = target_probs.shape
    k = k1 - 1
    target_probs = target_probs.astype(jnp.float32)
    draft_probs = draft_probs.astype(jnp.float32)
    num_draft = jnp.clip(num_draft.astype(jnp.int32), 0, k)
    n_acc = acceptance_counts(target_probs, draft_probs, draft_tokens, num_draft, uniforms)

    rows = jnp.arange(b)
    p = target_probs[rows, n_acc]  # [B, V]: the distribution of the position that draws
    noise = exp_noise[rows, n_acc].astype(jnp.float32)
    if k > 0:
        q = draft_probs[rows, jnp.minimum(n_acc, k - 1)]
        residual = jnp.where((n_acc < num_draft)[:, None], jnp.maximum(p - q, 0.0), 0.0)
    else:
        residual = jnp.zeros_like(p)
    from_residual = jnp.argmax(race_ratio(residual, noise), axis=-1)
    from_target = jnp.argmax(race_ratio(p, noise), axis=-1)
    drawn = jnp.where(jnp.any(residual > 0, axis=-1), from_residual, from_target).astype(jnp.int32)
    return assemble_tokens(draft_tokens, n_acc, drawn), n_acc
