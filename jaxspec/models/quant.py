"""Weight-only quantization: int8 with per-output-channel scales, int4 with grouped scales.

``quantize_model(model, "int8" | "int4")`` replaces the projection weights of a
``Transformer`` (attention q/k/v/o, dense and shared-expert MLPs, expert weights,
lm_head) by ``QuantizedWeight`` modules: an int8 parameter ``q`` and a float32
parameter ``scale``, both tagged with logical axes so they shard like the weight
they replace. Embeddings (read by a gather, and the output head when tied), norms
and the router (small, and routing is sensitive to it) stay float. Activations stay
float: the weight is dequantized where it is used, inside the jitted step, so no float
copy of the model is kept.

Formats (``w`` the float weight, "contracted" the axes a matmul sums over):

  int8  q = round(w / scale) in [-127, 127], one scale per output channel: the scale
        has w's rank with size 1 on the contracted axes.
  int4  q in [-7, 7] with one scale per group of ``g`` consecutive entries along the
        last contracted axis (g = gcd(group_size, that axis), so groups always tile it);
        the scale has that axis divided by g. Two values are packed per int8 byte along
        the same axis (entry 2i in the low nibble, 2i+1 in the high one), so ``q`` has
        that axis halved.

Layers read a weight with ``self.w[...]`` as before: on a ``QuantizedWeight`` that
gives a ``QArray`` (a pytree of q, scale), and ``qeinsum`` multiplies by it. int8
scales factor out of the sum, so ``qeinsum`` multiplies by the int8 values and scales
the product; int4 groups do not, so the weight is dequantized at the matmul (a temporary of
that one weight inside the step, unless XLA fuses it into the matmul's operand). Expert
dispatch never dequantizes a whole [E, D, F] expert tensor: the looping backends slice an expert
or a tile first, ``dense`` maps over experts, ``ragged`` and expert parallelism multiply by int8
values directly and walk int4 contractions in chunks (``qragged_dot``), and ``pallas`` reads int8
and int4 experts in its kernels (``pallas_kernels.gmm_int8``, ``gmm_int4``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # int4 entries per scale along the contracted axis (AWQ / GPTQ's usual)
_QMAX = {8: 127, 4: 7}  # symmetric ranges: zero is exact and no offset is stored


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["bits", "axis"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight as the layers see it (a pytree: it passes through jit, cond, tree.map).

    ``axis`` (negative, so it survives indexing leading axes) is the int4 packed and grouped axis."""

    q: jax.Array  # int8: the values (int8), or two int4 values per byte along ``axis`` (int4)
    scale: jax.Array  # float32, q's rank: 1 on contracted axes (int8), groups along ``axis`` (int4)
    bits: int
    axis: int = -1

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        shape = list(self.q.shape)
        if self.bits == 4:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def __getitem__(self, index) -> "QArray":
        """Index leading, never contracted, axes (an expert: ``w[e]``, ``w[tile_expert]``)."""
        return QArray(self.q[index], self.scale[index], self.bits, self.axis)


class QuantizedWeight(nnx.Module):
    """The parameters of one quantized weight; ``self.w[...]`` gives its ``QArray``."""

    def __init__(self, q: jax.Array, scale: jax.Array, bits: int, axis: int, axes: tuple[str | None, ...]):
        self.q = nnx.Param(q, logical_axes=axes)
        # A scale axis of size 1 (a contracted axis of int8) is replicated; the others shard as the weight.
        self.scale = nnx.Param(scale, logical_axes=tuple(a if n > 1 else None for a, n in zip(axes, scale.shape)))
        self.bits = bits
        self.axis = axis

    def __getitem__(self, index) -> QArray:
        return QArray(self.q[index], self.scale[index], self.bits, self.axis)


# ------------------------------------------------------------------------- formats
def pack_int4(values: jax.Array, axis: int) -> jax.Array:
    """int values in [-8, 7] -> int8 bytes holding entries 2i (low nibble) and 2i+1 (high) of ``axis``."""
    axis = axis % values.ndim
    pairs = values.reshape(values.shape[:axis] + (values.shape[axis] // 2, 2) + values.shape[axis + 1:])
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (hi.astype(jnp.int32) * 16 + (lo.astype(jnp.int32) & 15)).astype(jnp.int8)  # in [-128, 127]


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """The inverse of ``pack_int4`` -> int8 values, ``axis`` doubled."""
    axis = axis % packed.ndim
    lo = jnp.right_shift(jnp.left_shift(packed, 4), 4)  # arithmetic shifts sign-extend the nibble
    hi = jnp.right_shift(packed, 4)
    both = jnp.stack([lo, hi], axis=axis + 1)
    return both.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])


