"""The device side of plain generation: parameters, the slot cache and the jitted steps.

``ModelRunner`` owns one model's parameters and its KV cache. Prefill lengths are
bucketed to powers of two and decode always runs all slots, so after
``warmup()`` no new request shape causes a compilation. The cache is donated to
every step (updated in place).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.engine.slots import SlotTable
from jaxspec.models import KVCache, Transformer
from jaxspec.sampling import BatchSampling, sample_tokens

MIN_PREFILL_BUCKET = 16


def prefill_buckets(max_len: int, min_bucket: int = MIN_PREFILL_BUCKET) -> list[int]:
    """Powers of two from ``min_bucket``, capped by (and ending at) ``max_len``."""
    buckets, b = [], min_bucket
    while b < max_len:
        buckets.append(b)
        b *= 2
    buckets.append(max_len)
    return buckets


def _forward(graphdef, moe_backend, state, tokens, start, cache, slot_ids=None, num_valid=None):
    return nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid, moe_backend=moe_backend)


# The steps are module-level with the graph definition static, so runners of the same
# model architecture share compiled executables (a new engine does not recompile).
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _prefill_step(graphdef, moe_backend, state, cache, tokens, slot, num_valid, sampling: BatchSampling):
    """tokens [1, bucket], slot/num_valid [1] -> (cache, first token [1], last logits [1, V], expert load)."""
    out = _forward(graphdef, moe_backend, state, tokens, jnp.zeros((1,), jnp.int32), cache, slot, num_valid)
    last = jnp.take_along_axis(out.logits, (num_valid - 1)[:, None, None], axis=1)[:, 0]  # [1, V]
    token = sample_tokens(last, sampling, jnp.zeros((1,), jnp.int32))
    return out.cache, token, last, out.expert_load


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode_step(graphdef, moe_backend, state, cache, last_tokens, active, sampling: BatchSampling, out_positions):
    """One token for every slot: last_tokens/active/out_positions [S] -> (cache, tokens [S], expert load)."""
    out = _forward(graphdef, moe_backend, state, last_tokens[:, None], cache.lengths, cache, None,
                   active.astype(jnp.int32))
    tokens = sample_tokens(out.logits[:, 0], sampling, out_positions)
    return out.cache, tokens, out.expert_load


class ModelRunner:
    """Jitted prefill / decode over a slot cache for one model."""

    def __init__(
        self,
        model: Transformer,
        num_slots: int,
        max_len: int | None = None,
        moe_backend: str | None = None,
        cache_sharding: KVCache | None = None,
    ):
        self.cfg = model.cfg
        self.num_slots = num_slots
        self.max_len = max_len or self.cfg.max_seq_len
        if self.max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        self.moe_backend = moe_backend
        self.graphdef, self.state = nnx.split(model)
        cache = KVCache.create(self.cfg, num_slots, self.max_len)
        self.cache = cache if cache_sharding is None else jax.tree.map(jax.device_put, cache, cache_sharding)
        self.buckets = prefill_buckets(self.max_len)
        self.expert_load = jnp.zeros((self.cfg.num_layers, max(self.cfg.num_experts, 1)), jnp.int32)

    # ----------------------------------------------------------------- helpers
    def model(self, state=None) -> Transformer:
        return nnx.merge(self.graphdef, self.state if state is None else state)

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"length {length} exceeds the cache length {self.max_len}")

    def forward_fn(self) -> Callable:
        """A pure function (state, tokens, start, cache, slot_ids, num_valid) -> ForwardOutput,
        for other runners (speculative verification) to jit with their own steps."""
        return functools.partial(_forward, self.graphdef, self.moe_backend)

    # -------------------------------------------------------------- host API
    def prefill(self, slot: int, prompt_ids: list[int], slots: SlotTable) -> int:
        """Write a prompt into ``slot``'s cache and sample the first output token."""
        n = len(prompt_ids)
        bucket = self.bucket_for(n)
        tokens = np.full((1, bucket), self.cfg.pad_id, np.int32)
        tokens[0, :n] = prompt_ids
        self.cache, token, _, load = _prefill_step(
            self.graphdef, self.moe_backend, self.state, self.cache, tokens, np.array([slot], np.int32), np.array([n], np.int32),
            slots.sampling(np.array([slot])),
        )
        self.expert_load = self.expert_load + load
        return int(token[0])

    def decode(self, slots: SlotTable) -> np.ndarray:
        """One decode step over all slots; returns the sampled token per slot [S] (inactive: ignore)."""
        self.cache, tokens, load = _decode_step(
            self.graphdef, self.moe_backend, self.state, self.cache, slots.last_token, slots.active, slots.sampling(), slots.num_generated
        )
        self.expert_load = self.expert_load + load
        return np.asarray(tokens)

    def set_length(self, slot: int, length: int) -> None:
        self.cache = self.cache.set_length(slot, length)

    def lengths(self) -> np.ndarray:
        return np.asarray(self.cache.lengths)

    def warmup(self) -> None:
        """Compile every prefill bucket and the decode step (no request state is touched)."""
        dummy = SlotTable(self.num_slots)
        saved = self.lengths()
        for bucket in self.buckets:
            self.prefill(0, [self.cfg.pad_id] * min(bucket, self.max_len), dummy)
        self.decode(dummy)
        self.cache = self.cache.with_lengths(jnp.asarray(saved))
        self.expert_load = jnp.zeros_like(self.expert_load)
