"""MoE expert dispatch through the Pallas grouped matmul: the ``pallas`` backend of ``moe_dispatch``.

The model-side adapter of ``pallas_kernels.gmm`` (the kernels know nothing of
jaxspec; this module registers them here). Importing it registers the backend;
``moe_dispatch.choose_backend`` imports it on first use of ``pallas`` (or of
``auto`` on an accelerator), so importing jaxspec loads no Pallas code.

The computation is the one of ``dispatch_ragged``: assignments sorted by expert
(stable, so ties keep token order), rows gathered, three grouped matmuls for the
SwiGLU expert FFN, and a weighted scatter-add back to tokens. It is dropless: a
token's output never depends on the rest of the batch.

Quantized experts stay quantized in HBM: int8 through ``gmm_int8``, int4 through ``gmm_int4``
(both dequantize blocks in the kernel). An int4 shape the kernel has no tiling for (a scale group
narrower than the kernel's tiles) goes through ``qragged_dot``, which dequantizes chunk by chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.models.moe_dispatch import sort_assignments, register_backend
from jaxspec.models.quant import QArray, qragged_dot
from pallas_kernels._common import default_interpret, resolve_backend
from pallas_kernels.gmm import Tiling, gmm
from pallas_kernels.gmm_int4 import gmm_int4, supports as gmm_int4_supports
from pallas_kernels.gmm_int8 import gmm_int8


def dispatch_pallas(
    x: jax.Array,  # [N, D]
    expert_ids: jax.Array,  # [N, k] int32
    weights: jax.Array,  # [N, k] combine weights
    w_gate: jax.Array,  # [E, D, F]
    w_up: jax.Array,  # [E, D, F]
    w_down: jax.Array,  # [E, F, D]
    *,
    interpret: bool | None = None,
    backend: str = "auto",
    tiling: Tiling | None = None,
    down_tiling: Tiling | None = None,
) -> jax.Array:
    """sum_k weights[n, k] * FFN_{expert_ids[n, k]}(x[n]) -> [N, D] (x's dtype).

    ``interpret=None`` runs the kernels in the Pallas interpreter where no
    accelerator is present (CPU), so the backend works everywhere. ``backend``
    is the kernel variant (``"auto"`` | ``"tpu"`` | ``"gpu"``).
    """
    if interpret is None:
        interpret = default_interpret()
    n = expert_ids.shape[0]
    num_experts = w_gate.shape[0]
    order, token_of, sorted_e, group_sizes = sort_assignments(expert_ids, num_experts)
    xs = x[token_of]  # [N*k, D], rows grouped by expert
    variant = resolve_backend(backend, interpret)

    def mm(lhs, w, tile):
        if not isinstance(w, QArray):
            return gmm(lhs, w, group_sizes, tiling=tile, interpret=interpret, backend=backend)
        if w.bits == 8:
            return gmm_int8(lhs, w.q, w.scale, group_sizes, tiling=tile, interpret=interpret, backend=backend)
        # int4: ``tiling`` is gmm's (tk in unpacked entries), so the int4 kernel picks its own.
        m, k = lhs.shape
        group = k // w.scale.shape[1]
        if w.axis % w.q.ndim == 1 and gmm_int4_supports(m, k, w.shape[2], group, num_experts, lhs.dtype, variant):
            return gmm_int4(lhs, w.q, w.scale, group_sizes, interpret=interpret, backend=backend)
        return qragged_dot(lhs, w, group_sizes, sorted_e)

    h = jax.nn.silu(mm(xs, w_gate, tiling)) * mm(xs, w_up, tiling)
    y = mm(h.astype(x.dtype), w_down, down_tiling).astype(jnp.float32)
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token_of].add(y).astype(x.dtype)


register_backend("pallas", dispatch_pallas)
