"""The jitted steps a ``ModelRunner`` runs: prefill, prefill at an offset, and decode.

The step functions are module-level with the graph definition static, so runners of the same
model architecture share compiled executables (a new engine does not recompile). Single-device
runners get them from ``unplaced_steps``; runners on a mesh from ``placed_steps``, compiled with
explicit in/out shardings: the cache comes back with the sharding it went in with.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.mesh import Placement
from jaxspec.models import KVCache
from jaxspec.sampling import BatchSampling, sample_tokens


def params_tree(state: nnx.State) -> dict:
    """A model's parameters (or their shardings) as the nested dict of arrays every step takes.

    jit flattens a dict in C++, where an ``nnx.State`` calls into Python for every Variable: with
    the built-in target's 43 parameters a step call cost about 77 us instead of 26. ``nnx.merge``
    takes the dict as it is."""
    return nnx.to_pure_dict(state)


def params_variables(graphdef, params: dict) -> nnx.State:
    """The ``nnx.State`` of a ``params_tree`` (its variables with their metadata, such as the
    logical axes that place them), sharing the arrays."""
    return nnx.state(nnx.merge(graphdef, params))


def slots_unsplit(cache_sharding: KVCache) -> bool:
    """Whether the cache's slot axis lives whole on every device (rows can be packed freely)."""
    spec = getattr(cache_sharding.k, "spec", None)
    return spec is None or len(spec) < 2 or spec[1] is None


class StepStatics(NamedTuple):
    """Everything static a step's trace depends on besides shapes and the graph: part of every
    jit key, so runners that differ here never share a compiled step. Hashable."""

    moe_backend: Any = None  # backend name, ExpertParallel, PlacedBackend, or None (the config's)
    attention_backend: str = "xla"
    # Layers whose input hidden states the steps also return (EAGLE-3 features; ``()``: none, and
    # the steps are exactly the plain ones).
    aux_layers: tuple[int, ...] = ()
    matmul_backend: str = "xla"  # the dense projections' (``dense_cpu.MATMUL_BACKENDS``)


class PlacedBackend(NamedTuple):
    """The ``moe_backend`` of a runner on a mesh: the MoE dispatch plus the placement.

    Steps built from ``ModelRunner.forward_fn`` (speculative verification) then pin the
    cache they return to its input sharding too, and jit caches keyed on ``moe_backend``
    tell runners on different meshes apart. Hashable (a static jit argument)."""

    dispatch: Any  # backend name, ExpertParallel, or None (the model config's)
    placement: Placement


def _forward(graphdef, statics: StepStatics, state, tokens, start, cache, slot_ids=None, num_valid=None, kv_len=None,
             logits_at=None):
    moe_backend = statics.moe_backend
    placed = moe_backend if isinstance(moe_backend, PlacedBackend) else None
    backend = placed.dispatch if placed else moe_backend
    out = nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid, moe_backend=backend, kv_len=kv_len,
                                     attention_backend=statics.attention_backend, aux_layers=statics.aux_layers,
                                     logits_at=logits_at, matmul_backend=statics.matmul_backend)
    if placed is not None:
        out = out._replace(cache=jax.lax.with_sharding_constraint(out.cache, placed.placement.cache_shardings(out.cache)))
    return out


def last_logits(logits: jax.Array, num_valid: jax.Array) -> jax.Array:
    """Each prefill row's logits [P, T, V] at its last valid position -> [P, V] (the first output
    token's, for a prompt's last chunk)."""
    return jnp.take_along_axis(logits, last_position(num_valid)[:, None, None], axis=1)[:, 0]


def last_position(num_valid: jax.Array) -> jax.Array:
    """Each prefill row's last valid position [P] (``logits_at`` of a prefill forward)."""
    return jnp.maximum(num_valid - 1, 0)


