"""MoE expert dispatch through the Pallas grouped matmul: the ``pallas`` backend of ``moe_dispatch``.

The model-side adapter of ``pallas_kernels.gmm`` (the kernels know nothing of
jaxspec; this module registers them here). Importing it registers the backend;
``moe_dispatch.choose_backend`` imports it on first use of ``pallas`` (or of
``auto`` on an accelerator), so importing jaxspec loads no Pallas code.

The computation is the one of ``dispatch_ragged``: assignments sorted by expert
(stable, so ties keep token order), rows gathered, three grouped matmuls for the
SwiGLU expert FFN, and a weighted scatter-add back to tokens. It is dropless: a
token's output never depends on the rest of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspec.models.moe_dispatch import sort_assignments, register_backend
from jaxspec.models.quant import QArray, as_float
from pallas_kernels._common import default_interpret
from pallas_kernels.gmm import Tiling, gmm
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
    order, token_of, _, group_sizes = sort_assignments(expert_ids, w_gate.shape[0])
    xs = x[token_of]  # [N*k, D], rows grouped by expert

    def mm(lhs, w, tile):
        if isinstance(w, QArray) and w.bits == 8:
            # int8 experts stay int8 in HBM: the kernel widens each block and scales the product.
            return gmm_int8(lhs, w.q, w.scale, group_sizes, tiling=tile, interpret=interpret, backend=backend)
        return gmm(lhs, as_float(w, lhs.dtype), group_sizes, tiling=tile, interpret=interpret, backend=backend)

    h = jax.nn.silu(mm(xs, w_gate, tiling)) * mm(xs, w_up, tiling)
    y = mm(h.astype(x.dtype), w_down, down_tiling).astype(jnp.float32)
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token_of].add(y).astype(x.dtype)


register_backend("pallas", dispatch_pallas)
