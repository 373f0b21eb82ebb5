"""Verification attention kernel (pallas_kernels/verify_attention.py) vs cached_attention, in interpret mode.

Query positions are runtime values, so one compile per (shape, variant) covers many
slot layouts: an empty cache (length 0), length 1, starts and ends on and around
tile boundaries, the last T positions of the cache, positions past the cache, and
slots at different lengths in one batch. float32 tolerance 1e-5 (online softmax
over tiles vs one softmax); bf16 within 2e-2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.models import layers
from jaxspec.models.layers import cached_attention
from pallas_kernels.verify_attention import verify_attention
from pallas_kernels.verify_attention_reference import verify_attention_reference
from helpers import interpret_for

# The Pallas interpreter turns each kernel into a large XLA:CPU program whose compile dominates these
# tests; LLVM optimisation buys nothing at these sizes, so executed functions compile without it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def slot_starts(num_keys: int, t: int, block: int) -> list[int]:
    """Cache lengths (= first query position) worth testing for one slot."""
    starts = {0, 1, block - t, block - t + 1, block - 1, block, block + 1, 2 * block - t, num_keys - t, num_keys - t - 1}
    return sorted(s for s in starts if 0 <= s <= num_keys - t)


def operands(b, t, h, kvh, dh, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)
    k = jnp.asarray(rng.standard_normal((b, m, kvh, dh)), dtype)
    v = jnp.asarray(rng.standard_normal((b, m, kvh, dh)), dtype)
    return q, k, v


@functools.lru_cache(maxsize=None)
def jitted(backend: str, block_kv: int, window: int | None):
    return jit(
        functools.partial(verify_attention, interpret=interpret_for(backend), backend=backend, block_kv=block_kv, sliding_window=window)
    )


_reference = jit(cached_attention, static_argnums=4)


CASES = [
    # backend, B, T, H, KVH, Dh, M, block_kv, window, dtype
    ("tpu", 3, 5, 4, 2, 24, 40, 16, None, jnp.float32),  # tiny-moe heads; partial last tile
    ("tpu", 3, 4, 8, 2, 128, 64, 16, 7, jnp.float32),  # lane-aligned heads, sliding window
    ("tpu", 2, 3, 4, 4, 64, 48, 16, None, jnp.bfloat16),  # no grouping (G = 1), bf16
    ("gpu", 3, 5, 4, 2, 24, 40, 16, None, jnp.float32),  # head_dim and rows padded to powers of two
    ("gpu", 3, 4, 8, 2, 128, 64, 16, 7, jnp.float32),
]


@pytest.mark.parametrize("backend,b,t,h,kvh,dh,m,block,window,dtype", CASES)
def test_matches_cached_attention(backend, b, t, h, kvh, dh, m, block, window, dtype):
    q, k, v = operands(b, t, h, kvh, dh, m, dtype, seed=dh)
    f = jitted(backend, block, window)
    starts = slot_starts(m, t, block)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    # Cycle the interesting lengths through the slots, so that every slot sees each of them
    # and slots of one batch sit at different lengths.
    for shift in range(len(starts)):
        start = np.array([starts[(shift + i) % len(starts)] for i in range(b)], np.int32)
        pos = jnp.asarray(start[:, None] + np.arange(t)[None, :], jnp.int32)
        out = f(q, k, v, pos)
        assert out.dtype == dtype and out.shape == q.shape
        want = _reference(q, k, v, pos, window)
        np.testing.assert_allclose(
            np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)), **tol,
            err_msg=f"starts={start.tolist()}",
        )


def test_reference_is_cached_attention():
    q, k, v = operands(3, 4, 8, 2, 128, 64, jnp.float32, seed=4)
    pos = jnp.asarray([[0, 1, 2, 3], [20, 21, 22, 23], [60, 61, 62, 63]], jnp.int32)
    for window in (None, 7):
        np.testing.assert_array_equal(
            np.asarray(jit(verify_attention_reference, static_argnums=4)(q, k, v, pos, window)),
            np.asarray(_reference(q, k, v, pos, window)),
        )


def test_positions_past_the_cache_see_every_key():
    """Queries at positions >= M (their writes were dropped) attend to all M keys, as cached_attention does."""
    q, k, v = operands(3, 5, 4, 2, 24, 40, jnp.float32, seed=1)
    pos = jnp.asarray([[37, 38, 39, 40, 41], [50, 51, 52, 53, 54], [0, 1, 2, 3, 4]], jnp.int32)
    out = jitted("tpu", 16, None)(q, k, v, pos)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v, pos, None)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_tiles_beyond_the_last_position_are_never_read(backend):
    """NaN in whole KV tiles past each slot's largest position cannot reach the output, so they were skipped."""
    b, t, m, block = 3, 5, 40, 16
    q, k, v = operands(b, t, 4, 2, 24, m, jnp.float32, seed=2)
    start = np.array([0, 10, 12], np.int32)  # last positions 4, 14, 16: tiles 0, 0 and 1
    pos = jnp.asarray(start[:, None] + np.arange(t)[None, :], jnp.int32)
    want = _reference(q, k, v, pos, None)
    k_bad, v_bad = k, v
    for slot, last_tile in enumerate([0, 0, 1]):
        k_bad = k_bad.at[slot, (last_tile + 1) * block:].set(jnp.nan)
        v_bad = v_bad.at[slot, (last_tile + 1) * block:].set(jnp.nan)
    out = np.asarray(jitted(backend, block, None)(q, k_bad, v_bad, pos))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_tiles_before_the_window_are_never_read():
    b, t, m, block, window = 3, 4, 64, 16, 7
    q, k, v = operands(b, t, 8, 2, 128, m, jnp.float32, seed=3)
    start = np.array([40, 33, 60], np.int32)  # first visible keys 34, 27, 54: tiles 2, 1, 3
    pos = jnp.asarray(start[:, None] + np.arange(t)[None, :], jnp.int32)
    want = _reference(q, k, v, pos, window)
    k_bad, v_bad = k, v
    for slot, first_tile in enumerate([2, 1, 3]):
        k_bad = k_bad.at[slot, : first_tile * block].set(jnp.nan)
        v_bad = v_bad.at[slot, : first_tile * block].set(jnp.nan)
    out = np.asarray(jitted("tpu", block, window)(q, k_bad, v_bad, pos))
    np.testing.assert_allclose(out, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_default_block_sizes_and_validation():
    q, k, v = operands(3, 5, 4, 2, 24, 40, jnp.float32)
    pos = jnp.asarray([[0, 1, 2, 3, 4], [20, 21, 22, 23, 24], [35, 36, 37, 38, 39]], jnp.int32)
    out = jit(functools.partial(verify_attention, interpret=True))(q, k, v, pos)  # auto: whole cache, one tile
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v, pos, None)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"illegal TPU block_kv=12"):
        verify_attention(q, k, v, pos, block_kv=12, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"illegal GPU block_kv=24"):
        verify_attention(q, k, v, pos, block_kv=24, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="q_positions"):
        verify_attention(q, k, v, pos[:, :2], interpret=True)


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
@pytest.mark.parametrize("dh,window,dtype", [(128, None, jnp.bfloat16), (64, 4096, jnp.float32)])
def test_lowers_for_accelerators(backend, platform, marker, dh, window, dtype):
    """Mixtral-like verification step (16 slots, k=4 drafts, 32 heads over 8 kv heads, 8k cache) lowers."""
    s = jax.ShapeDtypeStruct
    args = (s((16, 5, 32, dh), dtype), s((16, 8192, 8, dh), dtype), s((16, 8192, 8, dh), dtype), s((16, 5), jnp.int32))
    fn = functools.partial(verify_attention, backend=backend, sliding_window=window)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    assert marker in lowered.as_text()


def test_model_attention_backend_hook():
    """attention_backend="pallas" (a static forward argument): the model's logits stay within 1e-5
    of the XLA attention, and an unknown backend is refused by name."""
    from flax import nnx

    from helpers import scaled_model
    from jaxspec.models import KVCache

    model = scaled_model("tiny-moe", seed=5, moe_backend="dense")
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 7)), jnp.int32)
    start = jnp.asarray([0, 9], jnp.int32)  # slot 1 continues after 9 cached (here: zero) entries

    def logits(backend):
        @functools.partial(jit, static_argnums=1)
        def run(state, backend):
            cache = KVCache.create(model.cfg, 2, 32)
            return nnx.merge(graphdef, state)(tokens, start, cache, attention_backend=backend).logits

        return np.asarray(run(state, backend))

    with pytest.raises(ValueError, match="unknown attention backend"):
        logits("flash")
    np.testing.assert_allclose(logits("pallas"), logits("xla"), rtol=1e-5, atol=1e-5)
