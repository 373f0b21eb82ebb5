"""The int8-weight grouped matmul (pallas_kernels/gmm_int8.py) against its reference and a float64
oracle, in the Pallas interpreter (TPU and GPU variants), and through the ``pallas`` MoE backend.

Tolerances: float32 lhs within rtol 1e-5 / atol 1e-4 of the float64 oracle (sums of 128-256
products of unit-variance values and int8 scales ~ 1/127: like gmm's float32 bound); bf16 lhs
against the reference fed the same bf16 values, within float32 accumulation-order noise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import interpret_for
from jaxspec.models.quant import quantize
from pallas_kernels.gmm_int8 import gmm_int8
from pallas_kernels.gmm_reference import gmm_int8_reference

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _oracle(lhs, q, scale, sizes, offset=0) -> np.ndarray:
    lhs, w = np.asarray(lhs, np.float64), np.asarray(q, np.float64) * np.asarray(scale, np.float64)
    m = lhs.shape[0]
    bounds = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)
    out = np.zeros((m, w.shape[2]))
    for local in range(w.shape[0]):
        g = offset + local
        if g < len(sizes):
            out[bounds[g]:bounds[g + 1]] = lhs[bounds[g]:bounds[g + 1]] @ w[local]
    return out


def _data(m, k, n, g, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[1], (g, k, n), jnp.float32) * jnp.linspace(0.1, 2.0, n)  # per-column magnitudes
    qa = quantize(w, (1,), 8)
    return lhs, qa.q, qa.scale


@functools.cache
def _kernel(tiling, variant: str):
    fn = functools.partial(gmm_int8, tiling=tiling, interpret=interpret_for(variant), backend=variant)
    return jax.jit(fn, compiler_options=FAST_COMPILE)


LAYOUTS = [  # group sizes over 4 groups: ragged, an empty group, rows past the sum, one group
    [10, 0, 17, 13],
    [3, 25, 2, 5],
    [40, 0, 0, 0],
    [0, 0, 0, 0],
]


@pytest.mark.parametrize("variant,tiling", [("tpu", (8, 128, 128)), ("tpu", (16, 256, 128)), ("tpu", (40, 128, 128)),
                                            ("gpu", (16, 64, 64)), ("gpu", (32, 128, 128))])
def test_gmm_int8_matches_the_oracle_float32(variant, tiling):
    m, k, n, g = 40, 256, 128, 4
    lhs, q, scale = _data(m, k, n, g, jnp.float32)
    fn = _kernel(tiling, variant)
    for sizes in LAYOUTS:
        sizes = jnp.array(sizes, jnp.int32)
        got = np.asarray(fn(lhs, q, scale, sizes))
        np.testing.assert_allclose(got, _oracle(lhs, q, scale, np.asarray(sizes)), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got, gmm_int8_reference(lhs, q, scale, sizes), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_gmm_int8_bf16_lhs_and_expert_shard(variant):
    """bf16 activations (int8 values are exact in bf16), and a shard holding groups 2..3 of 4."""
    m, k, n = 40, 128, 256
    lhs, q, scale = _data(m, k, n, 2, jnp.bfloat16, seed=1)
    sizes = jnp.array([9, 11, 7, 13], jnp.int32)
    interpret = interpret_for(variant)
    got = gmm_int8(lhs, q, scale, sizes, 2, interpret=interpret, backend=variant, preferred_element_type=jnp.float32)
    want = gmm_int8_reference(lhs, q, scale, sizes, 2, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(got)[:20])  # rows of groups 0 and 1 (another shard's) are zeros
    out_bf16 = gmm_int8(lhs, q, scale, sizes, 2, interpret=interpret, backend=variant)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), np.asarray(want), rtol=2 ** -7, atol=1e-2)


def test_gmm_int8_refuses_other_formats():
    lhs, q, scale = _data(8, 128, 128, 2, jnp.float32)
    with pytest.raises(ValueError, match="int8"):
        gmm_int8(lhs, q.astype(jnp.float32), scale, jnp.array([4, 4]), interpret=True, backend="tpu")


def test_pallas_moe_backend_reads_int8_experts_through_the_kernel(monkeypatch):
    """dispatch_pallas sends int8 expert weights to gmm_int8 (never a dequantized copy) and matches
    the dense dispatch of the dequantized weights."""
    from jaxspec.models import moe_pallas
    from jaxspec.models.moe_dispatch import dispatch_dense
    from jaxspec.models.quant import dequantize

    calls = []
    real = moe_pallas.gmm_int8
    monkeypatch.setattr(moe_pallas, "gmm_int8", lambda *a, **kw: calls.append(a[1].dtype) or real(*a, **kw))
    e, d, f, n = 4, 128, 128, 12
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    x = jax.random.normal(keys[0], (n, d))
    ws = [quantize(jax.random.normal(keys[i + 1], s) * 0.1, (1,), 8) for i, s in enumerate(((e, d, f), (e, d, f), (e, f, d)))]
    ids = jax.random.randint(keys[4], (n, 2), 0, e)
    gates = jnp.full((n, 2), 0.5)
    got = moe_pallas.dispatch_pallas(x, ids, gates, *ws, interpret=True, backend="tpu")
    assert calls == [jnp.int8] * 3
    want = dispatch_dense(x, ids, gates, *(dequantize(w) for w in ws))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
