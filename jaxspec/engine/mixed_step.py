"""One jitted call that decodes the running rows and prefills a prompt chunk.

While a long prompt is prefilled in chunks (``ModelRunner(prefill_chunk=...)``), every engine step
both decodes the running requests and prefills one chunk. As two calls, each reads every weight the
step touches, and for a MoE a prefill chunk and a batch of decode rows wake most experts alike, so
the expert weights (most of a MoE's bytes) are read twice per step. Here the two run as segments of
one forward (``Transformer.forward_segments``): each attends with its own shape, and each layer's
feed-forward runs once over both segments' tokens, so the experts are read once.

Shapes: the decode rows are a compiled batch bucket, the chunk one row of the full-chunk length
bucket, and both attend over the whole context (one span), so a runner compiles one mixed step per
decode batch bucket. The chunk's attention over the context dominates such a step; the decode
rows' reads past their own lengths are the price of not multiplying the compiled shapes by the
span buckets. Shorter pieces (a prompt's last chunk, short prompts) run as their own prefill call.

Speculative decoding with a fused draft model mixes a chunk into a drafting step's verification
the same way (``speculative.step_fns.make_verify_mixed``, on ``forward_mixed``).

``mixed_prefill="auto"`` mixes on accelerators only: on a CPU a chunk is compute-bound, the saved
weight reads are small, and one call measured 1.12-1.20x two (``docs/long_context.md``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.engine.steps import PlacedBackend, last_logits
from jaxspec.models.transformer import Segment
from jaxspec.sampling import BatchSampling, sample_tokens


def forward_mixed(graphdef, statics, state, cache, segments: tuple[Segment, ...], kv_lens: tuple[int, ...]):
    """``Transformer.forward_segments`` under a runner's statics -> (logits [B_g, T_g, V] per segment,
    cache (placed as the runner's on a mesh), expert load). Speculative verification mixed with a
    chunk builds on it too."""
    placed = statics.moe_backend if isinstance(statics.moe_backend, PlacedBackend) else None
    backend = placed.dispatch if placed is not None else statics.moe_backend
    model = nnx.merge(graphdef, state)
    hs, cache, load = model.forward_segments(segments, cache, kv_lens, backend, statics.attention_backend,
                                             statics.matmul_backend)
    if placed is not None:
        cache = jax.lax.with_sharding_constraint(cache, placed.placement.cache_shardings(cache))
    return [model.logits(h, statics.matmul_backend) for h in hs], cache, load


def chunk_token(logits, p_valid, p_sampling: BatchSampling):
    """A prefill chunk's sampled token [P] from its logits [P, T, V], as a prefill call samples it."""
    return sample_tokens(last_logits(logits, p_valid), p_sampling, jnp.zeros_like(p_valid))


def _mixed_impl(graphdef, statics, state, cache, d_slots, d_tokens, d_start, d_valid, d_sampling: BatchSampling,
                d_out_positions, p_tokens, p_start, p_slots, p_valid, p_sampling: BatchSampling, *, kv_len: int):
    """Decode rows d_* [B] (padding rows: slot id S, valid 0) and prefill rows p_tokens [P, T] from
    p_start [P] -> (cache, decode tokens [B], each prefill row's sampled token [P], expert load)."""
    segments = (Segment(d_tokens[:, None], d_start, d_slots, d_valid), Segment(p_tokens, p_start, p_slots, p_valid))
    (d_logits, p_logits), cache, load = forward_mixed(graphdef, statics, state, cache, segments, (kv_len, kv_len))
    d_out = sample_tokens(d_logits[:, 0], d_sampling, d_out_positions)
    return cache, d_out, chunk_token(p_logits, p_valid, p_sampling), load


_STEPS: dict[tuple, Callable] = {}


def mixed_step(graphdef, statics, kv_len: int, state_sharding=None, cache_sharding=None, key: tuple = ()) -> Callable:
    """The jitted mixed step of a runner (shared by runners of one architecture, span and, placed,
    one mesh layout): the cache donated; placed runners' small inputs and outputs replicated."""
    full_key = (graphdef, statics, kv_len, *key)
    step = _STEPS.get(full_key)
    if step is None:
        fn = functools.partial(_mixed_impl, graphdef, statics, kv_len=kv_len)
        if state_sharding is None:
            step = jax.jit(fn, donate_argnums=(1,))
        else:
            rep = statics.moe_backend.placement.replicated()
            step = jax.jit(fn, donate_argnums=(1,), in_shardings=(state_sharding, cache_sharding, *[rep] * 11),
                           out_shardings=(cache_sharding, rep, rep, rep))
        _STEPS[full_key] = step
    return step
