"""Losses and figures of merit for LM training and draft distillation (all float32, masked)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DISTILL_LOSSES = ("kl", "tv", "kl+tv")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target: logits [..., V], targets [...] -> [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token NLL (nats) over the positions where ``mask`` is true."""
    return _masked_mean(token_nll(logits, targets), mask)


def load_balance_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e`` for one layer.

    router_logits [N, E]; f_e = share of the N*k top-k assignments that go to
    expert e (sums to 1; not differentiable), P_e = mean router probability of e
    (differentiable). Equals 1 for uniform routing (its minimum when f = P) and
    approaches E when every token goes to one expert with certainty.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, ids = jax.lax.top_k(probs, top_k)
    assigned = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=1) / top_k  # [N, E]
    if mask is None:
        mask = jnp.ones(router_logits.shape[:1], bool)
    m = mask.astype(jnp.float32)[:, None]
    n = jnp.maximum(jnp.sum(m), 1.0)
    f = jax.lax.stop_gradient(jnp.sum(assigned * m, axis=0) / n)
    p = jnp.sum(probs * m, axis=0) / n
    return num_experts * jnp.sum(f * p)


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2 (keeps logits small)."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    if mask is None:
        return jnp.mean(z * z)
    return _masked_mean(z * z, mask)


def distill_divergences(target_logits: jax.Array, draft_logits: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-position divergences of the draft q from the target p, averaged over ``mask``.

    kl      forward KL(p || q) = sum_v p (log p - log q)   (mode-covering)
    tv      total variation 0.5 * sum_v |p - q|; 1 - TV is the probability that a
            token sampled from q is accepted by speculative sampling
    agree   argmax(p) == argmax(q): the chance a greedy draft token is accepted
    """
    logp = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    kl = jnp.sum(p * (logp - logq), axis=-1)
    tv = 0.5 * jnp.sum(jnp.abs(p - jnp.exp(logq)), axis=-1)
    agree = (jnp.argmax(logp, axis=-1) == jnp.argmax(logq, axis=-1)).astype(jnp.float32)
    return {"kl": _masked_mean(kl, mask), "tv": _masked_mean(tv, mask), "agree": _masked_mean(agree, mask)}


def distill_objective(divergences: dict[str, jax.Array], kind: str) -> jax.Array:
    if kind == "kl":
        return divergences["kl"]
    if kind == "tv":
        return divergences["tv"]
    if kind == "kl+tv":
        return divergences["kl"] + divergences["tv"]
    raise ValueError(f"unknown distillation loss {kind!r}; choose from {', '.join(DISTILL_LOSSES)}")


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    return total_nll_nats / math.log(2) / num_bytes


def expert_balance(expert_load: np.ndarray, moe_layers: list[int]) -> list[float]:
    """max / mean tokens per expert, per MoE layer (1.0 = perfectly even)."""
    load = np.asarray(expert_load, np.float64)
    out = []
    for layer in moe_layers:
        mean = load[layer].mean()
        out.append(float(load[layer].max() / mean) if mean > 0 else 0.0)
    return out
