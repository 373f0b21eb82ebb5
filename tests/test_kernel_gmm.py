"""Grouped-matmul Pallas kernels (pallas_kernels/gmm.py) against a per-group numpy oracle, in interpret mode.

Both kernel variants run in the Pallas interpreter on CPU: "tpu" (Mosaic; what
backend="auto" runs on CPU) over the full shape matrix, "gpu" (Triton) over a
subset. Group sizes are runtime values, so each (shape, variant) compiles once and
is then checked against many group layouts. Tolerances: float32 outputs within
rtol 1e-5 / atol 1e-4 of a float64 oracle (sums of 64-256 unit-variance
products); bf16 inputs with a float32 output within the same bound (which only
float32 accumulation meets); bf16 outputs within one bf16 rounding (rtol 2^-7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import gmm as gmm_mod
from pallas_kernels.gmm import gmm, tgmm
from pallas_kernels.gmm_reference import gmm_reference, tgmm_reference
from helpers import interpret_for

F32_TOL = dict(rtol=1e-5, atol=1e-4)

# The Pallas interpreter turns each kernel into a large XLA:CPU program whose compile dominates these
# tests; LLVM optimisation buys nothing at these sizes, so executed functions compile without it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# --------------------------------------------------------------------------- oracle + data
def group_bounds(sizes: np.ndarray, m: int) -> np.ndarray:
    return np.minimum(np.concatenate([[0], np.cumsum(sizes)]), m)


def np_gmm(lhs, rhs, sizes, offset: int = 0, transpose_rhs: bool = False) -> np.ndarray:
    """float64 per-group loop: out[s_g:e_g] = lhs[s_g:e_g] @ rhs[g - offset]; every other row zero."""
    lhs = np.asarray(lhs, np.float64)
    rhs = np.asarray(rhs, np.float64)
    if transpose_rhs:
        rhs = rhs.transpose(0, 2, 1)
    m = lhs.shape[0]
    out = np.zeros((m, rhs.shape[2]))
    bounds = group_bounds(np.asarray(sizes), m)
    for local in range(rhs.shape[0]):
        g = offset + local
        if g < len(sizes):
            s, e = bounds[g], bounds[g + 1]
            out[s:e] = lhs[s:e] @ rhs[local]
    return out


def np_tgmm(lhs, rhs, sizes, num_groups: int, offset: int = 0) -> np.ndarray:
    lhs = np.asarray(lhs, np.float64)
    rhs = np.asarray(rhs, np.float64)
    out = np.zeros((num_groups, lhs.shape[1], rhs.shape[1]))
    bounds = group_bounds(np.asarray(sizes), lhs.shape[0])
    for local in range(num_groups):
        g = offset + local
        if g < len(sizes):
            s, e = bounds[g], bounds[g + 1]
            out[local] = lhs[s:e].T @ rhs[s:e]
    return out


def layouts(m: int, groups: int, seed: int) -> list[np.ndarray]:
    """Group-size vectors covering the interesting cases for an (m, groups) problem."""
    rng = np.random.default_rng(seed)
    out = [rng.multinomial(m, np.ones(groups) / groups)]  # ragged, sums to m
    one = np.zeros(groups, np.int64)
    one[groups // 2] = m
    out.append(one)  # every row in one group
    out.append(np.zeros(groups, np.int64))  # every group empty: all rows are padding
    tiny = np.zeros(groups, np.int64)
    tiny[0] = min(1, m)
    if groups > 1:
        tiny[1] = max(m - 2, 0)
        tiny[-1] = m - tiny[0] - tiny[1]
    else:
        tiny[0] = m
    out.append(tiny)  # groups of one row beside a large one
    out.append(rng.multinomial(m // 2, np.ones(groups) / groups))  # sum < m: padding rows at the end
    odd = np.zeros(groups, np.int64)
    left = m
    for g, size in enumerate([3, 5, 13, 9, 17, 1, 30]):  # boundaries off every power-of-two tile edge
        if g < groups:
            odd[g] = min(size, left)
            left -= odd[g]
    out.append(odd)
    return [x.astype(np.int32) for x in out]


def operands(m, k, n, groups, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((groups, k, n)), dtype)
    return lhs, rhs


@functools.lru_cache(maxsize=None)
def jitted_gmm(backend: str, tiling=None, preferred_element_type=None, transpose_rhs=False):
    return jit(
        functools.partial(
            gmm, interpret=interpret_for(backend), backend=backend, tiling=tiling, preferred_element_type=preferred_element_type,
            transpose_rhs=transpose_rhs,
        )
    )


@functools.lru_cache(maxsize=None)
def jitted_tgmm(backend: str, num_groups: int):
    return jit(functools.partial(tgmm, interpret=interpret_for(backend), backend=backend, num_groups=num_groups))


# ------------------------------------------------------------------------------ forward
# Every m in {1, 7, 128, 130, 512} and every group count in {1, 4, 8, 32} appears, on the TPU
# variant, with six group layouts each; the GPU variant gets a subset.
TPU_CASES = [(1, 1), (1, 8), (7, 4), (7, 32), (128, 1), (128, 8), (130, 4), (130, 32), (512, 8), (512, 32)]
GPU_CASES = [(7, 4), (130, 8), (512, 32)]


@pytest.mark.parametrize(
    "backend,m,groups", [("tpu", *c) for c in TPU_CASES] + [("gpu", *c) for c in GPU_CASES]
)
def test_gmm_matches_per_group_oracle(backend, m, groups):
    k, n = 64, 128
    lhs, rhs = operands(m, k, n, groups, seed=m * 100 + groups)
    f = jitted_gmm(backend)
    for sizes in layouts(m, groups, seed=m + groups):
        out = np.asarray(f(lhs, rhs, sizes))
        expected = np_gmm(lhs, rhs, sizes)
        np.testing.assert_allclose(out, expected, **F32_TOL, err_msg=f"sizes={sizes.tolist()}")
        total = min(int(sizes.sum()), m)
        assert not np.any(out[total:]), "rows past sum(group_sizes) must be exact zeros"


@pytest.mark.parametrize(
    "backend,tiling,k,n",
    [
        ("tpu", (16, 128, 256), 256, 384),  # 2 k tiles, a partial last n tile, many row tiles
        ("gpu", (16, 32, 64), 100, 72),  # k and n not multiples of their (power-of-two) tiles
    ],
)
def test_gmm_multi_tile_grids(backend, tiling, k, n):
    m, groups = 130, 5
    lhs, rhs = operands(m, k, n, groups, seed=3)
    f = jitted_gmm(backend, tiling)
    for sizes in layouts(m, groups, seed=11)[:4]:
        np.testing.assert_allclose(np.asarray(f(lhs, rhs, sizes)), np_gmm(lhs, rhs, sizes), **F32_TOL)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_transposed_rhs(backend):
    m, k, n, groups = 130, 64, 128, 4
    lhs, _ = operands(m, k, n, groups)
    rhs_t = jnp.asarray(np.random.default_rng(5).standard_normal((groups, n, k)), jnp.float32)  # [G, n, k]
    sizes = np.array([40, 0, 77, 10], np.int32)
    out = jitted_gmm(backend, transpose_rhs=True)(lhs, rhs_t, sizes)
    np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs_t, sizes, transpose_rhs=True), **F32_TOL)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_garbage_in_padding_rows_never_leaks(backend):
    """NaN/inf in rows no group owns: those rows come back as exact zeros and nothing else changes."""
    m, k, n, groups = 130, 64, 128, 4
    lhs, rhs = operands(m, k, n, groups, seed=9)
    sizes = np.array([20, 0, 33, 40], np.int32)  # 93 rows used, 37 padding rows
    dirty = lhs.at[93:].set(jnp.nan).at[100].set(jnp.inf)
    out = np.asarray(jitted_gmm(backend)(dirty, rhs, sizes))
    assert np.all(out[93:] == 0.0)
    np.testing.assert_allclose(out[:93], np_gmm(lhs, rhs, sizes)[:93], **F32_TOL)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bf16_accumulates_in_float32(backend):
    m, k, n, groups = 130, 256, 128, 8
    lhs, rhs = operands(m, k, n, groups, dtype=jnp.bfloat16, seed=4)
    sizes = layouts(m, groups, seed=1)[0]
    expected = np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)  # exact products of bf16 values
    out32 = jitted_gmm(backend, None, "float32")(lhs, rhs, sizes)
    assert out32.dtype == jnp.float32
    # bf16 accumulation over k=256 would be off by ~1e-2 relative; only f32 accumulation meets this.
    np.testing.assert_allclose(np.asarray(out32), expected, **F32_TOL)
    if backend == "gpu":  # the bf16 output path is the same cast in both variants: check it once
        return
    out16 = jitted_gmm(backend)(lhs, rhs, sizes)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16.astype(jnp.float32)), expected, rtol=2**-7, atol=2**-7 * 4)


# --------------------------------------------------------------------------- expert shards
def test_group_offset_shards_sum_to_full_result():
    m, k, n, groups = 130, 64, 128, 8
    lhs, rhs = operands(m, k, n, groups, seed=6)
    f = jitted_gmm("tpu")
    for sizes in layouts(m, groups, seed=2)[:5]:
        full = np.asarray(f(lhs, rhs, sizes))
        for shards in (2,):
            per = groups // shards
            # The offset is a traced value (as under shard_map with lax.axis_index): one compile per shard size.
            parts = [np.asarray(f(lhs, rhs[s * per:(s + 1) * per], sizes, group_offset=jnp.int32(s * per)))
                     for s in range(shards)]
            for s, part in enumerate(parts):
                np.testing.assert_allclose(part, np_gmm(lhs, rhs[s * per:(s + 1) * per], sizes, s * per), **F32_TOL)
            # Each row is owned by exactly one shard and the others give exact zeros: the sum is exact
            # where one group's product is computed the same way in both calls (the CPU interpreter; a
            # GPU's matmul may pick another reduction order for the smaller operand).
            if jax.default_backend() == "cpu":
                np.testing.assert_array_equal(sum(parts), full)
            else:
                np.testing.assert_allclose(sum(parts), full, **F32_TOL)


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 24), min_size=8, max_size=8),
    offset=st.integers(0, 7),
    backend=st.sampled_from(["tpu", "gpu"]),
)
def test_property_random_layouts_and_shards(sizes, offset, backend):
    """Any sizes (their sum may exceed m: rows past m are ignored) and any shard offset, even past the last group."""
    m, k, n = 64, 64, 128
    lhs, rhs = operands(m, k, n, 4, seed=12)
    sizes = np.asarray(sizes, np.int32)
    out = jitted_gmm(backend)(lhs, rhs, sizes, group_offset=jnp.int32(offset))
    np.testing.assert_allclose(np.asarray(out), np_gmm(lhs, rhs, sizes, offset), **F32_TOL)


def test_reference_matches_oracle_with_offsets():
    m, k, n = 64, 64, 128
    lhs, rhs = operands(m, k, n, 4, seed=12)
    ref = jit(gmm_reference)
    cases = [([10, 0, 30, 5, 60, 0, 0, 1], 0), ([10, 0, 30, 5, 60, 0, 0, 1], 3), ([0] * 8, 6), ([64] + [0] * 7, 6)]
    for sizes, offset in cases:
        sizes = np.asarray(sizes, np.int32)
        np.testing.assert_allclose(np.asarray(ref(lhs, rhs, sizes, offset)), np_gmm(lhs, rhs, sizes, offset), **F32_TOL)


# -------------------------------------------------------------------------- tgmm + grads
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_tgmm_writes_zeros_for_empty_groups(backend):
    m, k, n, groups = 130, 64, 128, 8
    rng = np.random.default_rng(8)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    dout = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    sizes = np.array([0, 17, 0, 0, 50, 1, 0, 40], np.int32)  # sum 108 < m
    out = np.asarray(jitted_tgmm(backend, groups)(lhs, dout, sizes))
    np.testing.assert_allclose(out, np_tgmm(lhs, dout, sizes, groups), **F32_TOL)
    assert np.all(out[sizes == 0] == 0.0)
    np.testing.assert_allclose(
        np.asarray(tgmm_reference(lhs, dout, sizes, num_groups=groups)), np_tgmm(lhs, dout, sizes, groups), **F32_TOL
    )


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_gradients_match_vjp_of_reference(backend):
    """VJP of a shard holding groups 1..3 of 4: group 0's rows live elsewhere, group 1 is empty, 13 padding rows."""
    m, k, n = 130, 64, 128
    lhs, rhs = operands(m, k, n, 3, seed=10)
    sizes = jnp.asarray([50, 0, 7, 60], jnp.int32)
    offset = 1
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)

    @jit
    def kernel_vjp(lhs, rhs, cot):
        fn = lambda a, b: gmm(a, b, sizes, group_offset=offset, interpret=interpret_for(backend), backend=backend)  # noqa: E731
        out, pullback = jax.vjp(fn, lhs, rhs)
        return (out, *pullback(cot))

    out, d_lhs, d_rhs = kernel_vjp(lhs, rhs, cot)
    ref_out, ref_pullback = jax.vjp(lambda a, b: gmm_reference(a, b, sizes, offset), lhs, rhs)
    ref_lhs, ref_rhs = ref_pullback(cot)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **F32_TOL)
    np.testing.assert_allclose(np.asarray(d_lhs), np.asarray(ref_lhs), **F32_TOL)
    np.testing.assert_allclose(np.asarray(d_rhs), np.asarray(ref_rhs), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(d_rhs), np_tgmm(lhs, cot, np.asarray(sizes), 3, offset), rtol=1e-5, atol=1e-3)
    assert np.all(np.asarray(d_rhs[0]) == 0.0), "the empty group's weight gradient must be exactly zero"
    assert np.all(np.asarray(d_lhs[:50]) == 0.0), "rows of another shard's group get no gradient here"
    assert np.all(np.asarray(d_lhs[117:]) == 0.0), "padding rows get no gradient"


