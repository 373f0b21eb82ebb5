"""Transformer building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Shapes in names and comments: B batch rows, T new tokens per row, D d_model,
H query heads, K kv heads, G = H / K query heads per kv head, Dh head_dim,
F mlp width, S cache slots, M cache length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.models.kv_cache import KVCache, write_and_read, write_slots, write_through_tables
from jaxspec.models.dense_cpu import dense_ffn, project
from jaxspec.models.quant import qeinsum  # a weight read with self.w[...] may be quantized (models.quant)

_MASK_VALUE = -1e30  # finite, so fully masked rows (padding) give uniform weights, never NaN


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, std: float = 0.02) -> nnx.Param:
    """A normally initialised parameter tagged with its logical axis names."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype), logical_axes=axes)


def ones_param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def zeros_param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis_name: str = "embed"):
        self.scale = ones_param((dim,), (axis_name,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 whatever the activation dtype (as HF and MaxText do).
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2], with the configured scaling applied.

    This is the hook for scaled RoPE variants: add a branch here and its name to
    config.SUPPORTED_ROPE_SCALING.
    """
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = jnp.where(is_mid, mid, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, Dh] at absolute positions [B, T] (rotate-half convention, as HF)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------ attention
def cached_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, M, K, Dh]  (the rows' cache, already holding the new keys)
    v: jax.Array,  # [B, M, K, Dh]
    q_positions: jax.Array,  # [B, T] absolute positions of the queries
    sliding_window: int | None = None,
) -> jax.Array:
    """Causal grouped-query attention of new tokens against their slot's cache -> [B, T, H, Dh]."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, dh)
    scores = jnp.einsum("btkgd,bmkd->bkgtm", qg, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
    key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask = key_pos[None, None, :] <= q_positions[:, :, None]  # [B, T, M]
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgtm,bmkd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q.dtype)



# Attention implementations, chosen per forward (a static argument of the jitted steps, so
# runners with different backends never share a compiled step). "pallas" is
# pallas_kernels.verify_attention (same semantics; the Pallas interpreter on CPU). "cpu" is
# cpu_kernels.slot_attention, which reads a float32 slot cache in place (C++, CPU only; a paged or
# int8 cache goes through "xla": ``ModelRunner`` only takes "cpu" where it applies).
ATTENTION_BACKENDS = ("xla", "pallas", "cpu")


def check_attention_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}")
    return name


def attention(q, k, v, q_positions, sliding_window=None, backend: str = "xla") -> jax.Array:
    """cached_attention through ``backend``."""
    if check_attention_backend(backend) == "pallas":
        from pallas_kernels.verify_attention import cached_attention_pallas

        return cached_attention_pallas(q, k, v, q_positions, sliding_window)
    return cached_attention(q, k, v, q_positions, sliding_window)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d, h, kv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), dt)
        self.wk = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.wv = param(rngs, (d, kv, dh), ("embed", "kv_heads", "head_dim"), dt)
        self.wo = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), dt)
        if cfg.qkv_bias:
            self.bq = zeros_param((h, dh), ("heads", "head_dim"), dt)
            self.bk = zeros_param((kv, dh), ("kv_heads", "head_dim"), dt)
            self.bv = zeros_param((kv, dh), ("kv_heads", "head_dim"), dt)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, cfg.rms_eps, dt, axis_name="head_dim")
            self.k_norm = RMSNorm(dh, cfg.rms_eps, dt, axis_name="head_dim")

    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T]
        cache: KVCache,  # every layer's; paged when cache.page_table is set, int8 when cache.quantized
        layer: int,
        slot_ids: jax.Array | None,  # [B] or None for "row b is slot b"
        inv_freq: jax.Array,
        kv_len: int | None = None,
        attention_backend: str = "xla",
        matmul_backend: str = "xla",
    ) -> tuple[jax.Array, KVCache]:
        """``kv_len`` (static): attend over cache positions [0, kv_len) only; every query
        position must be < kv_len (the caller buckets it over the rows' lengths).
        ``matmul_backend`` (static): ``dense_cpu.MATMUL_BACKENDS``, for the projections."""
        cfg = self.cfg
        q = project("btd,dhk->bthk", x, self.wq[...], matmul_backend)
        k = project("btd,dhk->bthk", x, self.wk[...], matmul_backend)
        v = project("btd,dhk->bthk", x, self.wv[...], matmul_backend)
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        rows = jnp.arange(x.shape[0]) if slot_ids is None else slot_ids
        if attention_backend == "cpu" and cache.page_table is None and not cache.quantized:
            # Each query reads the keys it sees where they lie: no gathered [B, kv_len] copy.
            from cpu_kernels.slot_attention import slot_attention

            cache = write_slots(cache, layer, rows, positions, k, v)
            kv_len = cache.max_len if kv_len is None else min(kv_len, cache.max_len)
            attn = slot_attention(q, cache.k, cache.v, rows, positions, layer, kv_len, cfg.sliding_window)
            return project("bthk,hkd->btd", attn.astype(q.dtype), self.wo[...], matmul_backend), cache
        if cache.page_table is not None and attention_backend == "pallas" and not cache.quantized:
            # The kernel reads the pool through the tables in place: no gathered copy of the pages.
            from pallas_kernels.paged_attention import paged_attention

            cache, tables = write_through_tables(cache, layer, rows, positions, k, v)
            kv_len = cache.max_len if kv_len is None else min(kv_len, cache.max_len)
            attn = paged_attention(q, cache.k[layer], cache.v[layer], tables, positions, kv_len, cfg.sliding_window)
            return project("bthk,hkd->btd", attn, self.wo[...], matmul_backend), cache
        # XLA, a slot cache, or an int8 pool (the paged kernel has no int8 input yet): the rows' keys
        # and values (pages gathered and dequantized), attended below (pallas: verify_attention).
        cache, keys, values = write_and_read(cache, layer, rows, slot_ids, positions, k, v, kv_len)
        attn = attention(q, keys, values, positions, cfg.sliding_window, attention_backend)
        out = project("bthk,hkd->btd", attn, self.wo[...], matmul_backend)
        return out, cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, mlp_dim: int, dtype, rngs: nnx.Rngs):
        self.w_gate = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), dtype)
        self.w_up = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), dtype)
        self.w_down = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array, matmul_backend: str = "xla") -> jax.Array:
        """x [..., D] -> [..., D]; ``matmul_backend`` (static): ``dense_cpu.MATMUL_BACKENDS``."""
        fused = dense_ffn(x, self.w_gate[...], self.w_up[...], self.w_down[...], matmul_backend)
        if fused is not None:
            return fused
        h = jax.nn.silu(qeinsum("...d,df->...f", x, self.w_gate[...])) * qeinsum("...d,df->...f", x, self.w_up[...])
        return qeinsum("...f,fd->...d", h, self.w_down[...])
