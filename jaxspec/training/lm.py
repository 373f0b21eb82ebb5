"""Language-model training and evaluation steps (jitted, train state donated).

Loss = next-token cross entropy + ``aux_weight`` * load-balancing loss + ``z_weight``
* router z-loss, the two router terms averaged over the MoE layers (router logits
come from the model's ``router_stats`` sow, collected with ``nnx.capture``). A
training forward is the inference forward over a fresh KV cache of length T at
start 0, so training and serving share one model definition.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.models import KVCache
from jaxspec.training.data import Batch
from jaxspec.training.losses import cross_entropy, load_balance_loss, router_z_loss, token_nll
from jaxspec.training.state import OptimConfig, TrainState, make_optimizer


@dataclasses.dataclass(frozen=True)
class LMLossConfig:
    aux_weight: float = 0.01  # Switch Transformer's alpha
    z_weight: float = 1e-3  # ST-MoE's router z-loss weight
    capacity_factor: float | None = None  # training-only expert capacity (None: dropless)
    moe_backend: str | None = None  # expert dispatch backend (None: the model config's)


def forward_train(model, tokens: jax.Array, lc: LMLossConfig, router_stats: bool, num_valid: jax.Array | None = None):
    """Full-sequence forward over a fresh cache -> (ForwardOutput, [router logits [N, E] per MoE layer]).

    ``num_valid`` [B] (real tokens per row, a prefix) only keeps padding out of the expert load."""
    b, t = tokens.shape
    cache = KVCache.create(model.cfg, b, t)
    start = jnp.zeros((b,), jnp.int32)

    def fwd(m):
        return m(tokens, start, cache, num_valid=num_valid, moe_backend=lc.moe_backend, router_stats=router_stats,
                 capacity_factor=lc.capacity_factor)

    if not router_stats:
        return fwd(model), []
    out, intermediates = nnx.capture(fwd, nnx.Intermediate)(model)
    return out, jax.tree.leaves(intermediates)


def lm_loss(graphdef, lc: LMLossConfig, params, batch: Batch):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    out, router_logits = forward_train(model, batch.inputs, lc, router_stats=cfg.is_moe)
    ce = cross_entropy(out.logits, batch.targets, batch.mask)
    flat_mask = batch.mask.reshape(-1)
    if router_logits:
        lb = jnp.mean(jnp.stack([load_balance_loss(r, cfg.num_experts_per_tok, flat_mask) for r in router_logits]))
        z = jnp.mean(jnp.stack([router_z_loss(r, flat_mask) for r in router_logits]))
    else:
        lb = z = jnp.zeros((), jnp.float32)
    loss = ce + lc.aux_weight * lb + lc.z_weight * z
    return loss, {"loss": loss, "ce": ce, "load_balance": lb, "z_loss": z, "expert_load": out.expert_load}


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def train_step(graphdef, optim: OptimConfig, lc: LMLossConfig, state: TrainState, batch: Batch):
    (_, metrics), grads = jax.value_and_grad(functools.partial(lm_loss, graphdef, lc), has_aux=True)(
        state.params, batch
    )
    tx = make_optimizer(optim)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    metrics["lr"] = optim.schedule()(state.step)
    return TrainState(state.step + 1, params, opt_state), metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_batch(graphdef, moe_backend, params, batch: Batch):
    model = nnx.merge(graphdef, params)
    num_valid = jnp.sum(batch.mask, axis=1).astype(jnp.int32)  # eval masks are prefixes
    out, _ = forward_train(model, batch.inputs, LMLossConfig(moe_backend=moe_backend), False, num_valid)
    nll = token_nll(out.logits, batch.targets)
    return jnp.sum(jnp.where(batch.mask, nll, 0.0)), jnp.sum(batch.mask), out.expert_load


def evaluate_nll(graphdef, params, windows: Batch, batch_size: int, moe_backend: str | None = None) -> dict:
    """Total NLL (nats) and token count over evaluation windows, plus the expert load they produced.

    The last partial batch is padded with masked rows so every call has one shape (one compile)."""
    n = windows.inputs.shape[0]
    total, count = 0.0, 0
    load = None
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        rows = windows.inputs[sl].shape[0]
        pad = batch_size - rows
        part = Batch(*(np.concatenate([a[sl], np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in windows))
        s, c, el = jax.device_get(_eval_batch(graphdef, moe_backend, params, part))
        total += float(s)
        count += int(c)
        load = el if load is None else load + el
    return {"nll_sum": total, "tokens": count, "expert_load": load}