# ------------------------------------------------------------------------ tiling checks
def test_tiling_chosen_by_shape_is_legal():
    for m, k, n, g in [(1, 4096, 14336, 8), (512, 2048, 768, 128), (16384, 4096, 14336, 8), (7, 64, 64, 4)]:
        for backend in ("tpu", "gpu"):
            tiling = gmm_mod.choose_tiling(m, k, n, g, jnp.bfloat16, backend)
            gmm_mod.validate_tiling(tiling, m, k, n, backend)
    # Decode with many experts gets short row tiles; prefill gets tall ones.
    assert gmm_mod.choose_tiling(512, 2048, 768, 128, jnp.bfloat16, "tpu")[0] == 16
    assert gmm_mod.choose_tiling(16384, 4096, 14336, 8, jnp.bfloat16, "tpu") == (512, 512, 512)


def test_illegal_tpu_tiling_is_rejected_with_block_shape():
    lhs, rhs = operands(256, 1024, 256, 4)
    sizes = jnp.asarray([64, 64, 64, 64], jnp.int32)
    with pytest.raises(ValueError, match=r"lhs block \(128, 100\).*multiple of 128"):
        gmm(lhs, rhs, sizes, tiling=(128, 100, 128), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"tm=12 is neither a multiple of 8"):
        gmm(lhs, rhs, sizes, tiling=(12, 128, 128), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"tk=384 does not divide"):
        gmm(lhs, rhs, sizes, tiling=(128, 384, 128), backend="tpu", interpret=True)


