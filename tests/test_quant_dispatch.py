"""Quantized experts are never dequantized whole: every MoE dispatch path (moe_dispatch's
backends, the pallas backend, expert parallelism's local modes) is traced with int8 and int4
experts, and no floating-point array of a full expert tensor's shape ([E, D, F] or [E, F, D])
may appear anywhere in its jaxpr (sub-jaxprs of loops, conds and kernels included). The
outputs also match the dense dispatch of the dequantized weights. A path that dequantized a whole
tensor (as ``ragged`` and expert parallelism did) is caught by the same check (the control)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models import quant
from jaxspec.models.moe_dispatch import BACKENDS, load_backend
from jaxspec.models.quant import dequantize, quantize

E, D, F, N = 4, 256, 256, 10  # distinct tile counts / shapes: no intermediate is [E, D, F] by chance


def _experts(bits: int, f: int = F):
    keys = jax.random.split(jax.random.PRNGKey(bits), 3)
    shapes = ((E, D, f), (E, D, f), (E, f, D))
    return [quantize(jax.random.normal(k, s) * 0.1, (1,), bits, 128) for k, s in zip(keys, shapes)]


def _routing():
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(keys[0], (N, D))
    ids = jax.random.randint(keys[1], (N, 2), 0, E)
    gates = jax.nn.softmax(jax.random.normal(keys[2], (N, 2)))
    return x, ids, gates


def _avals(jaxpr):
    """Every variable's aval in a jaxpr and, recursively, in the jaxprs its equations carry."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def _whole_float_experts(fn, *args) -> list:
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    full = {(E, D, F), (E, F, D)}
    return [a for a in _avals(jaxpr) if getattr(a, "shape", None) in full and jnp.issubdtype(a.dtype, jnp.floating)]


@pytest.fixture(autouse=True)
def small_int4_chunks(monkeypatch):
    # Contractions here are 2 scale groups long; chunks of one group make qragged_dot loop.
    monkeypatch.setattr(quant, "INT4_RAGGED_CHUNK", 128)


def test_the_check_catches_a_whole_tensor_dequantization():
    x, ids, gates = _routing()
    ws = _experts(8)
    whole = lambda x, ids, g, a, b, c: BACKENDS["dense"](x, ids, g, *(dequantize(w) for w in (a, b, c)))  # noqa: E731
    assert len(_whole_float_experts(whole, x, ids, gates, *ws)) >= 3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", ["dense", "sorted", "ragged", "per_expert", "per_expert_static", "expert_rows",
                                     "expert_chunks", "pallas"])
def test_dispatch_never_dequantizes_a_whole_expert_tensor(backend, bits):
    assert load_backend(backend)
    x, ids, gates = _routing()
    ws = _experts(bits)
    fn = BACKENDS[backend]
    assert _whole_float_experts(fn, x, ids, gates, *ws) == []
    want = BACKENDS["dense"](x, ids, gates, *(dequantize(w) for w in ws))
    np.testing.assert_allclose(jax.jit(fn)(x, ids, gates, *ws), want, rtol=2e-5, atol=2e-5)


def test_pallas_backend_sends_int4_experts_to_the_int4_kernel(monkeypatch):
    from jaxspec.models import moe_pallas

    calls = []
    real = moe_pallas.gmm_int4
    monkeypatch.setattr(moe_pallas, "gmm_int4", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    x, ids, gates = _routing()
    moe_pallas.dispatch_pallas(x, ids, gates, *_experts(4), interpret=True, backend="tpu")
    assert calls == [(E, D // 2, F), (E, D // 2, F), (E, F // 2, D)]  # packed along the contraction


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("local", ["dense", "grouped"])
def test_expert_parallel_never_dequantizes_a_whole_expert_tensor(local, bits):
    """On a 2 (expert) x 2 (tensor) mesh each device holds [E/2, D, f/2]: neither that local
    shape nor the global one may appear in float (f = 2F: the local down projection contracts
    over two int4 groups, the smallest contraction that can be walked in chunks)."""
    from jax.sharding import Mesh

    from jaxspec.models.moe_parallel import ExpertParallel

    mesh = Mesh(np.asarray(jax.devices()[:4], dtype=object).reshape(2, 2), ("expert", "tensor"))
    backend = ExpertParallel(mesh, ("expert",), ("tensor",), (), local)
    x, ids, gates = _routing()
    f = 2 * F
    ws = _experts(bits, f)
    jaxpr = jax.make_jaxpr(lambda *a: backend(*a))(x, ids, gates, *ws).jaxpr
    local_full = {(E // 2, D, f // 2), (E // 2, f // 2, D), (E, D, f), (E, f, D)}
    bad = [a for a in _avals(jaxpr) if getattr(a, "shape", None) in local_full and jnp.issubdtype(a.dtype, jnp.floating)]
    assert bad == []
    want = BACKENDS["dense"](x, ids, gates, *(dequantize(w) for w in ws))
    np.testing.assert_allclose(jax.jit(lambda *a: backend(*a))(x, ids, gates, *ws), want, rtol=2e-5, atol=2e-5)


def test_auto_picks_the_pallas_backend_only_where_the_experts_kernel_is_validated():
    """On a GPU the float grouped matmul is validated and the quantized ones are not: ``auto``
    keeps quantized experts on ragged_dot (chunked / int8-direct) until they are."""
    from jaxspec.models.moe_dispatch import choose_backend, grouped_kernel

    int8, int4 = _experts(8)[0], _experts(4)[0]
    assert [grouped_kernel(w) for w in (int8, int4, dequantize(int8))] == ["gmm_int8", "gmm_int4", "gmm"]
    assert choose_backend("auto", 4096, "gpu", top_k=2) == "pallas"
    assert choose_backend("auto", 4096, "gpu", top_k=2, kernel="gmm_int8") == "ragged"
    assert choose_backend("auto", 4096, "gpu", top_k=2, kernel="gmm_int4") == "ragged"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_kernel_selftest_checks_the_quantized_grouped_matmul(quantization):
    from jaxspec.kernels import check_gmm

    result = check_gmm(4, 256, 256, 2, [8, 24], "float32", interpret=True, quantization=quantization)
    assert result.ok and result.kernel == f"gmm_{quantization}", result
    # A kernel giving the wrong answer is caught.
    wrong = check_gmm(4, 256, 256, 2, [8], "float32", interpret=True, quantization=quantization,
                      impl=lambda lhs, w, sizes, interpret: jnp.zeros((lhs.shape[0], w.shape[2])))
    assert not wrong.ok and wrong.kernel == f"gmm_{quantization}"