def int4_group(size: int, group_size: int) -> int:
    """Entries per int4 scale along an axis of ``size``: at most ``group_size``, and dividing ``size``."""
    return math.gcd(size, group_size)


@functools.partial(jax.jit, static_argnames=("contracted", "bits", "group_size"))
def quantize(w: jax.Array, contracted: tuple[int, ...], bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> QArray:
    """Quantize ``w`` whose axes ``contracted`` are summed over by its matmuls (see the module doc)."""
    w = w.astype(jnp.float32)
    qmax = _QMAX[bits]
    if bits == 8:
        amax = jnp.max(jnp.abs(w), axis=contracted, keepdims=True)  # [.., 1 on contracted, ..]
        axis = -1
    else:
        axis = contracted[-1] - w.ndim  # negative
        if w.shape[axis] % 2:
            raise ValueError(f"int4 packs pairs along axis {axis}: its size {w.shape[axis]} must be even")
        g = int4_group(w.shape[axis], group_size)
        a = axis % w.ndim
        grouped = w.reshape(w.shape[:a] + (w.shape[a] // g, g) + w.shape[a + 1:])
        amax = jnp.max(jnp.abs(grouped), axis=a + 1)  # [.., groups, ..]
    scale = jnp.where(amax > 0, amax / qmax, 1.0)  # an all-zero channel (padding) stays exactly zero
    full = scale if bits == 8 else jnp.repeat(scale, g, axis=axis)
    q = jnp.clip(jnp.round(w / full), -qmax, qmax).astype(jnp.int8)
    return QArray(q if bits == 8 else pack_int4(q, axis), scale, bits, axis)


def dequantize(w: QArray, dtype=jnp.float32) -> jax.Array:
    """The float weight ``w`` stands for."""
    values = unpack_int4(w.q, w.axis) if w.bits == 4 else w.q
    scale = w.scale
    if w.bits == 4:
        scale = jnp.repeat(scale, values.shape[w.axis] // scale.shape[w.axis], axis=w.axis)
    return (values.astype(jnp.float32) * scale).astype(dtype)


def as_float(w: jax.Array | QArray, dtype) -> jax.Array:
    """``w`` as a ``dtype`` array: dequantized if it is quantized (for code that needs the matrix itself)."""
    return dequantize(w, dtype) if isinstance(w, QArray) else w.astype(dtype)


def qeinsum(spec: str, x: jax.Array, w: jax.Array | QArray, **kwargs) -> jax.Array:
    """``jnp.einsum(spec, x, w, **kwargs)`` for a float or quantized weight ``w`` (spec "x,w->out")."""
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w, **kwargs)
    if w.bits == 4:
        # Dequantized in x's dtype, not float32: a copy XLA keeps (e.g. hoisted out of the draft loop) is then half the size.
        values = unpack_int4(w.q, w.axis).astype(x.dtype)
        scale = jnp.repeat(w.scale.astype(x.dtype), values.shape[w.axis] // w.scale.shape[w.axis], axis=w.axis)
        return jnp.einsum(spec, x, values * scale, **kwargs)
    # int8: x @ (q * s) == (x @ q) * s, the scales being constant along the contracted axes.
    inputs, out = spec.replace(" ", "").split("->")
    w_letters = inputs.split(",")[1]
    kept = "".join(c for c in w_letters if c in out)  # the output axes the scale varies along
    scale = w.scale.reshape([n for c, n in zip(w_letters, w.scale.shape) if c in out])
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), **kwargs)
    return jnp.einsum(f"{out},{kept}->{out}", y, scale.astype(y.dtype))  # broadcasting product


INT4_RAGGED_CHUNK = 1024  # contraction entries dequantized per step of an int4 ``qragged_dot``


def qragged_dot(lhs: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array, row_group: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot(lhs [M, K], w [G, K, N], group_sizes)`` for a float or quantized ``w``;
    ``row_group`` [M] is each row's group (any value for rows past the groups, which come out 0).

    int8: the int8 values go into the grouped product as they are (a mixed-dtype dot: no float copy
    of the experts), then each row's group's column scales multiply the float32 product. int4: the
    contraction is walked in chunks of whole scale groups (``INT4_RAGGED_CHUNK`` entries), each
    chunk of every expert dequantized inside the loop, so at most one chunk exists in float."""
    if not isinstance(w, QArray):
        return jax.lax.ragged_dot(lhs, w, group_sizes)
    if w.bits == 8:
        y = jax.lax.ragged_dot(lhs, w.q, group_sizes, preferred_element_type=jnp.float32)
        return (y * jnp.take(w.scale[:, 0], row_group, axis=0, mode="clip")).astype(lhs.dtype)
    if w.axis % w.q.ndim != 1:
        raise ValueError(f"int4 expert weights must be packed along the contraction (axis 1), got axis {w.axis}")
    k, num_groups = lhs.shape[1], w.scale.shape[1]
    group = k // num_groups
    per = max(1, min(num_groups, INT4_RAGGED_CHUNK // group))
    while num_groups % per:  # chunks of whole groups that tile the contraction
        per -= 1
    chunk = per * group

    def step(i, acc):
        q = jax.lax.dynamic_slice_in_dim(w.q, i * (chunk // 2), chunk // 2, axis=1)
        s = jax.lax.dynamic_slice_in_dim(w.scale, i * per, per, axis=1)
        x = jax.lax.dynamic_slice_in_dim(lhs, i * chunk, chunk, axis=1)
        return acc + jax.lax.ragged_dot(x, dequantize(QArray(q, s, 4, w.axis), lhs.dtype), group_sizes,
                                        preferred_element_type=jnp.float32)

    acc = jnp.zeros((lhs.shape[0], w.shape[2]), jnp.float32)
    return jax.lax.fori_loop(0, num_groups // per, step, acc).astype(lhs.dtype)


# ------------------------------------------------------------------------ the model
def _quantized_weights() -> dict[type, dict[str, tuple[int, ...]]]:
    """Module type -> {weight attribute: its contracted axes}: what ``quantize_model`` replaces."""
    from jaxspec.models.layers import MLP, Attention
    from jaxspec.models.moe import MoEBlock
    from jaxspec.models.transformer import Transformer

    return {
        Attention: {"wq": (0,), "wk": (0,), "wv": (0,), "wo": (0, 1)},  # [D,H,Dh] x3, [H,Dh,D]
        MLP: {"w_gate": (0,), "w_up": (0,), "w_down": (0,)},  # [D,F], [D,F], [F,D]
        MoEBlock: {"w_gate": (1,), "w_up": (1,), "w_down": (1,)},  # [E,D,F], [E,D,F], [E,F,D]
        Transformer: {"lm_head": (0,)},  # [D,V] (absent with tied embeddings: the embedding stays float)
    }


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)} (or none), got {mode!r}")
    return mode


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
    """Quantize ``model``'s projection weights in place, one weight at a time (each float weight
    is dropped as its quantized one replaces it); returns the model, whose ``cfg`` then records
    ``quantization`` and ``quant_group_size`` (so a saved directory reloads quantized)."""
    bits = {"int8": 8, "int4": 4}[check_mode(mode)]
    if model.cfg.quantization is not None:
        raise ValueError(f"model is already quantized ({model.cfg.quantization}); load it in float to requantize")
    table = _quantized_weights()
    for _, module in list(nnx.iter_modules(model)):
        for name, contracted in table.get(type(module), {}).items():
            param = getattr(module, name, None)
            if param is None:
                continue
            qa = quantize(param[...], contracted, bits, group_size)
            setattr(module, name, QuantizedWeight(qa.q, qa.scale, bits, qa.axis, tuple(param.get_metadata()["logical_axes"])))
    model.cfg = model.cfg.replace(quantization=mode, quant_group_size=group_size)
    return model


def weight_bytes(model) -> int:
    """Bytes of the model's parameters as stored (quantized ones count their int8 and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
