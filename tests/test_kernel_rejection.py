"""Fused verification kernel (pallas_kernels/rejection_sampling.py) vs its jax.numpy reference vs a numpy oracle.

Randomness is an input, so kernel, reference and oracle must agree token for token.
Each batch mixes sampled, greedy (one-hot target) and deterministic-draft (one-hot
draft) rows with p == q rows, q(x) = 0 < p(x) at a draft, an all-zero residual after
a rejection, zero-probability entries, Exp(1) samples that are exactly 0, and
num_draft taking every value 0..K. The vocabulary (300) is not a multiple of the
vocabulary tile (128 on the TPU variant, 64 on the GPU variant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rejection_sampling import rejection_sample
from pallas_kernels.rejection_sampling_reference import rejection_sample as reference
from helpers import interpret_for

VOCAB = 300
KINDS = ("sampled", "greedy", "det_draft", "p_eq_q", "q_zero_at_draft", "zero_residual", "greedy_det")

# The Pallas interpreter turns each kernel into a large XLA:CPU program whose compile dominates these
# tests; LLVM optimisation buys nothing at these sizes, so executed functions compile without it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


# ------------------------------------------------------------------------------------ oracle
def oracle(p, q, tokens, num_draft, uniforms, noise):
    """The verification rule written out per row in float32 numpy."""
    b, k1, vocab = p.shape
    k = k1 - 1
    out = np.full((b, k1), -1, np.int32)
    n_acc = np.zeros(b, np.int32)

    def race(weights, e):
        with np.errstate(divide="ignore", invalid="ignore"):
            return int(np.argmax(np.where(weights > 0, weights / e, np.float32(0))))

    for row in range(b):
        n = min(max(int(num_draft[row]), 0), k)
        acc = 0
        while acc < n:
            x = int(tokens[row, acc])
            if np.float32(uniforms[row, acc]) * q[row, acc, x] < p[row, acc, x]:
                acc += 1
            else:
                break
        j = acc
        if j < n:
            residual = np.maximum(p[row, j] - q[row, j], np.float32(0))
            token = race(residual, noise[row, j]) if np.any(residual > 0) else race(p[row, j], noise[row, j])
        else:
            token = race(p[row, j], noise[row, j])
        out[row, :acc] = tokens[row, :acc]
        out[row, acc] = token
        n_acc[row] = acc
    return out, n_acc


# -------------------------------------------------------------------------------------- data
def _dist(rng, vocab, zero_frac=0.3, temp=2.0):
    logits = rng.standard_normal(vocab) * temp
    probs = np.exp(logits - logits.max())
    probs[rng.random(vocab) < zero_frac] = 0.0  # truncated (top-k / top-p style) distributions have exact zeros
    probs[np.argmax(logits)] = max(probs[np.argmax(logits)], 1e-3)
    return (probs / probs.sum()).astype(np.float32)


def _one_hot(i, vocab):
    v = np.zeros(vocab, np.float32)
    v[i] = 1.0
    return v


def make_batch(k: int, rows: int, seed: int, vocab: int = VOCAB):
    rng = np.random.default_rng(seed)
    p = np.zeros((rows, k + 1, vocab), np.float32)
    q = np.zeros((rows, k, vocab), np.float32)
    tokens = np.full((rows, k), -1, np.int32)  # -1 padding past num_draft must be harmless
    num_draft = np.array([r % (k + 1) for r in range(rows)], np.int32)  # every value 0..K
    for r in range(rows):
        kind = KINDS[r % len(KINDS)]
        for i in range(k + 1):
            target = _dist(rng, vocab)
            draft = _dist(rng, vocab) if i < k else None
            if kind in ("greedy", "greedy_det"):
                target = _one_hot(int(np.argmax(target)), vocab)
            if kind in ("p_eq_q", "zero_residual") and i < k:
                draft = target.copy()
            if i < k:
                x = int(rng.choice(vocab, p=draft.astype(np.float64) / draft.astype(np.float64).sum()))
                if kind in ("det_draft", "greedy_det"):
                    if kind == "greedy_det" and rng.random() < 0.7:
                        x = int(np.argmax(target))  # a drafter that often agrees with the greedy target
                    draft = _one_hot(x, vocab)
                if kind == "q_zero_at_draft":
                    x = int(np.argmax(target))
                    draft[x] = 0.0  # q(x) = 0 < p(x): must accept
                if kind == "zero_residual" and i == 0:
                    x = int(np.flatnonzero(target == 0)[0])  # p(x) = q(x) = 0: rejected, residual all zero
                if i < num_draft[r]:
                    tokens[r, i] = x
                q[r, i] = draft
            p[r, i] = target
    uniforms = rng.random((rows, k)).astype(np.float32)
    noise = rng.exponential(size=(rows, k + 1, vocab)).astype(np.float32)
    noise[rng.random(noise.shape) < 0.01] = 0.0  # Exp(1) draws of exactly 0 happen (-log1p(-0))
    return p, q, tokens, num_draft, uniforms, noise


@functools.lru_cache(maxsize=None)
def jitted_kernel(backend: str, block_v: int):
    return jit(functools.partial(rejection_sample, interpret=interpret_for(backend), backend=backend, block_v=block_v))


_jitted_reference = jit(reference)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend,k", [("tpu", k) for k in (0, 1, 2, 4, 8)] + [("gpu", k) for k in (0, 3, 8)])
def test_kernel_reference_and_oracle_agree(backend, k):
    block_v = 128 if backend == "tpu" else 64
    rows = max(2 * len(KINDS), 2 * (k + 1))
    for seed in range(2):
        batch = make_batch(k, rows, seed=100 * k + seed)
        want_tokens, want_acc = oracle(*batch)
        ref_tokens, ref_acc = _jitted_reference(*batch)
        np.testing.assert_array_equal(np.asarray(ref_tokens), want_tokens)
        np.testing.assert_array_equal(np.asarray(ref_acc), want_acc)
        out_tokens, out_acc = jitted_kernel(backend, block_v)(*batch)
        assert out_tokens.dtype == jnp.int32 and out_acc.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out_tokens), want_tokens)
        np.testing.assert_array_equal(np.asarray(out_acc), want_acc)


def test_special_rows_behave_as_specified():
    k = 4
    p, q, tokens, num_draft, uniforms, noise = make_batch(k, 2 * len(KINDS), seed=7)
    num_draft[:] = k
    for r in range(len(p)):  # every row drafts k tokens here
        kind = KINDS[r % len(KINDS)]
        for i in range(k):
            if kind == "zero_residual" and i == 0:
                tokens[r, i] = int(np.flatnonzero(p[r, 0] == 0)[0])
            elif kind == "q_zero_at_draft":
                tokens[r, i] = int(np.argmax(p[r, i]))
            else:
                tokens[r, i] = int(np.argmax(q[r, i]))
    out, n_acc = jitted_kernel("tpu", 128)(p, q, tokens, num_draft, uniforms, noise)
    out, n_acc = np.asarray(out), np.asarray(n_acc)
    for r in range(len(p)):
        kind = KINDS[r % len(KINDS)]
        if kind == "p_eq_q":  # p == q: every draft with p(x) > 0 is accepted
            expect = next((i for i in range(k) if p[r, i, tokens[r, i]] == 0), k)
            assert n_acc[r] == expect
        if kind == "q_zero_at_draft":  # q(x) = 0 < p(x): always accepted
            assert n_acc[r] == k
        if kind == "zero_residual":  # rejected at 0 with p == q: the draw falls back to p itself
            assert n_acc[r] == 0 and p[r, 0, out[r, 0]] > 0
        if kind in ("greedy", "greedy_det"):  # greedy: accept iff the draft is the argmax; emit the argmax
            argmaxes = np.argmax(p[r], axis=-1)
            expect = next((i for i in range(k) if tokens[r, i] != argmaxes[i]), k)
            assert n_acc[r] == expect and out[r, expect] == argmaxes[expect]
        # Never a token of probability zero, never a padding token.
        assert p[r, n_acc[r], out[r, n_acc[r]]] > 0
        assert np.all(out[r, n_acc[r] + 1:] == -1)


def test_verification_preserves_the_target_distribution():
    """Statistical check of the rule (reference): the first emitted token is distributed as p_0."""
    rows, vocab = 20000, 6
    rng = np.random.default_rng(0)
    p0 = np.array([0.4, 0.25, 0.15, 0.1, 0.1, 0.0], np.float32)
    q0 = np.array([0.1, 0.1, 0.2, 0.2, 0.2, 0.2], np.float32)
    p = np.broadcast_to(np.stack([p0, p0]), (rows, 2, vocab)).copy()
    q = np.broadcast_to(q0, (rows, 1, vocab)).copy()
    tokens = rng.choice(vocab, size=(rows, 1), p=q0).astype(np.int32)
    out, _ = _jitted_reference(
        p, q, tokens, np.ones(rows, np.int32), rng.random((rows, 1)).astype(np.float32),
        rng.exponential(size=(rows, 2, vocab)).astype(np.float32),
    )
    freq = np.bincount(np.asarray(out)[:, 0], minlength=vocab) / rows
    np.testing.assert_allclose(freq, p0, atol=0.015)  # ~4 sigma at 20k samples


def test_nan_guard_for_zero_noise():
    """An Exp(1) sample of 0 on a zero-probability token must not win (0/0 = NaN would)."""
    p = np.zeros((3, 1, VOCAB), np.float32)
    p[:, 0, 5] = 1.0
    noise = np.ones((3, 1, VOCAB), np.float32)
    noise[:, 0, 0] = 0.0
    args = (p, np.zeros((3, 0, VOCAB), np.float32), np.zeros((3, 0), np.int32), np.zeros(3, np.int32),
            np.zeros((3, 0), np.float32), noise)
    assert np.asarray(_jitted_reference(*args)[0])[:, 0].tolist() == [5, 5, 5]
    assert np.asarray(jitted_kernel("tpu", 128)(*args)[0])[:, 0].tolist() == [5, 5, 5]


@pytest.mark.parametrize("backend,block_v", [("tpu", 128), ("gpu", 64)])
def test_ties_resolve_to_the_lowest_index(backend, block_v):
    """Equal race scores in one tile, in one lane across tiles and in different lanes: jnp.argmax's choice."""
    p = np.zeros((3, 1, VOCAB), np.float32)
    p[0, 0, [7, 9, 11]] = 1 / 3  # one tile
    p[1, 0, [5 + block_v, 5 + 2 * block_v, 5]] = 1 / 3  # same lane, three tiles
    p[2, 0, [250, 3 + block_v, 130]] = 1 / 3  # different lanes and tiles
    noise = np.ones((3, 1, VOCAB), np.float32)
    noise[2, 0, 250] = noise[2, 0, 3 + block_v] = 0.0  # two infinite scores tie as well
    args = (p, np.zeros((3, 0, VOCAB), np.float32), np.zeros((3, 0), np.int32), np.zeros(3, np.int32),
            np.zeros((3, 0), np.float32), noise)
    want = [7, 5, 3 + block_v]
    assert np.asarray(_jitted_reference(*args)[0])[:, 0].tolist() == want
    assert np.asarray(jitted_kernel(backend, block_v)(*args)[0])[:, 0].tolist() == want


def test_illegal_block_sizes_are_rejected():
    batch = make_batch(2, 3, seed=1)
    with pytest.raises(ValueError, match=r"illegal TPU block_v=100.*block shape \(1, 100\)"):
        rejection_sample(*batch, block_v=100, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"illegal GPU block_v=96"):
        rejection_sample(*batch, block_v=96, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        rejection_sample(batch[0], batch[1][:, :1], *batch[2:], interpret=True)


@pytest.mark.parametrize("backend,platform,marker", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
@pytest.mark.parametrize("k", [0, 4])
def test_lowers_for_accelerators(backend, platform, marker, k):
    b, vocab = 16, 151936  # Qwen-sized vocabulary: not a multiple of any tile
    s = jax.ShapeDtypeStruct
    args = (
        s((b, k + 1, vocab), jnp.float32), s((b, k, vocab), jnp.float32), s((b, k), jnp.int32), s((b,), jnp.int32),
        s((b, k), jnp.float32), s((b, k + 1, vocab), jnp.float32),
    )
    fn = functools.partial(rejection_sample, backend=backend)
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    assert marker in lowered.as_text()
