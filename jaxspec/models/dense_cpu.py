"""Dense products of a few rows through the CPU kernels (``cpu_kernels``): matmul backend "cpu".

XLA:CPU runs a product of a few rows by a weight matrix at a fraction of its one-row speed (a
general matrix product that packs its operands), so a verification's projections cost several times
a decode step's. With matmul backend "cpu" (a static argument of the forward, chosen by the runner):

* ``project(spec, x, w, "cpu")``: ``qeinsum(spec, x, w)`` for the model's projection specs (x's
  leading axes, then the contracted ones; w's contracted axes first) through
  ``cpu_kernels.dense_matmul``, which streams each weight once for all rows;
* ``dense_ffn(x, w_gate, w_up, w_down, "cpu")``: a SwiGLU MLP as one call of
  ``cpu_kernels.moe_ffn`` with a single expert that every row takes at weight 1;
* ``head_tied(hidden, embed, "cpu")``: the logits of a model whose head is its embedding [V, D],
  read as it lies (XLA's product read it through a transposed operand, several times slower).

Each applies to float32 weights (not quantized) and at most ``MAX_ROWS`` rows (a prefill's hundreds
of rows go to XLA's general product); otherwise XLA computes them. The kernels sum in one fixed
order, so a row's result does not depend on the other rows of the call: a token gets the same bits
in a decode and in a verification.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxspec.models.quant import qeinsum

MATMUL_BACKENDS = ("xla", "cpu")
MAX_ROWS = 64  # rows up to which the kernels take a product


def check_matmul_backend(name: str) -> str:
    if name not in MATMUL_BACKENDS:
        raise ValueError(f"unknown matmul backend {name!r}; available: {', '.join(MATMUL_BACKENDS)}")
    return name


def _float32(*arrays) -> bool:
    return all(isinstance(a, jax.Array) and a.dtype == jnp.float32 for a in arrays)


def split_spec(spec: str, x_ndim: int) -> tuple[str, str, str] | None:
    """(x's free letters, contracted letters, w's free letters) when ``spec`` is a projection
    out = x_free + w_free, x = x_free + contracted, w = contracted + w_free; else None."""
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    if "..." in xs:
        free = "".join(chr(ord("A") + i) for i in range(x_ndim - (len(xs) - 3)))
        xs, out = xs.replace("...", free), out.replace("...", free)
    contracted = "".join(c for c in xs if c in ws and c not in out)
    x_free, w_free = xs[:len(xs) - len(contracted)], ws[len(contracted):]
    if xs != x_free + contracted or ws != contracted + w_free or out != x_free + w_free:
        return None
    return x_free, contracted, w_free


def project(spec: str, x: jax.Array, w, backend: str = "xla", preferred_element_type=None) -> jax.Array:
    """``qeinsum(spec, x, w, preferred_element_type=...)``, through ``cpu_kernels.dense_matmul`` where
    ``backend`` is "cpu" and it applies (float32 in, float32 out)."""
    if check_matmul_backend(backend) == "cpu" and _float32(x, w):
        parts = split_spec(spec, x.ndim)
        if parts is not None:
            x_free, contracted, _ = parts
            rows = math.prod(x.shape[:len(x_free)])
            if rows <= MAX_ROWS:
                from cpu_kernels.dense_matmul import dense_matmul

                depth = math.prod(x.shape[len(x_free):])
                y = dense_matmul(x.reshape(rows, depth), w.reshape(depth, -1))
                return y.reshape(*x.shape[:len(x_free)], *w.shape[len(contracted):])
    return qeinsum(spec, x, w, preferred_element_type=preferred_element_type)


def head_tied(hidden: jax.Array, embed, backend: str = "xla") -> jax.Array:
    """Logits ``hidden [..., D] @ embed [V, D]^T`` (float32) of a model whose output head is its
    embedding: through ``cpu_kernels.dense_matmul.dense_matmul_nt`` where ``backend`` is "cpu" and it
    applies (the embedding read as it lies), else XLA."""
    rows = math.prod(hidden.shape[:-1])
    if check_matmul_backend(backend) == "cpu" and _float32(hidden, embed) and rows <= MAX_ROWS:
        from cpu_kernels.dense_matmul import dense_matmul_nt

        y = dense_matmul_nt(hidden.reshape(rows, hidden.shape[-1]), embed)
        return y.reshape(*hidden.shape[:-1], embed.shape[0])
    return qeinsum("...d,dv->...v", hidden, embed.T, preferred_element_type=jnp.float32)


def dense_ffn(x: jax.Array, w_gate, w_up, w_down, backend: str = "xla") -> jax.Array | None:
    """down(silu(x @ gate) * (x @ up)) for x [..., D] through ``cpu_kernels.moe_ffn`` (one expert), or
    None where the kernel does not apply (the caller computes it with XLA)."""
    rows = math.prod(x.shape[:-1])
    if check_matmul_backend(backend) != "cpu" or not _float32(x, w_gate, w_up, w_down) or rows > MAX_ROWS:
        return None
    from cpu_kernels.moe_ffn import moe_ffn

    ids = jnp.zeros((rows, 1), jnp.int32)
    y = moe_ffn(x.reshape(rows, x.shape[-1]), ids, jnp.ones((rows, 1), jnp.float32), w_gate[None], w_up[None],
                w_down[None])
    return y.reshape(x.shape)