def _prefill_impl(graphdef, statics, state, cache, tokens, slot_ids, num_valid, sampling: BatchSampling):
    """tokens [P, T] prompts from position 0, slot_ids/num_valid [P] (padding rows: slot id S)
    -> (cache, first token [P], last logits [P, V], expert load[, aux hidden [P, T, F] with
    ``statics.aux_layers``]). Attends over T positions only."""
    p, t = tokens.shape
    out = _forward(graphdef, statics, state, tokens, jnp.zeros((p,), jnp.int32), cache, slot_ids, num_valid, kv_len=t,
                   logits_at=last_position(num_valid))
    last = out.logits[:, 0]
    return (out.cache, sample_tokens(last, sampling, jnp.zeros((p,), jnp.int32)), last, out.expert_load, *_aux(out))


def _prefill_at_impl(graphdef, statics, state, cache, tokens, start, slot_ids, num_valid, sampling: BatchSampling,
                     *, kv_len: int):
    """``_prefill_impl`` for prompts whose first ``start`` [P] tokens are already in the cache (a
    shared prefix, or earlier chunks): tokens [P, T] go to start..start+T-1; attends over kv_len."""
    p, t = tokens.shape
    out = _forward(graphdef, statics, state, tokens, start, cache, slot_ids, num_valid, kv_len=kv_len,
                   logits_at=last_position(num_valid))
    last = out.logits[:, 0]
    return (out.cache, sample_tokens(last, sampling, jnp.zeros((p,), jnp.int32)), last, out.expert_load, *_aux(out))


def _aux(out) -> tuple:
    return () if out.aux_hidden is None else (out.aux_hidden,)


def _decode_impl(graphdef, statics, state, cache, slot_ids, last_tokens, start, num_valid, sampling: BatchSampling,
                 out_positions, *, kv_len: int, identity_rows: bool = False, steps: int = 1):
    """One token for each of B rows: slot_ids/last_tokens/start/num_valid/out_positions [B] (padding
    rows: slot id S, num_valid 0) -> (cache, tokens [B], expert load). Attends over kv_len positions.
    ``identity_rows``: row b is slot b (slot_ids ignored; no gather of cache rows). ``steps`` > 1:
    that many decode steps in one call, each feeding the token the step before sampled (``_steps``)."""
    ids = None if identity_rows else slot_ids
    if steps > 1:
        return _steps(graphdef, statics, state, cache, ids, last_tokens, start, num_valid, sampling, out_positions,
                      kv_len, steps)
    out = _forward(graphdef, statics, state, last_tokens[:, None], start, cache, ids, num_valid, kv_len=kv_len)
    tokens = sample_tokens(out.logits[:, 0], sampling, out_positions)
    return (out.cache, tokens, out.expert_load, *_aux(out))


def _steps(graphdef, statics, state, cache, ids, last_tokens, start, num_valid, sampling, out_positions, kv_len, steps):
    """``steps`` plain decode steps as one call -> (cache, tokens [B, steps], expert load summed, last
    tokens [B]). Step i feeds position start + i and samples output position out_positions + i,
    exactly as the i-th of ``steps`` single calls would: the same tokens, for a fixed per-call cost
    (dispatch, argument handling, the runtime's set-up) paid once. Needs kv_len >= start + steps."""
    if statics.aux_layers:
        raise ValueError("decode steps returning hidden features run one at a time")

    def one(carry, i):
        cache, tokens = carry
        out = _forward(graphdef, statics, state, tokens[:, None], start + i, cache, ids, num_valid, kv_len=kv_len)
        nxt = sample_tokens(out.logits[:, 0], sampling, out_positions + i)
        return (out.cache, nxt), (nxt, out.expert_load)

    (cache, last), (tokens, loads) = jax.lax.scan(one, (cache, last_tokens), jnp.arange(steps, dtype=jnp.int32))
    return cache, tokens.T, loads.sum(axis=0).astype(loads.dtype), last


# Jitted steps with the graphdef bound, resolved once per runner: hashing a graphdef
# costs ~1 ms, too much to pay on every decode step as a static argument.
_STEPS: dict[tuple, tuple[Callable, "SpanSteps", "SpanSteps"]] = {}


