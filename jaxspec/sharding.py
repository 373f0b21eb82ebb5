"""Logical axis names -> mesh axes, by rules.

Every parameter carries ``logical_axes`` metadata (see ``models/layers.param``) and
the KV cache has fixed logical axes (``models/kv_cache.KV_CACHE_AXES``). A rule set
maps each logical name to a mesh axis (or a tuple of axes, or None for
replicated); the model never names mesh axes itself.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxspec.models.kv_cache import (KV_CACHE_AXES, KV_PAGED_AXES, KV_PAGED_SCALE_AXES, KV_SCALE_AXES,
                                     KV_SPLIT_PAGED_AXES, KV_SPLIT_PAGED_SCALE_AXES, LENGTHS_AXES, KVCache)

Rules = Mapping[str, str | tuple[str, ...] | None]

# Simple tensor parallelism over a ("data", "model") mesh: heads, kv heads, MLP width
# and vocab split over "model"; cache slots over "data".
TENSOR_PARALLEL_RULES: dict[str, Any] = {
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "moe_mlp": "model",
    "expert": None,
    "layers": None,
    "slots": "data",
    "seq": None,
}


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None, shape=None) -> PartitionSpec:
    """PartitionSpec for one array. A dimension that the mesh axis does not divide stays replicated."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if any(t in used for t in targets):  # a mesh axis may appear once per array
            targets = ()
        if targets and mesh is not None and shape is not None:
            size = 1
            for t in targets:
                size *= mesh.shape[t]
            if shape[i] % size:
                targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def _param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"parameter of shape {variable.shape} has no logical_axes metadata")
    return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedSharding for every variable of an ``nnx.split`` state (same tree structure)."""
    return jax.tree.map(
        lambda v: v.replace(NamedSharding(mesh, logical_to_spec(_param_axes(v), rules, mesh, v.shape))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Place a model's parameters on ``mesh`` by the rules (in place, returns the model)."""
    graphdef, state = nnx.split(model)
    # Variables are pytree nodes, so the state and its shardings have matching leaves (indexing
    # a Variable that holds a NamedSharding with [...] is an error in flax 0.12).
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Rules) -> KVCache:
    paged, split = cache.page_table is not None, cache.page_groups is not None
    axes = KV_SPLIT_PAGED_AXES if split else KV_PAGED_AXES if paged else KV_CACHE_AXES
    kv = NamedSharding(mesh, logical_to_spec(axes, rules, mesh, cache.k.shape))
    scale = None
    if cache.k_scale is not None:  # int8: the scales split like the values, less head_dim
        axes = KV_SPLIT_PAGED_SCALE_AXES if split else KV_PAGED_SCALE_AXES if paged else KV_SCALE_AXES
        scale = NamedSharding(mesh, logical_to_spec(axes, rules, mesh, cache.k_scale.shape))
    lengths = NamedSharding(mesh, logical_to_spec(LENGTHS_AXES, rules, mesh, cache.lengths.shape))
    if not paged:
        return KVCache(kv, kv, lengths, None, scale, scale)
    if split:  # per-slot metadata and the groups' first pages follow the slots (rows stepped in order)
        table = NamedSharding(mesh, logical_to_spec(("slots", None), rules, mesh, cache.page_table.shape))
        groups = NamedSharding(mesh, logical_to_spec(("slots",), rules, mesh, cache.page_groups.shape))
        return KVCache(kv, kv, lengths, table, scale, scale, groups)
    # Pages whole on every device: a step may pack any slots into its rows, so per-slot metadata
    # lives whole on every device too.
    rep = NamedSharding(mesh, PartitionSpec())
    return KVCache(kv, kv, rep, rep, scale, scale)


def shard_cache(cache: KVCache, mesh: Mesh, rules: Rules) -> KVCache:
    return jax.tree.map(jax.device_put, cache, cache_shardings(cache, mesh, rules))
