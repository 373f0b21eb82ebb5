"""The EAGLE-3 draft head (Li et al., "EAGLE-3", arXiv 2503.01840), as published checkpoints define it.

A head is one decoder layer that drafts from the *target's* features instead of running a model of
its own over the context:

    fused   = fc(concat(target hidden states entering layers a, b, c))    [.., D]  (+ fc bias, optional)
    e       = input_layernorm(embed(token))                               (embed: the target's, unless own)
    h_in    = hidden_norm(fused)
    res     = h_in if norm_before_residual else fused
    x       = res + o(attention(q, k, v of concat(e, h_in)))              (q/k/v take 2*D inputs; RoPE; causal)
    out     = x + down(silu(gate(n)) * up(n)),  n = post_attention_layernorm(x)
    logits  = lm_head(norm(out))                                          [.., draft_vocab]
    target id of draft id i = i + d2t[i]

Position p of the head takes the token at p + 1 with the target's features at p, so its logits at
p predict the token at p + 2. Drafting step 1 reads the target's features; steps 2..k feed the
head's own ``out`` (before ``norm``) back in place of ``fused`` (no ``fc``), with the token just
drafted. The head keeps one layer of KV cache (``KVCache`` with ``num_layers`` 1): per slot, or paged
with the target's page table.

Layer ids follow the target forward's ``aux_layers`` (the residual stream *entering* layer i; 0 is
the embeddings). Default ``[2, L // 2, L - 3]`` for an L-layer target, as vLLM and SGLang use.
Checkpoint formats and their layer-id conventions: ``jaxspec.checkpoint.eagle3_io``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.config import SUPPORTED_ROPE_SCALING, ConfigError
from jaxspec.models.kv_cache import KVCache, write_and_read
from jaxspec.models.layers import MLP, RMSNorm, apply_rope, attention, param, rope_inv_frequencies, zeros_param


def default_aux_layers(target_layers: int) -> tuple[int, int, int]:
    """Low, middle and high layer of an L-layer target: (2, L // 2, L - 3)."""
    return (2, target_layers // 2, target_layers - 3)


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """Shapes and switches of one EAGLE-3 head. ``vocab_size`` is the target's vocabulary."""

    name: str
    hidden_size: int  # the head's D
    target_hidden_size: int  # the target's d_model (the features' width per layer)
    vocab_size: int
    draft_vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    aux_layers: tuple[int, ...]  # target layer ids whose input hidden states fc fuses (forward convention)
    norm_before_residual: bool = False
    fc_bias: bool = False
    own_embeddings: bool = False  # False: the target's embedding table is used (shared, not copied)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_eps: float = 1e-6
    max_seq_len: int = 2048
    speculative_tokens: int | None = None  # the k the checkpoint was trained for, if it says
    dtype: str = "float32"

    num_layers = 1  # one decoder layer: the KV cache's layer count
    sliding_window = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layers", tuple(int(i) for i in self.aux_layers))
        positive = ("hidden_size", "target_hidden_size", "vocab_size", "draft_vocab_size", "num_heads",
                    "num_kv_heads", "head_dim", "mlp_dim", "max_seq_len")
        for f in positive:
            if getattr(self, f) <= 0:
                raise ConfigError(f"{self.name}: {f} must be > 0, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self.name}: num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ConfigError(f"{self.name}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"{self.name}: draft_vocab_size {self.draft_vocab_size} > vocab_size {self.vocab_size}")
        if not self.aux_layers:
            raise ConfigError(f"{self.name}: aux_layers is empty")
        kind = (self.rope_scaling or {}).get("type", (self.rope_scaling or {}).get("rope_type", "default"))
        if kind not in SUPPORTED_ROPE_SCALING:
            raise ConfigError(f"{self.name}: rope_scaling type {kind!r} is not supported")

    @property
    def feature_size(self) -> int:
        """Width of the fused target features: len(aux_layers) * target_hidden_size."""
        return len(self.aux_layers) * self.target_hidden_size

    def param_counts(self) -> dict[str, int]:
        """Parameters of the head (as ``ModelConfig.param_counts``; the shared embeddings not counted):
        what ``mesh.draft_placement`` weighs when it places the head like a draft model."""
        d, dh = self.hidden_size, self.head_dim
        attn = 2 * d * dh * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * dh * d
        total = (self.feature_size * d + (d if self.fc_bias else 0) + 4 * d + attn + 3 * d * self.mlp_dim
                 + d * self.draft_vocab_size + (self.vocab_size * d if self.own_embeddings else 0))
        return {"total": total, "active": total}

    def replace(self, **changes) -> "Eagle3Config":
        return dataclasses.replace(self, **changes)


class Buffer(nnx.Variable):
    """A non-trainable array of the head (the draft -> target id offsets)."""


class Eagle3Attention(nnx.Module):
    """Grouped-query attention whose q/k/v read 2*D inputs and whose output is D wide."""

    def __init__(self, cfg: Eagle3Config, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d, h, kv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = param(rngs, (2 * d, h, dh), ("embed_pair", "heads", "head_dim"), dt)
        self.wk = param(rngs, (2 * d, kv, dh), ("embed_pair", "kv_heads", "head_dim"), dt)
        self.wv = param(rngs, (2 * d, kv, dh), ("embed_pair", "kv_heads", "head_dim"), dt)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt)

    def __call__(self, x, positions, cache: KVCache, slot_ids, inv_freq, kv_len=None):
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.wq[...]), positions, inv_freq)
        k = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.wk[...]), positions, inv_freq)
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...])
        # Write first (positions past the cache and padding rows, slot id S, are dropped), then attend;
        # a paged cache reads the target's page table (the head's pool is paged page for page).
        rows = jnp.arange(x.shape[0]) if slot_ids is None else slot_ids
        cache, keys, values = write_and_read(cache, 0, rows, slot_ids, positions, k, v, kv_len)
        out = attention(q, keys, values, positions)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...]), cache


