"""The acceptance rule of speculative sampling, its random numbers, and backend selection.

The rule (shared with the kernel engineer's ``pallas_kernels.rejection_sampling``):

    rejection_sample(target_probs[B,K+1,V], draft_probs[B,K,V], draft_tokens[B,K],
                     num_draft[B], uniforms[B,K], exp_noise[B,K+1,V])
        -> out_tokens[B,K+1] (-1 after the emitted token), num_accepted[B]

For i < num_draft, draft token x_i is accepted iff ``u_i * q_i(x_i) < p_i(x_i)``;
the first rejection j stops the run and emits the replacement
``argmax_v max(0, p_j - q_j)(v) / E_j(v)`` (``p_j`` itself if that residual is all
zero); if every draft is accepted the bonus ``argmax_v p_n(v) / E_n(v)`` (n =
num_draft) is emitted. ``argmax w / E`` with E ~ Exp(1) draws from w / sum(w), so
the residual needs no normalisation (entries with w = 0 score 0: see ``race``). Greedy rows carry one-hot p (and q), which
turns the same rule into "accept while the draft equals the target argmax, then
emit the target argmax". Deterministic drafters (n-gram) carry one-hot q.

Random numbers are keyed by (request seed, output position, purpose), never by
batch row, step or padding: the accept test at output position g+i uses
``PURPOSE_ACCEPT``, the emitted token at g+j uses ``PURPOSE_TARGET`` (the very
noise plain decoding uses there, so k=0 reproduces plain decoding bit for bit).
Draws at positions beyond the emitted token are computed but influence nothing
kept, so reusing those keys in the next round keeps the draws independent.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Callable

import jax
import jax.numpy as jnp

from jaxspec.sampling import PURPOSE_ACCEPT, PURPOSE_TARGET, batch_noise, exponential_noise, position_key

# fn(target_probs, draft_probs, draft_tokens, num_draft, uniforms, exp_noise) -> (out_tokens, num_accepted)
RejectionSampleFn = Callable[..., tuple[jax.Array, jax.Array]]


# ------------------------------------------------------------------------------ pieces
def accepted_prefix(
    target_probs: jax.Array,  # [B, K+1, V] (or [B, K, V])
    draft_probs: jax.Array | None,  # [B, K, V]; None = one-hot at draft_tokens (deterministic drafter)
    draft_tokens: jax.Array,  # [B, K] i32
    num_draft: jax.Array,  # [B] i32
    uniforms: jax.Array,  # [B, K] f32 in [0, 1)
) -> jax.Array:
    """Number of leading draft tokens that pass ``u * q(x) < p(x)`` -> [B] i32."""
    b, k = draft_tokens.shape
    if k == 0:
        return jnp.zeros((b,), jnp.int32)
    vocab = target_probs.shape[-1]
    tokens = jnp.clip(draft_tokens, 0, vocab - 1)[..., None]  # tokens past num_draft may be garbage
    p_x = jnp.take_along_axis(target_probs[:, :k], tokens, axis=-1)[..., 0]
    q_x = jnp.ones_like(p_x) if draft_probs is None else jnp.take_along_axis(draft_probs, tokens, axis=-1)[..., 0]
    ok = (uniforms * q_x < p_x) & (jnp.arange(k, dtype=jnp.int32)[None, :] < num_draft[:, None])
    # Leading run of accepts: cumprod stops counting at the first rejection.
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def emit_distribution(
    target_probs: jax.Array,  # [B, K+1, V]
    draft_probs: jax.Array | None,  # [B, K, V] or None (one-hot at draft_tokens)
    draft_tokens: jax.Array,  # [B, K]
    num_draft: jax.Array,  # [B]
    num_accepted: jax.Array,  # [B]
) -> jax.Array:
    """The (unnormalised) distribution the emitted token is drawn from, [B, V]:
    the clipped residual max(0, p_j - q_j) after a rejection at j, p_n for the bonus
    (q is absent there), and p_j if the residual is all zero."""
    b, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    j = num_accepted
    p_j = jnp.take_along_axis(target_probs, j[:, None, None], axis=1)[:, 0]  # [B, V]
    if k == 0:
        return p_j
    jq = jnp.minimum(j, k - 1)
    if draft_probs is None:
        tok = jnp.take_along_axis(jnp.clip(draft_tokens, 0, vocab - 1), jq[:, None], axis=1)[:, 0]
        q_j = jax.nn.one_hot(tok, vocab, dtype=jnp.float32)
    else:
        q_j = jnp.take_along_axis(draft_probs, jq[:, None, None], axis=1)[:, 0]
    q_j = jnp.where((j < num_draft)[:, None], q_j, 0.0)  # the bonus position has no draft
    residual = jnp.maximum(p_j - q_j, 0.0)
    return jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_j)


def race(weights: jax.Array, exp_noise: jax.Array) -> jax.Array:
    """argmax_v w(v) / E(v): a draw from w / sum(w). Zero weights score 0 rather than
    0 / E, since E can be exactly 0 and 0 / 0 = NaN would win the argmax."""
    return jnp.argmax(jnp.where(weights > 0, weights / exp_noise, 0.0), axis=-1).astype(jnp.int32)


def assemble(draft_tokens: jax.Array, num_accepted: jax.Array, emitted: jax.Array) -> jax.Array:
    """out[b] = accepted drafts, then the emitted token, then -1 -> [B, K+1] i32."""
    b, k = draft_tokens.shape
    pos = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    drafts = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    out = jnp.where(pos < num_accepted[:, None], drafts, -1)
    return jnp.where(pos == num_accepted[:, None], emitted[:, None], out).astype(jnp.int32)


# --------------------------------------------------------------------- the contract
def rejection_sample(
    target_probs: jax.Array,
    draft_probs: jax.Array,
    draft_tokens: jax.Array,
    num_draft: jax.Array,
    uniforms: jax.Array,
    exp_noise: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule (module docstring) with all random numbers given -> (out_tokens, num_accepted)."""
    k = draft_tokens.shape[1]
    num_draft = jnp.clip(num_draft.astype(jnp.int32), 0, k)
    num_accepted = accepted_prefix(target_probs, draft_probs, draft_tokens, num_draft, uniforms)
    weights = emit_distribution(target_probs, draft_probs, draft_tokens, num_draft, num_accepted)
    noise = jnp.take_along_axis(exp_noise, num_accepted[:, None, None], axis=1)[:, 0]
    return assemble(draft_tokens, num_accepted, race(weights, noise)), num_accepted


