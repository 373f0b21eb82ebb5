"""Sampling: request parameters, the one logits -> distribution function, and token draws.

``logits_to_probs`` is the single place where temperature, top-k, top-p and min-p
turn logits into the distribution a token is drawn from. Plain decoding, the
draft model's proposals and speculative verification all call it, so draft and
target distributions are processed identically (exact rejection sampling needs
q to be exactly the distribution the draft sampled from).

Random numbers are keyed by (request seed, output position, purpose), never by
batch row or step, so a seeded request's draws do not depend on what else is in
the batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Purposes folded into a position's key so that different draws never share bits.
PURPOSE_TARGET = 0  # the target's token (plain decode, residual or bonus)
PURPOSE_ACCEPT = 1  # the uniform of an accept/reject test
PURPOSE_DRAFT = 2  # the draft model's proposal


class SamplingError(ValueError):
    """Invalid sampling or stopping parameters."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        self.validate()

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SamplingError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(s == "" for s in self.stop_strings):
            raise SamplingError("stop_strings must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class BatchSampling(NamedTuple):
    """Per-row sampling settings as device arrays (padded rows: greedy)."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] i32, 0 = off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32 pair packed as [B, 2] (PRNG key data)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams | None], seeds: Sequence[int]) -> "BatchSampling":
        rows = [p or SamplingParams() for p in params]
        return cls(
            temperature=jnp.asarray([p.temperature for p in rows], jnp.float32),
            top_k=jnp.asarray([p.top_k for p in rows], jnp.int32),
            top_p=jnp.asarray([p.top_p for p in rows], jnp.float32),
            min_p=jnp.asarray([p.min_p for p in rows], jnp.float32),
            seed=jnp.asarray(np.stack([seed_to_key_data(s) for s in seeds]), jnp.uint32),
        )


def pad_sampling(sampling: BatchSampling, rows: int) -> BatchSampling:
    """Host settings [n] padded to ``rows`` with greedy rows (a batch bucket's padding)."""
    n = len(sampling.temperature)
    if n == rows:
        return sampling
    pad = rows - n

    def grow(x, value):
        x = np.asarray(x)
        return np.concatenate([x, np.full((pad, *x.shape[1:]), value, x.dtype)])

    return BatchSampling(grow(sampling.temperature, 0.0), grow(sampling.top_k, 0), grow(sampling.top_p, 1.0),
                         grow(sampling.min_p, 0.0), grow(sampling.seed, 0))


def take_sampling(sampling: BatchSampling, rows: np.ndarray) -> BatchSampling:
    """The settings of the given rows (host arrays)."""
    return BatchSampling(*(np.asarray(x)[rows] for x in sampling))


def seed_to_key_data(seed: int) -> np.ndarray:
    """Raw threefry key data [2] u32 for a 64-bit seed."""
    seed = int(seed) % 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def position_key(seed_data: jax.Array, position: jax.Array, purpose: int) -> jax.Array:
    """Key for one draw: (request seed [2] u32, output position, purpose)."""
    key = jax.random.wrap_key_data(seed_data, impl="threefry2x32")
    return jax.random.fold_in(jax.random.fold_in(key, position), purpose)


def logits_to_probs(
    logits: jax.Array,  # [..., V]
    temperature: jax.Array,  # broadcastable to [...]
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
) -> jax.Array:
    """The final distribution a token is drawn from, float32 [..., V].

    Greedy rows (temperature 0) get a one-hot distribution at the argmax, so the
    same verification rule covers greedy and sampled requests exactly.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)[..., None]
    top_k = jnp.asarray(top_k, jnp.int32)[..., None]
    top_p = jnp.asarray(top_p, jnp.float32)[..., None]
    min_p = jnp.asarray(min_p, jnp.float32)[..., None]

    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    probs = jax.nn.softmax(scaled, axis=-1)
    # Rows whose filters keep everything skip them: the sort below costs ~2 ms per 4k-vocabulary
    # row on CPU, more than a small model's whole forward. Both branches return ``probs`` itself
    # for such rows, so a row's distribution never depends on the other rows of the batch.
    needs_filter = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0) | (min_p > 0.0))
    filtered = jax.lax.cond(
        jnp.any(needs_filter),
        lambda: jnp.where(needs_filter, _filter_sorted(probs, top_k, top_p, min_p), probs),
        lambda: probs,
    )
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), vocab, dtype=jnp.float32)
    return jnp.where(greedy, one_hot, filtered)


def _filter_sorted(probs: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """top-k, top-p and min-p on the sorted distribution (ties resolved by index, as argsort is
    stable), renormalised."""
    vocab = probs.shape[-1]
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    rank = jnp.arange(vocab, dtype=jnp.int32)
    keep_sorted = (top_k <= 0) | (rank < top_k)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted &= mass_before < top_p
    keep_sorted &= sorted_probs >= min_p * sorted_probs[..., :1]
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted)
    keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
    filtered = jnp.where(keep, probs, 0.0)
    return filtered / jnp.sum(filtered, axis=-1, keepdims=True)


def sample_from_probs(probs: jax.Array, exp_noise: jax.Array) -> jax.Array:
    """Exponential race: argmax_v p_v / E_v with E ~ Exp(1) draws exactly from p (unnormalised is fine).

    The same form serves residual sampling in verification, so plain and
    speculative paths consume random numbers the same way. Zero-probability
    entries score 0, not 0 / E: an Exp(1) draw is exactly 0 about once in 2**23,
    and the NaN of 0 / 0 would win the argmax (a filtered or non-argmax token).
    """
    return jnp.argmax(jnp.where(probs > 0, probs / exp_noise, 0.0), axis=-1).astype(jnp.int32)


def exponential_noise(seed_data: jax.Array, position: jax.Array, vocab: int, purpose: int = PURPOSE_TARGET) -> jax.Array:
    """Exp(1) noise [V] for one row's draw at one output position."""
    return jax.random.exponential(position_key(seed_data, position, purpose), (vocab,), jnp.float32)


def batch_noise(seeds: jax.Array, positions: jax.Array, vocab: int, purpose: int, all_greedy: jax.Array) -> jax.Array:
    """Exp(1) noise [B, V] per row (seed [B, 2], position [B]), or ones when every row is greedy:
    a greedy row's distribution is one-hot, which the race picks whatever the noise, so the
    random-number work is skipped without changing any token."""
    def draw():
        return jax.vmap(lambda s, p: exponential_noise(s, p, vocab, purpose))(seeds, positions)

    return jax.lax.cond(all_greedy, lambda: jnp.ones((seeds.shape[0], vocab), jnp.float32), draw)


def sample_tokens(logits: jax.Array, sampling: BatchSampling, positions: jax.Array) -> jax.Array:
    """One token per row: logits [B, V], output positions [B] -> tokens [B] int32.

    An all-greedy batch takes the argmax directly: the distributions (a softmax, one-hot rows, a
    second argmax over the vocabulary) would pick the same tokens, and cost a 1-row decode step of a
    small model a tenth of its time on a CPU."""
    all_greedy = jnp.all(sampling.temperature <= 0)

    def sampled():
        probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        return sample_from_probs(probs, batch_noise(sampling.seed, positions, logits.shape[-1], PURPOSE_TARGET,
                                                    all_greedy))

    return jax.lax.cond(all_greedy, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
