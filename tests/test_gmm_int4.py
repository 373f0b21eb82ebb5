"""The packed-int4 grouped matmul (pallas_kernels/gmm_int4.py): its reference against
``jaxspec.models.quant``'s format, the kernel against a float64 oracle in the Pallas interpreter
(TPU and GPU variants), and the ``pallas`` MoE backend sending int4 experts to it.

Tolerances: float32 lhs within rtol 1e-5 / atol 1e-4 of the float64 oracle (the TPU variant
rounds each dequantized weight to float32, the GPU one scales exact products: both ~1e-7 relative);
bf16 lhs: the TPU variant rounds the dequantized weights to bf16 (the activation dtype, as
``qeinsum`` does for int4), so within bf16 rounding of the float32 result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import interpret_for
from jaxspec.models.quant import dequantize, quantize
from pallas_kernels.gmm_int4 import gmm_int4, gmm_int4_reference, supports, unpack_reference
from test_kernel_aot import _compile, gpu_device, tpu_device  # noqa: F401  (the AOT test's fixtures)

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _oracle(lhs, w, sizes, offset=0) -> np.ndarray:
    lhs, w = np.asarray(lhs, np.float64), np.asarray(w, np.float64)
    m = lhs.shape[0]
    bounds = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)
    out = np.zeros((m, w.shape[2]))
    for local in range(w.shape[0]):
        g = offset + local
        if g < len(sizes):
            out[bounds[g]:bounds[g + 1]] = lhs[bounds[g]:bounds[g + 1]] @ w[local]
    return out


def _data(m, k, n, g, dtype, group_size=128, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    # Magnitudes vary along the contraction too, so a scale applied to the wrong group shows.
    w = jax.random.normal(keys[1], (g, k, n), jnp.float32) * jnp.linspace(0.1, 2.0, k)[:, None]
    qa = quantize(w, (1,), 4, group_size)
    return lhs, qa


def test_reference_unpacks_the_quant_module_format():
    """unpack_reference (the kernel file's own reading of the format) == quant.dequantize, and
    packed row i holds contraction entries 2i and 2i+1."""
    _, qa = _data(8, 256, 128, 3, jnp.float32, group_size=64)
    assert qa.q.shape == (3, 128, 128) and qa.scale.shape == (3, 4, 128)
    np.testing.assert_array_equal(np.asarray(unpack_reference(qa.q, qa.scale)), np.asarray(dequantize(qa)))
    w = jnp.zeros((1, 4, 128)).at[0, 1, 0].set(7.0)  # entry 1: the high nibble of packed row 0
    q = quantize(w, (1,), 4, 4).q
    assert int(q[0, 0, 0]) == 7 * 16 and not np.any(np.asarray(q)[0, 1])


@functools.cache
def _kernel(tiling, variant: str):
    fn = functools.partial(gmm_int4, tiling=tiling, interpret=interpret_for(variant), backend=variant)
    return jax.jit(fn, compiler_options=FAST_COMPILE)


LAYOUTS = [[10, 0, 17, 13], [3, 25, 2, 5], [40, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("variant,tiling,group_size,k", [
    ("tpu", (8, 512, 128), 128, 2048),  # 8 groups per k block, 2 k blocks
    ("tpu", (40, 128, 128), 64, 256),  # tk = the whole packed axis: 4 groups of 32 packed rows
    ("gpu", (16, 64, 64), 128, 256),
    ("gpu", (32, 32, 128), 64, 256),
])
def test_gmm_int4_matches_the_oracle_float32(variant, tiling, group_size, k):
    m, n, g = 40, 128, 4
    lhs, qa = _data(m, k, n, g, jnp.float32, group_size)
    w = dequantize(qa)
    fn = _kernel(tiling, variant)
    for sizes in LAYOUTS:
        sizes = jnp.array(sizes, jnp.int32)
        got = np.asarray(fn(lhs, qa.q, qa.scale, sizes))
        want = _oracle(lhs, w, np.asarray(sizes))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got, gmm_int4_reference(lhs, qa.q, qa.scale, sizes), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_gmm_int4_bf16_lhs_and_expert_shard(variant):
    """bf16 activations, a shard holding groups 2..3 of 4, default tiling."""
    m, k, n = 40, 256, 256
    lhs, qa = _data(m, k, n, 2, jnp.bfloat16, seed=1)
    sizes = jnp.array([9, 11, 7, 13], jnp.int32)
    got = gmm_int4(lhs, qa.q, qa.scale, sizes, 2, interpret=interpret_for(variant), backend=variant,
                   preferred_element_type=jnp.float32)
    want = gmm_int4_reference(lhs, qa.q, qa.scale, sizes, 2, preferred_element_type=jnp.float32)
    assert not np.any(np.asarray(got)[:20])  # rows of groups 0 and 1 (another shard's) are zeros
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2 ** -7, atol=scale * 2 ** -7)


def test_gmm_int4_refuses_bad_formats_and_tilings():
    lhs, qa = _data(8, 256, 128, 2, jnp.float32)
    with pytest.raises(ValueError, match="packed int8"):
        gmm_int4(lhs, qa.q.astype(jnp.float32), qa.scale, jnp.array([4, 4]), interpret=True, backend="tpu")
    with pytest.raises(ValueError, match="packed int8"):  # an unpacked [G, k, n] weight
        gmm_int4(lhs, jnp.zeros((2, 256, 128), jnp.int8), qa.scale, jnp.array([4, 4]), interpret=True, backend="tpu")
    with pytest.raises(ValueError, match="one scale group per k block"):
        gmm_int4(lhs, qa.q, qa.scale, jnp.array([4, 4]), tiling=(16, 32, 64), interpret=True, backend="gpu")
    # 1024-wide contraction in groups of 128: a 256-row k block holds 4 scale rows, not 8 (sublane tiling).
    lhs, qa = _data(8, 1024, 128, 2, jnp.float32)
    with pytest.raises(ValueError, match="neither a multiple of 8"):
        gmm_int4(lhs, qa.q, qa.scale, jnp.array([4, 4]), tiling=(8, 256, 128), interpret=True, backend="tpu")
    assert supports(8, 1024, 128, 128, 2, jnp.bfloat16, "tpu") and not supports(8, 1024, 128, 8, 2, jnp.bfloat16, "gpu")


# ------------------------------------------------------------------- ahead-of-time compiles
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_gmm_int4_compiles_for_real_shapes(variant, request):
    """The real compilers (Mosaic for TPU v5e, Triton + ptxas for H100) accept gmm_int4 at
    Mixtral-8x7B's expert up and down projections (groups of 128) and the ``pallas`` MoE layer of
    Qwen3-30B-A3B with int4 experts (three gmm_int4 calls; the 768-wide down contraction is one
    k block of 6 groups on TPU)."""
    from jaxspec.models.moe_pallas import dispatch_pallas
    from jaxspec.models.quant import QArray

    device = request.getfixturevalue(f"{variant}_device")
    bf16, i8, f32, i32 = jnp.bfloat16, jnp.int8, jnp.float32, jnp.int32
    fn = functools.partial(gmm_int4, backend=variant, interpret=False)
    _compile(fn, device, ((512, 4096), bf16), ((8, 2048, 14336), i8), ((8, 32, 14336), f32), ((8,), i32))
    _compile(fn, device, ((512, 14336), bf16), ((8, 7168, 4096), i8), ((8, 112, 4096), f32), ((8,), i32))

    calls = []

    def layer(x, ids, w, gq, gs, uq, us, dq, ds):
        qa = lambda q, s: QArray(q, s, 4, -2)  # noqa: E731
        return dispatch_pallas(x, ids, w, qa(gq, gs), qa(uq, us), qa(dq, ds), backend=variant, interpret=False)

    import jaxspec.models.moe_pallas as moe_pallas

    real = moe_pallas.gmm_int4
    moe_pallas.gmm_int4 = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        e, d, f = 128, 2048, 768
        _compile(layer, device, ((64, d), bf16), ((64, 8), i32), ((64, 8), f32), ((e, d // 2, f), i8),
                 ((e, d // 128, f), f32), ((e, d // 2, f), i8), ((e, d // 128, f), f32), ((e, f // 2, d), i8),
                 ((e, f // 128, d), f32))
    finally:
        moe_pallas.gmm_int4 = real
    assert len(calls) == 3  # all three projections went through the kernel, none through a fallback