class SpanSteps:
    """A decode step compiled once per attention span: ``step(*args, kv_len=N)``. The span is
    bound into each jitted function (not a static keyword), so it works with explicit
    in/out shardings too."""

    def __init__(self, make: Callable[..., Callable]):
        self._make = make
        self._fns: dict[tuple[int, int], Callable] = {}

    def for_span(self, kv_len: int, steps: int = 1) -> Callable:
        """The step for this span; ``steps`` > 1: that many decode steps in one call (``make``
        takes it as a second argument; steps that cannot run several have a ``make`` of one)."""
        fn = self._fns.get((kv_len, steps))
        if fn is None:
            fn = self._fns[kv_len, steps] = self._make(kv_len) if steps == 1 else self._make(kv_len, steps)
        return fn

    def __call__(self, *args, kv_len: int, steps: int = 1):
        return self.for_span(kv_len, steps)(*args)


def unplaced_steps(graphdef, statics: StepStatics) -> tuple[Callable, SpanSteps, SpanSteps]:
    """(prefill, decode, prefill at an offset) for a single-device runner, shared by every runner of
    this architecture."""
    key = (graphdef, statics)
    steps = _STEPS.get(key)
    if steps is None:
        steps = _STEPS[key] = (
            jax.jit(functools.partial(_prefill_impl, graphdef, statics), donate_argnums=(1,)),
            SpanSteps(lambda kv_len, steps=1: jax.jit(
                functools.partial(_decode_impl, graphdef, statics, kv_len=kv_len, steps=steps), donate_argnums=(1,))),
            SpanSteps(lambda kv_len: jax.jit(functools.partial(_prefill_at_impl, graphdef, statics, kv_len=kv_len),
                                             donate_argnums=(1,))),
        )
    return steps

# Steps of placed runners, compiled with explicit shardings; keyed on everything the
# shardings depend on, so runners of one architecture on one mesh share executables.
_PLACED_STEPS: dict[tuple, tuple[Callable, SpanSteps, SpanSteps]] = {}


def placed_steps(graphdef, statics: StepStatics, state_sharding, cache_sharding: KVCache, key: tuple):
    """(prefill, decode, prefill at an offset) jitted with in/out shardings: parameters and cache as
    placed, the small per-step inputs and outputs (tokens, sampling settings, logits, expert load,
    captured hidden states) replicated."""
    steps = _PLACED_STEPS.get(key)
    if steps is None:
        rep = statics.moe_backend.placement.replicated()
        # EAGLE-3 features [rows, T, F] replicated like the logits: the head's absorb (one device's
        # worth of work, its rows in any order) takes them as they come out.
        aux = (rep,) if statics.aux_layers else ()
        prefill = jax.jit(
            functools.partial(_prefill_impl, graphdef, statics), donate_argnums=(1,),
            in_shardings=(state_sharding, cache_sharding, rep, rep, rep, rep),
            out_shardings=(cache_sharding, rep, rep, rep, *aux),
        )
        # A cache whose slots are split over devices is stepped in slot order: packing rows of
        # different shards into one batch would move cache rows between devices.
        identity = not slots_unsplit(cache_sharding)
        decode = SpanSteps(lambda kv_len: jax.jit(
            functools.partial(_decode_impl, graphdef, statics, kv_len=kv_len, identity_rows=identity),
            donate_argnums=(1,),
            in_shardings=(state_sharding, cache_sharding, rep, rep, rep, rep, rep, rep),
            out_shardings=(cache_sharding, rep, rep, *aux),
        ))
        prefill_at = SpanSteps(lambda kv_len: jax.jit(
            functools.partial(_prefill_at_impl, graphdef, statics, kv_len=kv_len), donate_argnums=(1,),
            in_shardings=(state_sharding, cache_sharding, rep, rep, rep, rep, rep),
            out_shardings=(cache_sharding, rep, rep, rep, *aux),
        ))
        steps = _PLACED_STEPS[key] = (prefill, decode, prefill_at)
    return steps