# ------------------------------------------------------------------- random numbers
def _uniform(seed_data: jax.Array, position: jax.Array) -> jax.Array:
    return jax.random.uniform(position_key(seed_data, position, PURPOSE_ACCEPT), (), jnp.float32)


def _per_position(draw, seeds: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """draw(seed, position) for positions[b] + i, i < n -> [B, n, ...]. One flat vmap
    rather than two nested ones: the same numbers, and XLA compiles it much faster."""
    b = seeds.shape[0]
    pos = (positions[:, None].astype(jnp.int32) + jnp.arange(n, dtype=jnp.int32)[None, :]).reshape(-1)
    out = jax.vmap(draw)(jnp.repeat(seeds, n, axis=0), pos)
    return out.reshape(b, n, *out.shape[1:])


def acceptance_uniforms(seeds: jax.Array, positions: jax.Array, k: int) -> jax.Array:
    """U[0,1) [B, K] for the accept tests at output positions positions[b] + i."""
    return _per_position(_uniform, seeds, positions, k)


def target_noise(seeds: jax.Array, positions: jax.Array, k_plus_1: int, vocab: int) -> jax.Array:
    """Exp(1) [B, K+1, V] for the emitted token at output positions positions[b] + i."""
    return _per_position(lambda s, p: exponential_noise(s, p, vocab, PURPOSE_TARGET), seeds, positions, k_plus_1)


def verify_with_keys(
    target_probs: jax.Array,  # [B, K+1, V]
    draft_probs: jax.Array | None,  # [B, K, V] or None (one-hot drafts)
    draft_tokens: jax.Array,  # [B, K]
    num_draft: jax.Array,  # [B]
    seeds: jax.Array,  # [B, 2] u32
    positions: jax.Array,  # [B] output position of the first draft token
    backend: str = "xla",
    all_greedy: jax.Array | bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The rule with its random numbers drawn from the position-keyed streams.

    ``all_greedy`` (every row's p and q one-hot): the emitted token's noise is skipped (``xla``).

    ``xla`` draws exponential noise only for the one row each request emits
    ([B, V] rather than [B, K+1, V]: with a 150k vocabulary that is most of the
    verification's random-number work); the numbers are the same draws the full
    tensor would hold at that row, so the result equals ``rejection_sample``'s.
    Other backends get the full tensors of the contract.
    """
    b, k = draft_tokens.shape
    vocab = target_probs.shape[-1]
    num_draft = jnp.clip(num_draft.astype(jnp.int32), 0, k)
    uniforms = acceptance_uniforms(seeds, positions, k)
    if backend == "xla":
        num_accepted = accepted_prefix(target_probs, draft_probs, draft_tokens, num_draft, uniforms)
        weights = emit_distribution(target_probs, draft_probs, draft_tokens, num_draft, num_accepted)
        noise = batch_noise(seeds, positions + num_accepted, vocab, PURPOSE_TARGET, jnp.asarray(all_greedy))
        return assemble(draft_tokens, num_accepted, race(weights, noise)), num_accepted
    if draft_probs is None:
        draft_probs = jax.nn.one_hot(jnp.clip(draft_tokens, 0, vocab - 1), vocab, dtype=jnp.float32)
    noise = target_noise(seeds, positions, k + 1, vocab)
    return get_backend(backend)(target_probs, draft_probs, draft_tokens, num_draft, uniforms, noise)


# ------------------------------------------------------------------------ backends
_BACKENDS: dict[str, RejectionSampleFn] = {"xla": rejection_sample}
# Implementations owned by the kernel work, imported on first use: (module, candidate function names).
_EXTERNAL = {
    "reference": ("pallas_kernels.rejection_sampling_reference", ("rejection_sample", "rejection_sample_reference")),
    "pallas": ("pallas_kernels.rejection_sampling", ("rejection_sample", "rejection_sample_pallas")),
}


def register_backend(name: str, fn: RejectionSampleFn) -> None:
    """Add an implementation of the contract (tests register deliberately broken ones)."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    names = set(_BACKENDS)
    for name, (module, _) in _EXTERNAL.items():
        try:
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        except ModuleNotFoundError:  # the parent package is missing
            pass
    return sorted(names)


def get_backend(name: str) -> RejectionSampleFn:
    if name in _BACKENDS:
        return _BACKENDS[name]
    if name in _EXTERNAL:
        module_name, fn_names = _EXTERNAL[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"verify backend {name!r} needs {module_name}, which is not available ({e})") from e
        for fn_name in fn_names:
            if hasattr(module, fn_name):
                fn = getattr(module, fn_name)
                if name == "pallas":  # no accelerator: run the kernel in the Pallas interpreter
                    from pallas_kernels._common import default_interpret

                    fn = functools.partial(fn, interpret=default_interpret())
                _BACKENDS[name] = fn
                return fn
        raise ValueError(f"{module_name} has none of {fn_names}")
    raise ValueError(f"unknown verify backend {name!r}; available: {', '.join(available_backends())}")
