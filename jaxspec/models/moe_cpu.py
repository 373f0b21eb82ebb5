"""MoE expert dispatch through the CPU kernel ``cpu_kernels.moe_ffn``: the ``cpu_fused`` backend of ``moe_dispatch``.

One XLA FFI call per layer computes every routed (row, expert) pair, reading each chosen expert's
weights once, in place, over XLA's intra-op threads; experts no row chose are never read. It is
dropless and a row's output does not depend on the rest of the batch, like every backend here.
Float32 experts on the CPU only (the kernel is C++ built for the host on first use); importing
this module where it cannot be built raises ImportError, so ``load_backend`` finds it unavailable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpu_kernels import moe_ffn
from jaxspec.models.moe_dispatch import register_backend
from jaxspec.models.quant import QArray

_reason = moe_ffn.unavailable_reason()
if _reason is not None:
    raise ImportError(f"the cpu_fused MoE backend is unavailable here: {_reason}")


def supports(dtype, quantized: bool = False) -> bool:
    """Whether ``cpu_fused`` takes experts of this dtype (float32, not quantized)."""
    return not quantized and jnp.dtype(dtype) == jnp.float32


def dispatch_cpu_fused(x, expert_ids, weights, w_gate, w_up, w_down) -> jax.Array:
    """sum_k weights[n, k] * FFN_{expert_ids[n, k]}(x[n]) -> [N, D] (x's dtype)."""
    if any(isinstance(w, QArray) for w in (w_gate, w_up, w_down)):
        raise ValueError("the cpu_fused MoE backend takes float32 experts, not quantized ones")
    y = moe_ffn.moe_ffn(x.astype(jnp.float32), expert_ids, weights, w_gate, w_up, w_down)
    return y.astype(x.dtype)


register_backend("cpu_fused", dispatch_cpu_fused)