def test_mosaic_lowering_itself_rejects_the_illegal_block():
    """Bypassing our validation, Pallas' Mosaic lowering refuses the same (128, 100) block."""
    lhs = jax.ShapeDtypeStruct((256, 1000), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((4, 1000, 256), jnp.bfloat16)
    cfg = gmm_mod._Config(tiling=None, backend="tpu", interpret=False, out_dtype=None, transpose_rhs=False)

    def call(lhs, rhs):
        starts = jnp.asarray([0, 64, 128, 192], jnp.int32)
        return gmm_mod._gmm_tpu(lhs, rhs, starts, starts + 64, cfg, (128, 100, 128), jnp.bfloat16)

    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        jax.jit(call).trace(lhs, rhs).lower(lowering_platforms=("tpu",))


def test_illegal_gpu_tiling_is_rejected():
    lhs, rhs = operands(64, 64, 128, 2)
    with pytest.raises(ValueError, match=r"powers of two >= 16.*tk=48"):
        gmm(lhs, rhs, jnp.asarray([32, 32], jnp.int32), tiling=(16, 48, 64), backend="gpu", interpret=True)


def test_auto_backend_on_cpu_requires_interpret():
    lhs, rhs = operands(8, 64, 128, 2)
    sizes = jnp.asarray([4, 4], jnp.int32)
    if jax.default_backend() != "cpu":  # compiled on an accelerator (tools/device_check.py): it runs
        np.testing.assert_allclose(np.asarray(gmm(lhs, rhs, sizes)), np_gmm(lhs, rhs, sizes), **F32_TOL)
        return
    with pytest.raises(ValueError, match="interpret=True"):
        gmm(lhs, rhs, sizes)


# ------------------------------------------------------------------------------ lowering
@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_for_accelerators(backend, platform, marker, dtype):
    """Mixtral-like expert FFN shapes lower (forward gmm, backward gmm + tgmm) for TPU and CUDA."""
    args = (
        jax.ShapeDtypeStruct((512, 1024), dtype),
        jax.ShapeDtypeStruct((8, 1024, 768), dtype),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )

    def loss(lhs, rhs, sizes):
        return jnp.sum(gmm(lhs, rhs, sizes, backend=backend, preferred_element_type=jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,))
    assert lowered.as_text().count(marker) >= 3  # forward, d lhs, d rhs kernels


# ------------------------------------------------------------------------- MoE backend
def test_auto_picks_xla_until_pallas_is_validated_on_the_platform(monkeypatch):
    from jaxspec import kernels
    from jaxspec.models import moe_dispatch as md
    from jaxspec.models.moe_dispatch import BACKENDS, choose_backend

    monkeypatch.delenv(kernels.TRUST_ENV, raising=False)
    assert choose_backend("auto", 64, platform="tpu") == "ragged"  # not run on a TPU yet
    assert choose_backend("auto", 64, platform="cpu") in ("per_expert", "sorted")
    assert choose_backend("pallas", 64) == "pallas" and "pallas" in BACKENDS  # opt-in
    # Validated on a GPU: the kernel for steps routing >= GPU_PALLAS_MIN_ROWS rows, ragged_dot below.
    rows = md.GPU_PALLAS_MIN_ROWS
    assert choose_backend("auto", rows, platform="gpu") == "pallas"
    assert choose_backend("auto", rows // 2 - 1, platform="cuda", top_k=2) == "ragged"
    assert choose_backend("auto", rows // 2, platform="cuda", top_k=2) == "pallas"
    monkeypatch.setitem(kernels.VALIDATED, "gmm", frozenset())
    assert choose_backend("auto", 4 * rows, platform="cuda") == "ragged"
    monkeypatch.setitem(kernels.VALIDATED, "gmm", frozenset({"tpu"}))
    assert choose_backend("auto", 64, platform="tpu") == "pallas"  # no measured threshold there
    assert choose_backend("auto", 4 * rows, platform="cuda") == "ragged"
    monkeypatch.setenv(kernels.TRUST_ENV, "gmm:gpu")
    assert choose_backend("auto", 4 * rows, platform="cuda") == "pallas"
    assert choose_backend("auto", 64, platform="cpu") in ("per_expert", "sorted")


def test_pallas_dispatch_matches_dense_dispatch():
    from jaxspec.models.moe_dispatch import dispatch_dense
    from jaxspec.models.moe_pallas import dispatch_pallas

    rng = np.random.default_rng(0)
    n, d, f, e, top = 37, 64, 128, 8, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.1, jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.standard_normal((e, f, d)) * 0.1, jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, top, replace=False) for _ in range(n)]), jnp.int32)
    ids = ids.at[:10].set(jnp.asarray([3, 5], jnp.int32))  # an overloaded expert; others empty
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, top)), jnp.float32), axis=-1)
    out = jit(dispatch_pallas)(x, ids, weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(dispatch_dense(x, ids, weights, w_gate, w_up, w_down)), rtol=1e-5, atol=1e-5
    )


