"""The CPU dense products (cpu_kernels/dense_matmul.cc; ``jaxspec.models.dense_cpu``, matmul backend
"cpu") against their references, in a model's forward, and where ``make_runner`` takes them.

Outputs are float32 sums of up to a few hundred products: within rtol/atol 1e-5 of the reference at
HIGHEST precision. A row's result must not depend on the other rows of the call (bitwise), which the
engine's exactness between decode and verification steps relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import dense_matmul as kernel_module
from cpu_kernels.dense_matmul_reference import dense_matmul_reference
from helpers import require_cpu_kernel, scaled_model
from jaxspec.models import dense_cpu
from jaxspec.models.quant import qeinsum

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _built():
    require_cpu_kernel(kernel_module)


matmul = jax.jit(kernel_module.dense_matmul)


def _array(r, *shape, scale=1.0):
    return jnp.asarray(r.normal(size=shape) * scale, jnp.float32)


# Widths of whole 64-column blocks and ones ending in a partial block (100, 70, 16), row counts
# that fill the 6-row register blocks and ones that do not (1, 5, 8, 13).
@pytest.mark.parametrize("n,d,f", [(1, 64, 128), (5, 96, 100), (8, 70, 192), (13, 128, 16), (6, 33, 320)])
def test_matches_the_reference(n, d, f):
    r = np.random.default_rng(n * f)
    x, w = _array(r, n, d), _array(r, d, f, scale=d ** -0.5)
    np.testing.assert_allclose(matmul(x, w), dense_matmul_reference(x, w), **TOL)


def test_a_row_gets_the_same_bits_alone_and_in_any_batch():
    r = np.random.default_rng(3)
    x, w = _array(r, 11, 96), _array(r, 96, 200, scale=0.1)
    full = np.asarray(matmul(x, w))
    for i in range(11):
        np.testing.assert_array_equal(np.asarray(matmul(x[i:i + 1], w))[0], full[i])
    order = np.random.default_rng(4).permutation(11)
    np.testing.assert_array_equal(np.asarray(matmul(x[order], w)), full[order])


@pytest.mark.parametrize("n,d,f", [(1, 64, 4096), (2, 70, 100), (9, 35, 33), (17, 16, 17)])
def test_the_transposed_product_is_the_product_by_the_transpose_bit_for_bit(n, d, f):
    r = np.random.default_rng(n + f)
    x, w = _array(r, n, d), _array(r, f, d, scale=d ** -0.5)  # w [F, D]: a tied embedding's layout
    got = jax.jit(kernel_module.dense_matmul_nt)(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(matmul(x, w.T)))
    np.testing.assert_allclose(got, dense_matmul_reference(x, w.T), **TOL)
    tied = jax.jit(dense_cpu.head_tied, static_argnums=2)
    np.testing.assert_array_equal(np.asarray(tied(x[None], w, "cpu"))[0], np.asarray(got))
    np.testing.assert_allclose(tied(x[None], w, "xla")[0], got, **TOL)


def test_bad_input_is_refused_by_name():
    x, w = jnp.ones((2, 8), jnp.float32), jnp.ones((8, 4), jnp.float32)
    with pytest.raises(TypeError, match="float32 arrays; w is bfloat16"):
        kernel_module.dense_matmul(x, w.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"x \[N, D\] and w \[D, F\]"):
        kernel_module.dense_matmul(x, jnp.ones((7, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"x \[N, D\] and w \[F, D\]"):
        kernel_module.dense_matmul_nt(x, jnp.ones((4, 7), jnp.float32))


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("btd,dhk->bthk", (2, 3, 16), (16, 4, 8)),  # q/k/v projections
    ("bthk,hkd->btd", (2, 3, 4, 8), (4, 8, 16)),  # the attention output
    ("...d,df->...f", (5, 16), (16, 24)),  # an MLP's gate and up, any leading axes
    ("btd,dv->btv", (1, 5, 16), (16, 40)),  # the output head
])
def test_project_takes_the_models_projection_specs(spec, x_shape, w_shape):
    r = np.random.default_rng(len(x_shape))
    x, w = _array(r, *x_shape), _array(r, *w_shape, scale=0.25)
    want = jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST)
    got = jax.jit(dense_cpu.project, static_argnums=(0, 3))(spec, x, w, "cpu")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, **TOL)
    assert "jaxspec_dense_matmul" in jax.jit(dense_cpu.project, static_argnums=(0, 3)).lower(spec, x, w, "cpu").as_text()


def test_project_leaves_to_xla_what_the_kernel_does_not_take():
    r = np.random.default_rng(0)
    hlo = lambda spec, x, w: jax.jit(dense_cpu.project, static_argnums=(0, 3)).lower(spec, x, w, "cpu").as_text()  # noqa: E731
    w = _array(r, 16, 24)
    assert "jaxspec_dense_matmul" not in hlo("nd,df->nf", _array(r, dense_cpu.MAX_ROWS + 1, 16), w)  # a prefill's rows
    assert "jaxspec_dense_matmul" not in hlo("nd,df->nf", _array(r, 4, 16).astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "jaxspec_dense_matmul" not in hlo("nd,fd->nf", _array(r, 4, 16), w.T)  # w contracted last
    assert "jaxspec_dense_matmul" in hlo("nd,df->nf", _array(r, dense_cpu.MAX_ROWS, 16), w)
    assert dense_cpu.split_spec("nd,fd->nf", 2) is None
    assert dense_cpu.split_spec("bthk,hkd->btd", 4) == ("bt", "hk", "d")
    assert dense_cpu.split_spec("...d,df->...f", 3) == ("AB", "d", "f")
    with pytest.raises(ValueError, match="unknown matmul backend 'gpu'"):
        dense_cpu.project("nd,df->nf", w, w, "gpu")


def test_project_of_quantized_weights_is_qeinsum():
    from jaxspec.models.quant import quantize

    r = np.random.default_rng(1)
    x, w = _array(r, 3, 64), quantize(_array(r, 64, 32, scale=0.1), (0,), 8)
    np.testing.assert_array_equal(dense_cpu.project("nd,df->nf", x, w, "cpu"), qeinsum("nd,df->nf", x, w))


def test_dense_ffn_is_the_swiglu_mlp():
    r = np.random.default_rng(2)
    x = _array(r, 2, 3, 32)
    wg, wu, wd = _array(r, 32, 48, scale=0.2), _array(r, 32, 48, scale=0.2), _array(r, 48, 32, scale=0.15)
    hp = jax.lax.Precision.HIGHEST
    h = jax.nn.silu(jnp.einsum("...d,df->...f", x, wg, precision=hp)) * jnp.einsum("...d,df->...f", x, wu, precision=hp)
    want = jnp.einsum("...f,fd->...d", h, wd, precision=hp)
    np.testing.assert_allclose(jax.jit(dense_cpu.dense_ffn, static_argnums=4)(x, wg, wu, wd, "cpu"), want, **TOL)
    assert dense_cpu.dense_ffn(x, wg, wu, wd, "xla") is None
    assert dense_cpu.dense_ffn(x.astype(jnp.bfloat16), wg, wu, wd, "cpu") is None
    assert dense_cpu.dense_ffn(_array(r, dense_cpu.MAX_ROWS + 1, 32), wg, wu, wd, "cpu") is None


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "builtin-draft"])
def test_a_forward_with_cpu_products_matches_xla_and_a_token_gets_the_same_bits_in_decode_and_verification(name):
    from jaxspec.models.kv_cache import KVCache

    model = scaled_model(name)
    cfg = model.cfg
    moe = "cpu_fused" if cfg.is_moe else None
    toks = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 5)), jnp.int32)
    zero = jnp.zeros((2,), jnp.int32)

    def forward(tokens, start, cache, matmul):
        return model(tokens, start, cache, moe_backend=moe, attention_backend="cpu", matmul_backend=matmul)

    xla = forward(toks, zero, KVCache.create(cfg, 2, 32), "xla").logits
    full = forward(toks, zero, KVCache.create(cfg, 2, 32), "cpu").logits
    np.testing.assert_allclose(full, xla, rtol=2e-4, atol=2e-4)
    cache, steps = KVCache.create(cfg, 2, 32), []
    for t in range(5):
        out = forward(toks[:, t:t + 1], zero + t, cache, "cpu")
        cache = out.cache
        steps.append(out.logits)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full))


def test_make_runner_takes_the_products_where_they_apply():
    from jaxspec.engine.factory import make_runner
    from jaxspec.engine.model_runner import ModelRunner

    model = scaled_model("tiny-moe")
    matmul = lambda r: r.runner.statics.matmul_backend  # noqa: E731
    assert matmul(make_runner(model, num_slots=2, max_len=32)) == "cpu"
    assert matmul(make_runner(model, num_slots=2, max_len=32, page_size=8)) == "cpu"  # the cache does not matter
    assert matmul(make_runner(model, num_slots=2, max_len=32, matmul="xla")) == "xla"
    bf16 = scaled_model("tiny-moe", dtype="bfloat16")
    assert matmul(make_runner(bf16, num_slots=2, max_len=32)) == "xla"
    with pytest.raises(ValueError, match="cpu matmul backend cannot serve this runner: they take float32 weights"):
        ModelRunner(bf16, num_slots=2, max_len=32, matmul_backend="cpu")
    with pytest.raises(ValueError, match="matmul must be one of"):
        make_runner(model, num_slots=2, max_len=32, matmul="gemm")
    draft = scaled_model("tiny-dense", seed=1)
    spec = make_runner(model, num_slots=2, max_len=32, spec_method="draft", draft=draft, num_speculative_tokens=2)
    assert spec.proposer.backends == ("cpu", "cpu")
