"""Expert weights held as one array per expert as well, for steps compiled by XLA:CPU.

A MoE layer's expert weights are one parameter [E, D, F] (checkpoints, sharding and the
grouped kernels want them stacked). On XLA:CPU, a step that multiplies by ``w[e]`` copies
that slice into a buffer of its own before the matmul reads it: a 1-token decode of the
Mixtral-shaped benchmark model copied 36 expert matrices (19 MB) per step, 1.7 of its 3.2 ms.
Passed as E separate arguments, each expert's matrix is read where it lies.

``ExpertSlices`` is that form of one parameter: a pytree whose leaves are the E arrays and the
stacked array beside them (so the experts take twice their memory). The dispatch backends that
index experts one at a time (``moe_dispatch.SLICE_BACKENDS``) take ``parts[e]``; the others take
the stacked array (``whole``), which a backend computing every expert (``dense``) reads in one
batched product: at 8 decode rows, which wake most experts, per-expert products alone made the
engine 17% slower end to end than that. A step reads only the arrays its backend uses. ``split_experts`` turns
a runner's parameter tree into this form; a measured runner does so only where a chosen backend
reads experts one at a time (the C++ kernel, ``cpu_fused``, reads the stacked array in place).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# The MoE block's expert parameters ([E, D, F] or [E, F, D]); a dense MLP's are 2-D.
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


@jax.tree_util.register_pytree_node_class
class ExpertSlices:
    """An [E, ...] parameter as E arrays [...] and the stacked array: ``w[e]`` is expert e's,
    ``w[...]`` the whole one."""

    def __init__(self, parts, whole):
        self.parts = tuple(parts)
        self.whole = whole

    def tree_flatten(self):
        return (*self.parts, self.whole), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[:-1], children[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.whole.shape)

    def __getitem__(self, index):
        if isinstance(index, int):
            return self.parts[index]
        return self.whole[index]


def whole(w):
    """``w`` as one array (``ExpertSlices``' stacked one; anything else as it is)."""
    return w.whole if isinstance(w, ExpertSlices) else w


def is_expert_array(key: str, value) -> bool:
    """A float MoE expert weight [E, ...] under its parameter name (quantized experts stay as they
    are: their own pytree; a dense MLP's weights are 2-D)."""
    return (key in EXPERT_PARAMS and isinstance(value, jax.Array) and value.ndim == 3
            and jnp.issubdtype(value.dtype, jnp.floating))


def split_experts(params: dict) -> dict:
    """A parameter tree (``engine.steps.params_tree``) with every MoE expert parameter as
    ``ExpertSlices`` (each expert a copy of its own, beside the stacked array); every other leaf is
    the same array."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = split_experts(value)
        elif is_expert_array(key, value):
            out[key] = ExpertSlices([value[e] for e in range(value.shape[0])], value)
        else:
            out[key] = value
    return out


def expert_bytes(params: dict) -> int:
    """Bytes of the expert arrays ``split_experts`` copies."""
    return sum(expert_bytes(v) if isinstance(v, dict) else v.nbytes if is_expert_array(k, v) else 0
               for k, v in params.items())


def available_memory() -> int:
    """Bytes of host memory free now (``sysconf``); where it cannot be read, as good as unlimited."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def has_expert_slices(params) -> bool:
    return any(isinstance(x, ExpertSlices) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, ExpertSlices)))