def test_model_with_pallas_moe_matches_dense():
    """tiny-moe end to end: logits within 1e-5 of the dense dispatch, identical greedy continuation."""
    from flax import nnx

    from helpers import scaled_model
    from jaxspec.models import KVCache

    def runner(backend):
        model = scaled_model("tiny-moe", seed=3, moe_backend=backend)
        graphdef, state = nnx.split(model)

        @jit
        def logits(state, tokens):
            cache = KVCache.create(model.cfg, 1, tokens.shape[1])
            return nnx.merge(graphdef, state)(tokens, jnp.zeros((1,), jnp.int32), cache).logits[0]

        return lambda toks: np.asarray(logits(state, toks))

    dense, pallas = runner("dense"), runner("pallas")
    tokens = np.zeros((1, 16), np.int32)
    prompt = [5, 17, 99, 3, 250, 42]
    tokens[0, : len(prompt)] = prompt
    np.testing.assert_allclose(pallas(jnp.asarray(tokens)), dense(jnp.asarray(tokens)), rtol=1e-5, atol=1e-5)
    # Greedy decoding by re-running the fixed-length padded forward (causal: padding is invisible).
    generated = {}
    for name, fn in (("dense", dense), ("pallas", pallas)):
        toks, length = tokens.copy(), len(prompt)
        for _ in range(4):
            toks[0, length] = int(np.argmax(fn(jnp.asarray(toks))[length - 1]))
            length += 1
        generated[name] = toks[0, len(prompt):length].tolist()
    assert generated["pallas"] == generated["dense"]
