"""The device side of plain generation: parameters, the slot cache and the jitted steps.

``ModelRunner`` owns one model's parameters and its KV cache. Prefill lengths are
bucketed to powers of two and decode always runs all slots, so after
``warmup()`` no new request shape causes a compilation. The cache is donated to
every step (updated in place).

On a mesh (``placement=``, see ``jaxspec.mesh``) the parameters and the cache are
placed by the logical-axis rules, MoE layers dispatch through
``moe_parallel.ExpertParallel`` when experts or their width are split, and the
steps are compiled with explicit in/out shardings: the cache comes back with the
sharding it went in with, so nothing is resharded between decode steps.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.engine.slots import SlotTable
from jaxspec.mesh import Placement, check_placement
from jaxspec.models import KVCache, Transformer
from jaxspec.models.moe_parallel import moe_backend_for
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


class PlacedBackend(NamedTuple):
    """The ``moe_backend`` of a runner on a mesh: the MoE dispatch plus the placement.

    Steps built from ``ModelRunner.forward_fn`` (speculative verification) then pin the
    cache they return to its input sharding too, and jit caches keyed on ``moe_backend``
    tell runners on different meshes apart. Hashable (a static jit argument)."""

    dispatch: Any  # backend name, ExpertParallel, or None (the model config's)
    placement: Placement


def _forward(graphdef, moe_backend, state, tokens, start, cache, slot_ids=None, num_valid=None):
    placed = moe_backend if isinstance(moe_backend, PlacedBackend) else None
    backend = placed.dispatch if placed else moe_backend
    out = nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid, moe_backend=backend)
    if placed is not None:
        out = out._replace(cache=jax.lax.with_sharding_constraint(out.cache, placed.placement.cache_shardings(out.cache)))
    return out


# The steps are module-level with the graph definition static, so runners of the same
# model architecture share compiled executables (a new engine does not recompile).
def _prefill_impl(graphdef, moe_backend, state, cache, tokens, slot, num_valid, sampling: BatchSampling):
    """tokens [1, bucket], slot/num_valid [1] -> (cache, first token [1], last logits [1, V], expert load)."""
    out = _forward(graphdef, moe_backend, state, tokens, jnp.zeros((1,), jnp.int32), cache, slot, num_valid)
    last = jnp.take_along_axis(out.logits, (num_valid - 1)[:, None, None], axis=1)[:, 0]  # [1, V]
    token = sample_tokens(last, sampling, jnp.zeros((1,), jnp.int32))
    return out.cache, token, last, out.expert_load


def _decode_impl(graphdef, moe_backend, state, cache, last_tokens, active, sampling: BatchSampling, out_positions):
    """One token for every slot: last_tokens/active/out_positions [S] -> (cache, tokens [S], expert load)."""
    out = _forward(graphdef, moe_backend, state, last_tokens[:, None], cache.lengths, cache, None,
                   active.astype(jnp.int32))
    tokens = sample_tokens(out.logits[:, 0], sampling, out_positions)
    return out.cache, tokens, out.expert_load


# Jitted steps with the graphdef bound, resolved once per runner: hashing a graphdef
# costs ~1 ms, too much to pay on every decode step as a static argument.
_STEPS: dict[tuple, tuple[Callable, Callable]] = {}


def unplaced_steps(graphdef, moe_backend) -> tuple[Callable, Callable]:
    """(prefill, decode) for a single-device runner, shared by every runner of this architecture."""
    key = (graphdef, moe_backend)
    steps = _STEPS.get(key)
    if steps is None:
        steps = _STEPS[key] = (
            jax.jit(functools.partial(_prefill_impl, graphdef, moe_backend), donate_argnums=(1,)),
            jax.jit(functools.partial(_decode_impl, graphdef, moe_backend), donate_argnums=(1,)),
        )
    return steps

# Steps of placed runners, compiled with explicit shardings; keyed on everything the
# shardings depend on, so runners of one architecture on one mesh share executables.
_PLACED_STEPS: dict[tuple, tuple[Callable, Callable]] = {}


def placed_steps(graphdef, moe_backend: PlacedBackend, state_sharding, cache_sharding: KVCache, key: tuple):
    """(prefill, decode) jitted with in/out shardings: parameters and cache as placed, the small
    per-step inputs and outputs (tokens, sampling settings, logits, expert load) replicated."""
    steps = _PLACED_STEPS.get(key)
    if steps is None:
        rep = moe_backend.placement.replicated()
        prefill = jax.jit(
            functools.partial(_prefill_impl, graphdef, moe_backend), donate_argnums=(1,),
            in_shardings=(state_sharding, cache_sharding, rep, rep, rep, rep),
            out_shardings=(cache_sharding, rep, rep, rep),
        )
        decode = jax.jit(
            functools.partial(_decode_impl, graphdef, moe_backend), donate_argnums=(1,),
            in_shardings=(state_sharding, cache_sharding, rep, rep, rep, rep),
            out_shardings=(cache_sharding, rep, rep),
        )
        steps = _PLACED_STEPS[key] = (prefill, decode)
    return steps


class ModelRunner:
    """Jitted prefill / decode over a slot cache for one model."""

    def __init__(
        self,
        model: Transformer,
        num_slots: int,
        max_len: int | None = None,
        moe_backend: str | None = None,
        cache_sharding: KVCache | None = None,
        placement: Placement | None = None,
    ):
        """``placement``: run on a mesh (parameters moved to their shardings if they are not
        there yet; ``moe_backend`` then names the per-device expert computation's backend only
        where experts are not split). ``cache_sharding`` alone places just the cache."""
        self.cfg = model.cfg
        self.num_slots = num_slots
        self.max_len = max_len or self.cfg.max_seq_len
        if self.max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
        self.moe_backend = moe_backend
        self.placement = placement
        self.graphdef, self.state = nnx.split(model)
        self._steps = unplaced_steps(self.graphdef, moe_backend)
        self.state_sharding = None
        if placement is not None:
            check_placement(self.cfg, placement)
            self.moe_backend = PlacedBackend(moe_backend_for(placement) or moe_backend, placement)
            self.state_sharding = state_sharding = placement.state_shardings(self.state)
            self.state = jax.device_put(self.state, state_sharding)
            abstract = KVCache.abstract(self.cfg, num_slots, self.max_len)
            cache_sharding = placement.cache_shardings(abstract)
            key = (self.graphdef, self.moe_backend, num_slots, self.max_len)
            self._steps = placed_steps(self.graphdef, self.moe_backend, state_sharding, cache_sharding, key)
        self.cache_sharding = cache_sharding
        if cache_sharding is None:
            # Committed to a device like every later (jit-output) cache, so the first and
            # later steps see the same argument placement and share one compilation.
            self.cache = jax.device_put(KVCache.create(self.cfg, num_slots, self.max_len), jax.devices()[0])
        else:  # created in place, shard by shard (never whole on one device)
            self.cache = jax.jit(lambda: KVCache.create(self.cfg, num_slots, self.max_len), out_shardings=cache_sharding)()
        self.buckets = prefill_buckets(self.max_len)
        # Tokens routed to each expert [L, E], summed on the host: the step's outputs are
        # ready together, and a device add would cost one more dispatch per step.
        self.expert_load = np.zeros((self.cfg.num_layers, max(self.cfg.num_experts, 1)), np.int64)

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
        args = (self.state, self.cache, tokens, np.array([slot], np.int32), np.array([n], np.int32),
                slots.sampling(np.array([slot])))
        self.cache, token, _, load = self._steps[0](*args)
        token = int(token[0])
        self.add_expert_load(load)
        return token

    def decode(self, slots: SlotTable) -> np.ndarray:
        """One decode step over all slots; returns the sampled token per slot [S] (inactive: ignore)."""
        return self.decode_tokens(slots.last_token, slots.active, slots.sampling(), slots.num_generated)

    def decode_tokens(self, last_tokens: np.ndarray, active: np.ndarray, sampling: BatchSampling,
                      out_positions: np.ndarray) -> np.ndarray:
        """``decode`` with its inputs given [S] each: feeds last_tokens at each slot's cache length."""
        self.cache, tokens, load = self._steps[1](self.state, self.cache, last_tokens, active, sampling, out_positions)
        tokens = np.asarray(tokens)
        self.add_expert_load(load)
        return tokens

    def add_expert_load(self, load) -> None:
        """Add a step's routed-token counts [L, E] (a device array) to ``expert_load``."""
        self.expert_load += np.asarray(load)

    def set_length(self, slot: int, length: int) -> None:
        self._set_lengths(self.cache.set_length(slot, length).lengths)

    def _set_lengths(self, lengths) -> None:
        # Host-side edits of the lengths go back to the cache's own sharding, so the next
        # step's input matches its compiled sharding (no transfer, no recompilation).
        # A host array would be uncommitted and change the step's signature (a recompile).
        target = self.cache_sharding.lengths if self.cache_sharding is not None else self.cache.lengths.sharding
        lengths = jax.device_put(lengths, target)
        self.cache = self.cache.with_lengths(lengths)

    def lengths(self) -> np.ndarray:
        return np.asarray(self.cache.lengths)

    def warmup(self) -> None:
        """Compile every prefill bucket and the decode step (no request state is touched)."""
        dummy = SlotTable(self.num_slots)
        saved = self.lengths()
        for bucket in self.buckets:
            self.prefill(0, [self.cfg.pad_id] * min(bucket, self.max_len), dummy)
        self.decode(dummy)
        self.set_length(0, 0)  # the release path's small update, compiled here rather than mid-serving
        self._set_lengths(jnp.asarray(saved))
        self.expert_load[:] = 0
