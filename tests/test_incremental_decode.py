"""Slot cache: incremental and blocked decoding equal one full forward; rollback re-decodes identically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import full_forward, scaled_model
from jaxspec.models import KVCache


def _jit_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, start, cache, slot_ids, num_valid):
        return nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid)

    return lambda *a: fwd(state, *a)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen2-moe"])
def test_blocks_of_any_size_match_full_forward(name):
    model = scaled_model(name)
    fwd = _jit_forward(model)
    rng = np.random.default_rng(0)
    lengths = [21, 14, 30]  # three slots at different lengths
    seqs = [rng.integers(3, model.cfg.vocab_size, size=n) for n in lengths]
    refs = [full_forward(model, s) for s in seqs]
    num_slots, max_len = 4, 48
    cache = KVCache.create(model.cfg, num_slots, max_len)
    slot_of = [2, 0, 3]  # rows map to non-contiguous slots
    pos = [0, 0, 0]
    # Each step, every row feeds a block of a different size (1..8) padded to T=8.
    block_plan = [1, 2, 3, 4, 5, 6, 7, 8]
    step = 0
    got = [[] for _ in seqs]
    while any(p < n for p, n in zip(pos, lengths)):
        t = 8
        tokens = np.zeros((3, t), np.int32)
        nvalid = np.zeros(3, np.int32)
        for r in range(3):
            take = min(block_plan[(step + r) % 8], lengths[r] - pos[r])
            tokens[r, :take] = seqs[r][pos[r] : pos[r] + take]
            nvalid[r] = take
        out = fwd(jnp.asarray(tokens), jnp.asarray(pos, jnp.int32), cache, jnp.asarray(slot_of, jnp.int32),
                  jnp.asarray(nvalid))
        cache = out.cache
        for r in range(3):
            got[r].append(np.asarray(out.logits[r, : nvalid[r]]))
            pos[r] += int(nvalid[r])
        step += 1
    for r in range(3):
        np.testing.assert_allclose(np.concatenate(got[r]), refs[r], atol=1e-5, rtol=1e-5)
        assert int(cache.lengths[slot_of[r]]) == lengths[r]


def test_one_token_at_a_time_matches_full_forward():
    model = scaled_model("tiny-qwen3-moe")
    fwd = _jit_forward(model)
    seq = np.random.default_rng(1).integers(3, model.cfg.vocab_size, size=17)
    ref = full_forward(model, seq)
    cache = KVCache.create(model.cfg, 2, 32)
    rows = []
    for i, tok in enumerate(seq):
        out = fwd(jnp.array([[tok]], jnp.int32), jnp.array([i], jnp.int32), cache, jnp.array([1], jnp.int32),
                  jnp.array([1], jnp.int32))
        cache = out.cache
        rows.append(np.asarray(out.logits[0, 0]))
    np.testing.assert_allclose(np.stack(rows), ref, atol=1e-5, rtol=1e-5)


def test_rollback_then_redecode_gives_same_result():
    model = scaled_model("tiny-moe")
    fwd = _jit_forward(model)
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, model.cfg.vocab_size, size=10)
    wrong = rng.integers(3, model.cfg.vocab_size, size=6)  # a rejected speculative block
    right = rng.integers(3, model.cfg.vocab_size, size=4)
    ref = full_forward(model, np.concatenate([prompt, right]))
    cache = KVCache.create(model.cfg, 1, 32)
    slot = jnp.array([0], jnp.int32)
    out = fwd(jnp.asarray(prompt)[None], jnp.array([0], jnp.int32), cache, slot, jnp.array([10], jnp.int32))
    out = fwd(jnp.asarray(wrong)[None], jnp.array([10], jnp.int32), out.cache, slot, jnp.array([6], jnp.int32))
    assert int(out.cache.lengths[0]) == 16
    cache = out.cache.set_length(0, 10)  # roll back: the stale entries 10..15 must never be seen
    out = fwd(jnp.asarray(right)[None], jnp.array([10], jnp.int32), cache, slot, jnp.array([4], jnp.int32))
    np.testing.assert_allclose(np.asarray(out.logits[0]), ref[10:], atol=1e-5, rtol=1e-5)


def test_padding_rows_write_nothing():
    model = scaled_model("tiny-dense")
    fwd = _jit_forward(model)
    cache = KVCache.create(model.cfg, 2, 16)
    tokens = jnp.arange(3, 11, dtype=jnp.int32).reshape(2, 4)
    out = fwd(tokens, jnp.zeros(2, jnp.int32), cache, jnp.array([0, 2], jnp.int32), jnp.array([4, 4], jnp.int32))
    # row 1 targeted slot 2 == num_slots: a padding row
    assert np.all(np.asarray(out.cache.k[:, 1]) == 0)
    assert list(np.asarray(out.cache.lengths)) == [4, 0]
