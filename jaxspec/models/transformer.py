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
from jaxspec.models.dense_cpu import head_tied, project
from jaxspec.models.layers import MLP, Attention, RMSNorm, param, rope_inv_frequencies
from jaxspec.models.moe import MoEBlock


class ForwardOutput(NamedTuple):
    logits: jax.Array
    hidden: jax.Array
    cache: KVCache
    expert_load: jax.Array
    aux_hidden: jax.Array | None = None


class Segment(NamedTuple):
    """Rows of one shape in a mixed forward (``Transformer.forward_segments``): decode rows, or a
    prefill chunk. Fields as the forward's arguments of the same names."""

    tokens: jax.Array  # [B, T] int32
    start: jax.Array  # [B] int32
    slot_ids: jax.Array  # [B] int32 (padding rows: slot id S)
    num_valid: jax.Array  # [B] int32


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
                 router_stats=False, capacity_factor=None, kv_len=None, attention_backend="xla",
                 matmul_backend="xla"):
        x, cache = self.attend(x, positions, cache, slot_ids, inv_freq, kv_len, attention_backend, matmul_backend)
        x, counts = self.feed_forward(x, valid, moe_backend, router_stats, capacity_factor, matmul_backend)
        return x, cache, counts

    def attend(self, x, positions, cache: KVCache, slot_ids, inv_freq, kv_len=None, attention_backend="xla",
               matmul_backend="xla"):
        """The attention half: x [B, T, D] -> (x + attention, cache with the rows' K/V written)."""
        attn_out, cache = self.attn(
            self.attn_norm(x), positions, cache, self.layer, slot_ids, inv_freq, kv_len, attention_backend,
            matmul_backend,
        )
        return x + attn_out, cache

    def feed_forward(self, x, valid, moe_backend, router_stats=False, capacity_factor=None, matmul_backend="xla"):
        """The MLP or MoE half: x [B, T, D], valid [B, T] -> (x + feed-forward, tokens per expert or None)."""
        h = self.mlp_norm(x)
        if self.is_moe:
            mlp_out, counts = self.moe(h, valid, moe_backend, router_stats, capacity_factor, matmul_backend)
        else:
            mlp_out, counts = self.mlp(h, matmul_backend), None
        return x + mlp_out, counts


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
        logits_at: jax.Array | None = None,  # [B] int32: logits at this position of each row only -> [B, 1, V]
        matmul_backend: str = "xla",  # static: dense_cpu.MATMUL_BACKENDS (the dense projections)
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
                kv_len, attention_backend, matmul_backend,
            )
            loads.append(counts if counts is not None else jnp.zeros((max(cfg.num_experts, 1),), jnp.int32))
        if cfg.num_layers in aux_layers:
            captured[cfg.num_layers] = x
        aux = jnp.concatenate([captured[i] for i in aux_layers], axis=-1) if aux_layers else None
        hidden = self.final_norm(x)
        # A prefill needs each row's last position only: the output projection of every other
        # position would cost as much as several layers.
        logits = self.logits(hidden if logits_at is None else
                             jnp.take_along_axis(hidden, logits_at[:, None, None].astype(jnp.int32), axis=1),
                             matmul_backend)

        rows = jnp.arange(b) if slot_ids is None else slot_ids
        lengths = cache.lengths.at[rows].set(start + num_valid, mode="drop")
        return ForwardOutput(logits, hidden, cache.with_lengths(lengths), jnp.stack(loads), aux)

    def forward_segments(
        self,
        segments: tuple[Segment, ...],
        cache: KVCache,
        kv_lens: tuple[int, ...],  # static: each segment's attention span (as ``kv_len``)
        moe_backend: str | None = None,
        attention_backend: str = "xla",
        matmul_backend: str = "xla",
    ) -> tuple[list[jax.Array], KVCache, jax.Array]:
        """One pass over segments of different shapes (decode rows and a prefill chunk): each
        attends with its own shape and span, and the feed-forward of every layer runs once over
        all their tokens, so a step that both decodes and prefills reads the experts' weights
        once. Exactly the per-segment forwards' results: every op is per token except attention,
        which stays per segment. Returns (final hidden states per segment [B_g, T_g, D], cache
        with every segment's K/V and lengths written, expert load [L, E])."""
        cfg = self.cfg
        inv_freq = rope_inv_frequencies(cfg)
        sizes, positions, valids, xs = [], [], [], []
        for seg in segments:
            b, t = seg.tokens.shape
            sizes.append(b * t)
            positions.append(seg.start[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :])
            valids.append(jnp.arange(t, dtype=jnp.int32)[None, :] < seg.num_valid[:, None])
            xs.append(jnp.take(self.embed[...], seg.tokens, axis=0))  # [B_g, T_g, D]
        offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
        valid = jnp.concatenate([v.reshape(1, -1) for v in valids], axis=1)  # [1, N]
        loads = []
        for layer in self.layers:
            for g, seg in enumerate(segments):
                xs[g], cache = layer.attend(xs[g], positions[g], cache, seg.slot_ids, inv_freq, kv_lens[g],
                                            attention_backend, matmul_backend)
            flat = jnp.concatenate([x.reshape(1, -1, cfg.d_model) for x in xs], axis=1)  # [1, N, D]
            flat, counts = layer.feed_forward(flat, valid, moe_backend, matmul_backend=matmul_backend)
            xs = [part.reshape(x.shape) for part, x in zip(jnp.split(flat, offsets, axis=1), xs)]
            loads.append(counts if counts is not None else jnp.zeros((max(cfg.num_experts, 1),), jnp.int32))
        lengths = cache.lengths
        for seg in segments:
            lengths = lengths.at[seg.slot_ids].set(seg.start + seg.num_valid, mode="drop")
        return [self.final_norm(x) for x in xs], cache.with_lengths(lengths), jnp.stack(loads)

    def logits(self, hidden: jax.Array, matmul_backend: str = "xla") -> jax.Array:
        """Final hidden states [B, T, D] -> logits [B, T, V] float32."""
        if self.cfg.tie_embeddings:
            return head_tied(hidden, self.embed[...], matmul_backend)
        return project("btd,dv->btv", hidden, self.lm_head[...], matmul_backend, preferred_element_type=jnp.float32)


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
