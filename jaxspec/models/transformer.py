"""The decoder-only transformer (dense, MoE, or mixed per layer) with the slot-cache forward.

Forward contract (used by prefill, decode and speculative verification alike):

    out = model(tokens[B, T], start[B], cache, slot_ids=None, num_valid=None)
    out.logits  [B, T, V] float32
    out.hidden  [B, T, D] final hidden states (after the final norm), for EAGLE-style drafters
    out.cache   cache with the rows' K/V written at start..start+T-1 and
                lengths[slot] = start + num_valid
    out.expert_load [L, E] int32 tokens routed per expert per layer (valid tokens only; zeros for dense layers)
    out.aux_hidden  None, or with ``aux_layers=(i, j, ...)`` (static) [B, T, len(aux_layers) * D]: the
                    residual stream entering layer i, j, ... (0 = the token embeddings, num_layers = the
                    last layer's output before the final norm), concatenated in the order given, from
                    this same pass (EAGLE-3 heads read them; see jaxspec.models.eagle3)

Training-only keywords (defaults leave the forward as above): ``router_stats`` sows
each MoE layer's router logits (see jaxspec.models.moe), ``capacity_factor``
drops expert assignments beyond capacity.

Row b uses slot ``slot_ids[b]`` (``None``: row b is slot b). A padding row uses
slot id == num_slots: nothing of it is written. T > 1 is causal inside the block,
and different rows may start at different positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.models.kv_cache import KVCache
from jaxspec.models.layers import MLP, Attention, RMSNorm, param, rope_inv_frequencies
from jaxspec.models.moe import MoEBlock
from jaxspec.models.quant import qeinsum


class ForwardOutput(NamedTuple):
    logits: jax.Array
    hidden: jax.Array
    cache: KVCache
    expert_load: jax.Array
    aux_hidden: jax.Array | None = None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.layer = layer
        self.is_moe = cfg.layer_is_moe(layer)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps, dt)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps, dt)
        if self.is_moe:
            self.moe = MoEBlock(cfg, rngs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.mlp_dim, dt, rngs)

    def __call__(self, x, positions, cache: KVCache, slot_ids, valid, inv_freq, moe_backend,
                 router_stats=False, capacity_factor=None, kv_len=None, attention_backend="xla"):
        attn_out, cache = self.attn(
            self.attn_norm(x), positions, cache, self.layer, slot_ids, inv_freq, kv_len, attention_backend,
        )
        x = x + attn_out
        h = self.mlp_norm(x)
        if self.is_moe:
            mlp_out, counts = self.moe(h, valid, moe_backend, router_stats, capacity_factor)
        else:
            mlp_out, counts = self.mlp(h), None
        return x + mlp_out, cache, counts


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, dt)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] int32
        start: jax.Array,  # [B] int32 absolute position of tokens[:, 0]
        cache: KVCache,
        slot_ids: jax.Array | None = None,  # [B] int32
        num_valid: jax.Array | None = None,  # [B] int32 real tokens per row (rest is padding)
        moe_backend: str | None = None,
        router_stats: bool = False,
        capacity_factor: float | None = None,
        kv_len: int | None = None,  # static: attend over cache positions [0, kv_len) (> every query position)
        attention_backend: str = "xla",  # static: layers.ATTENTION_BACKENDS
        aux_layers: tuple[int, ...] = (),  # static: also return these layers' input hidden states
    ) -> ForwardOutput:
        cfg = self.cfg
        b, t = tokens.shape
        positions = start[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        valid = jnp.arange(t, dtype=jnp.int32)[None, :] < num_valid[:, None]  # [B, T]
        inv_freq = rope_inv_frequencies(cfg)

        x = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
        loads = []
        check_aux_layers(aux_layers, cfg.num_layers)
        captured = {}
        for i, layer in enumerate(self.layers):
            if i in aux_layers:
                captured[i] = x
            x, cache, counts = layer(
                x, positions, cache, slot_ids, valid, inv_freq, moe_backend, router_stats, capacity_factor,
                kv_len, attention_backend,
            )
            loads.append(counts if counts is not None else jnp.zeros((max(cfg.num_experts, 1),), jnp.int32))
        if cfg.num_layers in aux_layers:
            captured[cfg.num_layers] = x
        aux = jnp.concatenate([captured[i] for i in aux_layers], axis=-1) if aux_layers else None
        hidden = self.final_norm(x)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = qeinsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)

        rows = jnp.arange(b) if slot_ids is None else slot_ids
        lengths = cache.lengths.at[rows].set(start + num_valid, mode="drop")
        return ForwardOutput(logits, hidden, cache.with_lengths(lengths), jnp.stack(loads), aux)


def check_aux_layers(aux_layers: tuple[int, ...], num_layers: int) -> None:
    """Layer ids for ``aux_layers`` must lie in [0, num_layers]."""
    bad = [i for i in aux_layers if not 0 <= int(i) <= num_layers]
    if bad:
        raise ValueError(f"aux layer ids {bad} out of range: a {num_layers}-layer model has ids 0..{num_layers}")


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (tests, benchmarks, training from scratch); quantized as
    ``cfg.quantization`` says (so ``abstract_model`` gives a quantized model's structure)."""
    model = Transformer(cfg.replace(quantization=None), nnx.Rngs(params=seed))
    if cfg.quantization is not None:
        from jaxspec.models.quant import quantize_model

        quantize_model(model, cfg.quantization, cfg.quant_group_size)
    return model


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with shape-only parameters (no memory allocated)."""
    return nnx.eval_shape(lambda: create_model(cfg))
