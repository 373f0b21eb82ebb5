"""Mixture-of-experts feed-forward block: router, experts, optional shared expert.

Training hooks (inference never sets them, so its forward is unchanged): with
``router_stats=True`` the block sows its router logits as ``nnx.Intermediate``
"router_logits" (collect them with ``nnx.capture``) for the load-balancing and
z-losses; ``capacity_factor`` drops assignments beyond each expert's capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.models.layers import MLP, param
from jaxspec.models.moe_dispatch import dispatch


def route(router_logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts, then top-k (Mixtral, Qwen-MoE). -> (weights [N,k] f32, expert ids [N,k])."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, expert_ids.astype(jnp.int32)


def drop_over_capacity(expert_ids: jax.Array, weights: jax.Array, num_experts: int, capacity_factor: float) -> jax.Array:
    """Zero the weights of assignments beyond each expert's capacity (training only).

    capacity = ceil(capacity_factor * N * k / E). Assignments queue per expert by
    choice rank first (every token's first choice before any second choice, as in
    Switch/GShard), then token order. A dropped assignment contributes nothing, so a
    token that loses all its choices passes through on the residual alone. This makes a
    token's output depend on the rest of its batch, which is why inference never uses it.
    """
    n, k = expert_ids.shape
    capacity = -(-int(capacity_factor * n * k) // num_experts)
    onehot = jax.nn.one_hot(expert_ids.T.reshape(-1), num_experts, dtype=jnp.int32)  # [k*N, E], rank-major
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # place in its expert's queue
    keep = (position < capacity).reshape(k, n).T
    return jnp.where(keep, weights, 0.0)


def _expert_weight(w):
    """An expert parameter's array as stored: weights held per expert (``ExpertSlices``) reach the
    dispatch as they are (``w[...]`` would stack them); quantized ones read as ``QArray``."""
    return w.get_value() if isinstance(w, nnx.Param) else w[...]


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_mlp_dim
        self.cfg = cfg
        self.router = param(rngs, (d, e), ("embed", "expert"), dt)
        self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), dt)
        self.w_up = param(rngs, (e, d, f), ("expert", "embed", "moe_mlp"), dt)
        self.w_down = param(rngs, (e, f, d), ("expert", "moe_mlp", "embed"), dt)
        if cfg.shared_expert_mlp_dim:
            self.shared_expert = MLP(d, cfg.shared_expert_mlp_dim, dt, rngs)
            self.shared_gate = param(rngs, (d, 1), ("embed", None), dt)

    def __call__(
        self,
        x: jax.Array,
        valid: jax.Array,
        backend: str | None = None,
        router_stats: bool = False,
        capacity_factor: float | None = None,
        matmul_backend: str = "xla",  # the shared expert's (``dense_cpu.MATMUL_BACKENDS``)
    ) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], valid [B, T] bool -> (out [B, T, D], tokens routed per expert [E] over valid tokens)."""
        cfg = self.cfg
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        router_logits = jnp.einsum("nd,de->ne", flat, self.router[...], preferred_element_type=jnp.float32)
        weights, expert_ids = route(router_logits, cfg.num_experts_per_tok, cfg.router_renormalize)
        if router_stats:
            self.sow(nnx.Intermediate, "router_logits", router_logits)  # [B*T, E] float32
        if capacity_factor is not None:
            weights = drop_over_capacity(expert_ids, weights, cfg.num_experts, capacity_factor)
        if not getattr(backend, "exchanges_tokens", False):
            # Padding tokens (idle rows, positions past a row's num_valid) route to no expert
            # (id E, weight 0): they never wake an expert nor read its weights. Expert-parallel
            # exchanges (``exchanges_tokens``) route by owner device and keep their own handling.
            keep = valid.reshape(-1, 1)
            expert_ids = jnp.where(keep, expert_ids, cfg.num_experts)
            weights = jnp.where(keep, weights, 0.0)
        out = dispatch(
            flat, expert_ids, weights, _expert_weight(self.w_gate), _expert_weight(self.w_up),
            _expert_weight(self.w_down), backend=backend or cfg.moe_backend,
        )
        if cfg.shared_expert_mlp_dim:
            gate = jax.nn.sigmoid(flat @ self.shared_gate[...])
            out = out + gate * self.shared_expert(flat, matmul_backend)
        counts = jnp.sum(
            jax.nn.one_hot(expert_ids, cfg.num_experts, dtype=jnp.int32) * valid.reshape(-1, 1, 1), axis=(0, 1)
        )
        return out.reshape(b, t, d), counts
