"""The CPU slot-cache attention kernel (cpu_kernels/slot_attention.cc) against its jax.numpy
reference, the "cpu" attention backend in a runner's steps, and where ``make_runner`` takes it.

Outputs are float32 softmax averages: within 2e-6 of the reference at HIGHEST precision. A query's
result must not depend on the other tokens and rows of the call (bitwise), which the engine's
exactness between decode and verification steps relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpu_kernels import slot_attention as kernel_module
from cpu_kernels.slot_attention_reference import slot_attention_reference
from helpers import require_cpu_kernel, scaled_model

TOL = dict(rtol=2e-6, atol=2e-6)


@pytest.fixture(scope="module", autouse=True)
def _built():
    require_cpu_kernel(kernel_module)


attend = jax.jit(kernel_module.slot_attention, static_argnames=("layer", "kv_len", "window"))


def _problem(b, t, h, kvh, dh, layers, slots, m, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, dh)), jnp.float32)
    k = jnp.asarray(r.normal(size=(layers, slots, m, kvh, dh)), jnp.float32)
    v = jnp.asarray(r.normal(size=(layers, slots, m, kvh, dh)), jnp.float32)
    rows = jnp.asarray(r.permutation(slots)[:b], jnp.int32)
    return q, k, v, rows, r


# Group sizes 1-8 and 12 (query heads summed 8 at a time), head dims whole vectors and not (40, 8),
# windows, spans shorter than the cache.
@pytest.mark.parametrize("b,t,h,kvh,dh,m,kv_len,window", [
    (1, 1, 8, 2, 32, 64, 64, None), (3, 5, 6, 2, 32, 128, 100, None), (2, 3, 4, 4, 40, 50, 50, 7),
    (4, 2, 8, 1, 16, 33, 20, None), (2, 4, 2, 2, 8, 40, 40, 1), (2, 3, 12, 1, 64, 40, 40, None)])
def test_matches_the_reference(b, t, h, kvh, dh, m, kv_len, window):
    q, k, v, rows, r = _problem(b, t, h, kvh, dh, 2, b + 1, m, seed=b * t)
    pos = jnp.asarray(r.integers(0, kv_len, (b, t)), jnp.int32)
    got = attend(q, k, v, rows, pos, layer=1, kv_len=kv_len, window=window)
    np.testing.assert_allclose(got, slot_attention_reference(q, k, v, rows, pos, 1, kv_len, window), **TOL)


def test_a_query_gets_the_same_bits_in_a_decode_and_in_a_verification():
    q, k, v, rows, _ = _problem(3, 5, 8, 2, 32, 1, 4, 128, seed=1)
    pos = jnp.asarray([[40, 41, 42, 43, 44], [7, 8, 9, 10, 11], [90, 91, 92, 93, 94]], jnp.int32)
    full = np.asarray(attend(q, k, v, rows, pos, layer=0, kv_len=96))
    for t in range(5):  # each token alone, as a 1-token decode of its row would attend
        for b in range(3):
            alone = attend(q[b:b + 1, t:t + 1], k, v, rows[b:b + 1], pos[b:b + 1, t:t + 1], layer=0, kv_len=96)
            np.testing.assert_array_equal(np.asarray(alone)[0, 0], full[b, t])
    # A wider span changes nothing for queries that see less of it.
    np.testing.assert_array_equal(np.asarray(attend(q, k, v, rows, pos, layer=0, kv_len=128)), full)


def test_padding_rows_and_queries_past_the_span():
    q, k, v, rows, _ = _problem(3, 2, 4, 2, 16, 1, 4, 32, seed=2)
    rows = rows.at[1].set(4)  # slot S: a padding row
    pos = jnp.asarray([[3, 31], [0, 1], [20, 29]], jnp.int32)  # 31, 29 past a span of 24: see keys < 24
    got = np.asarray(attend(q, k, v, rows, pos, layer=0, kv_len=24))
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_allclose(got, slot_attention_reference(q, k, v, rows, pos, 0, 24), **TOL)


def test_keys_a_query_does_not_see_are_never_read():
    q, k, v, rows, _ = _problem(2, 2, 4, 2, 16, 1, 2, 64, seed=3)
    pos = jnp.asarray([[5, 6], [10, 11]], jnp.int32)
    poison = lambda a: a.at[:, :, 12:].set(jnp.nan)  # noqa: E731
    got = attend(q, poison(k), poison(v), rows, pos, layer=0, kv_len=64)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, slot_attention_reference(q, k, v, rows, pos, 0, 64), **TOL)


def test_bad_inputs_name_the_problem():
    q, k, v, rows, _ = _problem(2, 1, 4, 2, 16, 1, 2, 8)
    pos = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(TypeError, match="float32.*q is bfloat16"):
        kernel_module.slot_attention(q.astype(jnp.bfloat16), k, v, rows, pos, 0, 8)
    with pytest.raises(ValueError, match="KVH dividing 4"):
        kernel_module.slot_attention(q, k[:, :, :, :1].repeat(3, axis=3), v[:, :, :, :1].repeat(3, axis=3), rows, pos, 0, 8)
    with pytest.raises(ValueError, match="layer 1 is outside"):
        kernel_module.slot_attention(q, k, v, rows, pos, 1, 8)
    with pytest.raises(ValueError, match=r"positions \[2, 1\]"):
        kernel_module.slot_attention(q, k, v, rows, pos[:, :0], 0, 8)


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


def test_an_engine_on_the_kernel_decodes_as_on_xla(model):
    """Greedy tokens of an engine whose runner attends through the kernel equal those through XLA
    (prompts longer than one attention span, rows joining and leaving), and the keys both write."""
    from jaxspec.engine import Engine
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.engine.runner import PlainRunner
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    prompts = ["def f(x):" * 4, "a" * 50, "import os", "z", "class A:"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = {}
    for backend in ("xla", "cpu"):
        runner = ModelRunner(model, num_slots=4, max_len=128, attention_backend=backend, min_kv_bucket=16)
        tokens = [c.token_ids for c in Engine(PlainRunner(runner), ByteTokenizer()).generate(prompts, params)]
        out[backend] = (tokens, np.asarray(runner.cache.k))
    assert out["cpu"][0] == out["xla"][0] and all(len(t) == 12 for t in out["cpu"][0])
    np.testing.assert_allclose(out["cpu"][1], out["xla"][1], rtol=1e-5, atol=1e-5)


def test_make_runner_takes_the_kernel_where_it_applies(model):
    from jaxspec.engine.factory import make_runner
    from jaxspec.engine.model_runner import ModelRunner

    attention = lambda r: r.runner.statics.attention_backend  # noqa: E731
    assert attention(make_runner(model, num_slots=2, max_len=32)) == "cpu"
    assert attention(make_runner(model, num_slots=2, max_len=32, page_size=8)) == "xla"
    assert attention(make_runner(model, num_slots=2, max_len=32, kv_dtype="int8")) == "xla"
    assert attention(make_runner(model, num_slots=2, max_len=32, attention="xla")) == "xla"
    bf16 = scaled_model("tiny-moe", dtype="bfloat16")
    assert attention(make_runner(bf16, num_slots=2, max_len=32)) == "xla"
    with pytest.raises(ValueError, match="cpu attention backend cannot serve.*paged or int8"):
        make_runner(model, num_slots=2, max_len=32, page_size=8, attention="cpu")
    with pytest.raises(ValueError, match="float32 models, not bfloat16"):
        ModelRunner(bf16, num_slots=2, max_len=32, attention_backend="cpu")
    with pytest.raises(ValueError, match="attention must be one of"):
        make_runner(model, num_slots=2, max_len=32, attention="flash")
    # A draft model's own steps take it too where its cache is a float32 slot cache.
    draft = scaled_model("tiny-dense", seed=1)
    spec = make_runner(model, num_slots=2, max_len=32, spec_method="draft", draft=draft, num_speculative_tokens=2)
    assert spec.proposer.attention == "cpu"
    paged = make_runner(model, num_slots=2, max_len=32, spec_method="draft", draft=draft, num_speculative_tokens=2,
                        page_size=8)
    assert paged.proposer.attention == "xla"