class Eagle3Head(nnx.Module):
    def __init__(self, cfg: Eagle3Config, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d = cfg.hidden_size
        self.cfg = cfg
        if cfg.own_embeddings:
            self.embed = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), dt)
        self.fc = param(rngs, (cfg.feature_size, d), ("aux_embed", "embed"), dt)
        if cfg.fc_bias:
            self.fc_bias = zeros_param((d,), ("embed",), dt)
        self.input_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.hidden_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.attn = Eagle3Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.mlp = MLP(d, cfg.mlp_dim, dt, rngs)
        self.final_norm = RMSNorm(d, cfg.rms_eps, dt)
        self.lm_head = param(rngs, (d, cfg.draft_vocab_size), ("embed", "draft_vocab"), dt)
        self.d2t = Buffer(jnp.zeros((cfg.draft_vocab_size,), jnp.int32), logical_axes=("draft_vocab",))

    def fuse(self, features: jax.Array) -> jax.Array:
        """Target features [.., len(aux_layers) * target D] -> [.., D]."""
        x = jnp.einsum("...f,fd->...d", features.astype(jnp.dtype(self.cfg.dtype)), self.fc[...])
        return x + self.fc_bias[...] if self.cfg.fc_bias else x

    def __call__(
        self,
        tokens: jax.Array,  # [B, T] the token at each position + 1
        hidden: jax.Array,  # [B, T, F] target features (``fused=False``) or [B, T, D] head outputs (``fused=True``)
        start: jax.Array,  # [B] position of column 0
        cache: KVCache,  # one layer
        slot_ids: jax.Array | None = None,  # [B]; padding rows: the number of slots (nothing written)
        embed: jax.Array | None = None,  # [V, D] the target's table (unless the head has its own)
        fused: bool = False,  # static: ``hidden`` is already D wide (steps 2..k feed the head's output back)
        kv_len: int | None = None,  # static: attend over cache positions [0, kv_len)
    ) -> tuple[jax.Array, KVCache]:
        """-> (out [B, T, D] before the final norm, cache with the rows' K/V written)."""
        cfg = self.cfg
        t = tokens.shape[1]
        positions = start[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]
        table = self.embed[...] if cfg.own_embeddings else embed
        e = self.input_norm(jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype)))
        h = hidden.astype(jnp.dtype(cfg.dtype)) if fused else self.fuse(hidden)
        h_in = self.hidden_norm(h)
        residual = h_in if cfg.norm_before_residual else h
        attn_out, cache = self.attn(jnp.concatenate([e, h_in], axis=-1), positions, cache, slot_ids,
                                    rope_inv_frequencies(cfg), kv_len)
        x = residual + attn_out
        return x + self.mlp(self.mlp_norm(x)), cache

    def logits(self, out: jax.Array) -> jax.Array:
        """Head outputs [.., D] -> draft-vocabulary logits [.., draft_vocab] (float32)."""
        return jnp.einsum("...d,dv->...v", self.final_norm(out), self.lm_head[...], preferred_element_type=jnp.float32)

    def target_ids(self) -> jax.Array:
        """[draft_vocab] int32: the target id of every draft id."""
        return jnp.arange(self.cfg.draft_vocab_size, dtype=jnp.int32) + self.d2t[...].astype(jnp.int32)


def create_head(cfg: Eagle3Config, seed: int = 0, d2t=None) -> Eagle3Head:
    """A randomly initialised head (tests, training from scratch). ``d2t``: offsets [draft_vocab]
    (default zeros: the draft vocabulary is the first ``draft_vocab_size`` target ids)."""
    head = Eagle3Head(cfg, nnx.Rngs(params=seed))
    if d2t is not None:
        head.d2t.set_value(jnp.asarray(d2t, jnp.int32))
    return head
