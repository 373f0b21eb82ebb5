"""The acceptance rule on its own (no models): edge cases, exactness of the emitted
distribution, acceptance statistics, agreement of implementations, and that the
chi-square tests used here do catch a wrong bonus or a wrong residual."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxspec.sampling import (
    PURPOSE_DRAFT,
    BatchSampling,
    SamplingParams,
    exponential_noise,
    logits_to_probs,
    sample_tokens,
)
from jaxspec.speculative import verify
from jaxspec.speculative.adaptive import expected_tokens
from jaxspec.speculative.verify import (
    acceptance_uniforms,
    accepted_prefix,
    assemble,
    race,
    rejection_sample,
    target_noise,
    verify_with_keys,
)

rule = jax.jit(rejection_sample)


def one_hot(idx, v):
    return np.eye(v, dtype=np.float32)[idx]


def random_dists(rng, shape, v, zero_frac=0.3, scale=1.5):
    """Random distributions [..., V] with about zero_frac of entries exactly 0 (as top-k/top-p leave)."""
    logits = rng.normal(size=(*shape, v)) * scale
    probs = np.exp(logits) * (rng.random((*shape, v)) >= zero_frac)
    probs[..., 0] += (probs.sum(-1) == 0)  # never an all-zero row
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Goodness of fit of observed counts to exact cell probabilities; cells expected
    to hold fewer than min_expected samples are pooled. Any count in a cell of
    probability 0 is an outright failure (p = 0)."""
    counts, probs = counts.ravel().astype(np.float64), probs.ravel().astype(np.float64)
    if counts[probs <= 0].sum() > 0:
        return 0.0
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


# ------------------------------------------------------------------------ edge cases
def test_layout_and_bonus():
    rng = np.random.default_rng(0)
    b, k, v = 6, 3, 11
    p = random_dists(rng, (b, k + 1), v, zero_frac=0)
    q = p[:, :k].copy()  # p == q: every draft with q(x) > 0 is accepted
    d = np.argmax(q, -1).astype(np.int32)
    nd = np.array([0, 1, 2, 3, 3, 2], np.int32)
    u = rng.random((b, k)).astype(np.float32)
    e = rng.exponential(size=(b, k + 1, v)).astype(np.float32)
    out, acc = map(np.asarray, rule(p, q, d, nd, u, e))
    assert (acc == nd).all()
    for r in range(b):
        n = nd[r]
        assert (out[r, :n] == d[r, :n]).all()
        assert out[r, n] == np.argmax(p[r, n] / e[r, n])  # the bonus comes from p at position n
        assert (out[r, n + 1 :] == -1).all()


def test_greedy_rows_accept_while_equal_to_target_argmax():
    v, k = 7, 4
    target = np.array([[3, 1, 4, 1, 5], [3, 1, 4, 1, 5], [2, 2, 2, 2, 2]])
    drafts = np.array([[3, 1, 0, 1], [3, 1, 4, 1], [2, 6, 2, 2]], np.int32)
    p, q = one_hot(target, v), one_hot(drafts, v)
    u = np.full((3, k), 0.999, np.float32)
    e = np.random.default_rng(1).exponential(size=(3, k + 1, v)).astype(np.float32)
    e[0, 2, 0] = 0.0  # an exact-zero Exp(1) draw on a zero-probability token must not win
    out, acc = map(np.asarray, rule(p, q, drafts, np.full(3, k, np.int32), u, e))
    assert acc.tolist() == [2, 4, 1]
    assert out.tolist() == [[3, 1, 4, -1, -1], [3, 1, 4, 1, 5], [2, 2, -1, -1, -1]]


def test_zero_q_accepts_and_zero_p_rejects():
    v = 5
    p = np.array([[[0.0, 0.5, 0.5, 0, 0], [0.2] * 5]], np.float32)
    # q(x) = 0 < p(x): u * 0 < p(x) always accepts (a padded or impossible draft token is still exact:
    # it is accepted with probability min(1, p/q) = 1).
    q = np.array([[[0.0, 0.0, 1.0, 0, 0]]], np.float32)
    out, acc = rule(p, q, np.array([[1]], np.int32), np.array([1], np.int32), np.zeros((1, 1), np.float32),
                    np.ones((1, 2, v), np.float32))
    assert int(acc[0]) == 1
    # p(x) = 0: always rejected, even with u = 0; the replacement comes from max(0, p - q).
    out, acc = rule(p, q, np.array([[3]], np.int32), np.array([1], np.int32), np.zeros((1, 1), np.float32),
                    np.ones((1, 2, v), np.float32))
    assert int(acc[0]) == 0 and int(out[0, 0]) == 1  # residual = [0, .5, 0, 0, 0]


def test_all_zero_residual_falls_back_to_p():
    v = 6
    p = np.array([[[0.0, 0.25, 0.75, 0, 0, 0], [1 / 6] * 6]], np.float32)
    q = p[:, :1].copy()  # p == q, and the drafted token has p = q = 0: rejected, residual all zero
    e = np.random.default_rng(2).exponential(size=(1, 2, v)).astype(np.float32)
    out, acc = rule(p, q, np.array([[4]], np.int32), np.array([1], np.int32), np.zeros((1, 1), np.float32), e)
    assert int(acc[0]) == 0
    assert int(out[0, 0]) == int(np.argmax(np.where(p[0, 0] > 0, p[0, 0] / e[0, 0], 0)))
    assert int(out[0, 0]) in (1, 2)


def test_no_drafts_is_a_draw_from_p():
    v = 9
    rng = np.random.default_rng(3)
    p = random_dists(rng, (4, 1), v)
    e = rng.exponential(size=(4, 1, v)).astype(np.float32)
    out, acc = rule(p, np.zeros((4, 0, v), np.float32), np.zeros((4, 0), np.int32), np.zeros(4, np.int32),
                    np.zeros((4, 0), np.float32), e)
    assert (np.asarray(acc) == 0).all()
    assert np.asarray(out)[:, 0].tolist() == np.argmax(p[:, 0] / e[:, 0], -1).tolist()


def test_race_ignores_exact_zero_noise_on_zero_weights():
    w = jnp.array([[0.0, 0.3, 0.7]])
    assert int(race(w, jnp.array([[0.0, 1.0, 1.0]]))[0]) in (1, 2)
    assert int(race(w, jnp.array([[1.0, 0.0, 1.0]]))[0]) == 1  # positive weight / 0 = inf wins


# ------------------------------------------------------------- keyed random numbers
def test_keyed_lazy_path_equals_contract_and_one_hot_drafts():
    """``verify_with_keys`` (noise drawn only for the emitted row) == the contract with full tensors."""
    rng = np.random.default_rng(4)
    b, k, v = 64, 4, 13
    p = random_dists(rng, (b, k + 1), v)
    q = random_dists(rng, (b, k), v)
    d = np.array([[rng.choice(v, p=q[i, j]) for j in range(k)] for i in range(b)], np.int32)
    nd = rng.integers(0, k + 1, b).astype(np.int32)
    seeds = rng.integers(0, 2**32, (b, 2), dtype=np.uint32)
    pos = rng.integers(0, 100, b).astype(np.int32)
    u, e = jax.jit(lambda s, g: (acceptance_uniforms(s, g, k), target_noise(s, g, k + 1, v)))(seeds, pos)
    want = rule(p, q, d, nd, u, e)
    got = jax.jit(verify_with_keys)(p, q, d, nd, seeds, pos)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])
    # Deterministic drafts: None means one-hot q at the draft tokens.
    want = rule(p, one_hot(d, v), d, nd, u, e)
    got = jax.jit(verify_with_keys)(p, None, d, nd, seeds, pos)
    np.testing.assert_array_equal(want[0], got[0])


def test_k0_reproduces_plain_sampling():
    """With no drafts the rule draws position g with the same (seed, g, PURPOSE_TARGET) noise as plain decoding."""
    rng = np.random.default_rng(5)
    b, v = 48, 40
    logits = jnp.asarray(rng.normal(size=(b, v)) * 3, jnp.float32)
    params = [SamplingParams(temperature=[0.0, 0.7, 1.0, 1.5][i % 4], top_k=[0, 5][i % 2], top_p=[1.0, 0.8][i % 3 == 0])
              for i in range(b)]
    bs = BatchSampling.from_params(params, list(range(b)))
    pos = jnp.asarray(rng.integers(0, 500, b), jnp.int32)

    @jax.jit
    def both(logits, bs, pos):
        probs = logits_to_probs(logits, bs.temperature, bs.top_k, bs.top_p, bs.min_p)[:, None]
        out, _ = verify_with_keys(probs, None, jnp.zeros((b, 0), jnp.int32), jnp.zeros(b, jnp.int32), bs.seed, pos)
        return sample_tokens(logits, bs, pos), out[:, 0]

    plain, spec = both(logits, bs, pos)
    np.testing.assert_array_equal(np.asarray(spec), np.asarray(plain))


# ------------------------------------------------------------------- statistics
def test_acceptance_rate_and_tokens_per_step_match_theory():
    """i.i.d. positions: P(accept) = sum min(p, q); E[tokens/step] = (1 - a^(k+1)) / (1 - a);
    the first emitted token is distributed exactly as p."""
    rng = np.random.default_rng(6)
    n, k, v = 100_000, 4, 8
    p1 = random_dists(rng, (), v, zero_frac=0.2)
    q1 = random_dists(rng, (), v, zero_frac=0.2)
    alpha = float(np.minimum(p1, q1).sum())
    p = np.broadcast_to(p1, (n, k + 1, v))
    q = np.broadcast_to(q1, (n, k, v))
    d = rng.choice(v, size=(n, k), p=q1).astype(np.int32)
    u = rng.random((n, k)).astype(np.float32)
    e = rng.exponential(size=(n, k + 1, v)).astype(np.float32)
    out, acc = map(np.asarray, rule(p, q, d, np.full(n, k, np.int32), u, e))
    first = (acc >= 1).mean()
    assert abs(first - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / n)
    for i in range(1, k):  # acceptance per position, given the position was tested
        tested = acc >= i
        rate = (acc[tested] >= i + 1).mean()
        assert abs(rate - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / tested.sum())
    tokens = acc + 1
    assert abs(tokens.mean() - float(expected_tokens(alpha, k))) < 5 * tokens.std() / np.sqrt(n)
    assert chi2_pvalue(np.bincount(out[:, 0], minlength=v), p1) > 1e-3


# --------------------------------------------------- whole sequences, several rounds
V_SEQ, K_SEQ, N_TOKENS, N_ROWS = 5, 3, 4, 60_000


def _bigram_tables():
    """A context-dependent target P[prev] and a different draft Q[prev] with exact zeros
    in different places (draft tokens with p = 0, target tokens the draft never proposes)."""
    rng = np.random.default_rng(7)
    p = random_dists(rng, (V_SEQ,), V_SEQ, zero_frac=0.25, scale=1.2)
    q = random_dists(rng, (V_SEQ,), V_SEQ, zero_frac=0.25, scale=1.2)
    q = 0.5 * q + 0.5 * p * (rng.random(p.shape) > 0.2)  # related, so long accepted runs and bonuses happen
    return p, (q / q.sum(-1, keepdims=True)).astype(np.float32)


def _draft_round(ptab, qtab, last, out_pos, seeds):
    """Draft K_SEQ tokens per row from Q (position-keyed noise) -> (p [N,K+1,V], q [N,K,V], d [N,K])."""
    prev, ds, ps, qs = last, [], [], []
    for i in range(K_SEQ):
        q = qtab[prev]
        noise = jax.vmap(lambda s, g: exponential_noise(s, g, V_SEQ, PURPOSE_DRAFT))(seeds, out_pos + i)
        d = race(q, noise)
        ds.append(d), qs.append(q), ps.append(ptab[prev])
        prev = d
    ps.append(ptab[prev])
    return jnp.stack(ps, 1), jnp.stack(qs, 1), jnp.stack(ds, 1)


@jax.jit
def _round(ptab, qtab, last, out_pos, num_draft, seeds):
    """One speculative round per row through the engine's verification path."""
    p, q, d = _draft_round(ptab, qtab, last, out_pos, seeds)
    return verify_with_keys(p, q, d, num_draft, seeds, out_pos)


@jax.jit
def _buggy_round(ptab, qtab, last, out_pos, num_draft, seeds, bug):
    """The same round through the contract with one deliberate mistake, chosen by ``bug``
    (a traced index, so every variant shares one compilation)."""
    p, q, d = _draft_round(ptab, qtab, last, out_pos, seeds)
    u, e = acceptance_uniforms(seeds, out_pos, K_SEQ), target_noise(seeds, out_pos, K_SEQ + 1, V_SEQ)
    nd = jnp.clip(num_draft, 0, K_SEQ)
    acc = accepted_prefix(p, q, d, nd, u)
    rows = jnp.arange(p.shape[0])
    p_j, e_j = p[rows, acc], e[rows, acc]
    q_j = jnp.where((acc < nd)[:, None], q[rows, jnp.minimum(acc, K_SEQ - 1)], 0.0)
    bonus = (acc == nd)[:, None]
    variants = [
        # BUGS[0]: the bonus drawn from p at the previous position instead of p_n
        jnp.where(bonus & (nd > 0)[:, None], p[rows, jnp.maximum(acc - 1, 0)], jnp.maximum(p_j - q_j, 0.0)),
        p_j,  # BUGS[1]: the replacement drawn from p, as if q had not been subtracted
        jnp.abs(p_j - q_j),  # BUGS[2]: |p - q| instead of max(0, p - q)
    ]
    w = jnp.stack(variants)[bug]
    w = jnp.where(jnp.sum(w, -1, keepdims=True) > 0, w, p_j)
    return assemble(d, acc, race(w, e_j)), acc


BUGS = ["bonus_from_previous_position", "residual_without_q", "residual_abs"]


def _sample_sequences(bug: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """N_ROWS independent generations of N_TOKENS tokens after token 0, by speculative rounds
    with per-row draft counts 0..K_SEQ. Returns (sequences [N, N_TOKENS], exact probabilities
    of every sequence [V]*N_TOKENS)."""
    ptab, qtab = _bigram_tables()
    rows = np.arange(N_ROWS)
    seeds = np.stack([rows // 7, rows * 2654435761 % 2**32], 1).astype(np.uint32)
    num_draft = (rows % (K_SEQ + 1)).astype(np.int32)
    seq = np.zeros((N_ROWS, N_TOKENS + K_SEQ + 1), np.int32)
    length = np.zeros(N_ROWS, np.int32)
    last = np.zeros(N_ROWS, np.int32)
    while (length < N_TOKENS).any():
        if bug is None:
            result = _round(ptab, qtab, last, length, num_draft, seeds)
        else:
            result = _buggy_round(ptab, qtab, last, length, num_draft, seeds, BUGS.index(bug))
        out, acc = map(np.asarray, result)
        for i in range(K_SEQ + 1):
            write = (i <= acc) & (length < N_TOKENS)  # rows already done keep their sequence
            seq[write, length[write] + i] = out[write, i]
        done = length >= N_TOKENS
        last = np.where(done, last, out[rows, acc])
        length = np.where(done, length, length + acc + 1)
    exact = ptab[0].reshape((V_SEQ,) + (1,) * (N_TOKENS - 1)).astype(np.float64)
    for t in range(1, N_TOKENS):  # P(x_1..x_n) = P[0, x_1] * prod_t P[x_{t-1}, x_t]
        pair = [1] * N_TOKENS
        pair[t - 1], pair[t] = V_SEQ, V_SEQ
        exact = exact * ptab.reshape(pair)
    return seq[:, :N_TOKENS], exact


def _counts(seq: np.ndarray) -> np.ndarray:
    flat = np.ravel_multi_index(tuple(seq.T), (V_SEQ,) * N_TOKENS)
    return np.bincount(flat, minlength=V_SEQ**N_TOKENS)


def test_sequences_follow_the_target_distribution():
    seq, exact = _sample_sequences()
    assert chi2_pvalue(_counts(seq), exact) > 1e-3


@pytest.mark.parametrize("bug", BUGS)
def test_chi_square_catches_injected_bugs(bug):
    """With the exponential race, "not renormalised" cannot happen (argmax w/E ignores the scale)
    and an unclipped p - q picks the same winner as the clipped one whenever some entry is
    positive; the residual mistakes that do change the output are tested instead."""
    seq, exact = _sample_sequences(bug)
    assert chi2_pvalue(_counts(seq), exact) < 1e-6


# ------------------------------------------------------------ other implementations
@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_kernel_implementations_agree(backend):
    assert backend in verify.available_backends(), f"{backend} verification backend must import"
    fn = jax.jit(verify.get_backend(backend))
    rng = np.random.default_rng(8)
    b, k, v = 16, 3, 37
    p = random_dists(rng, (b, k + 1), v)
    p[:4] = one_hot(rng.integers(0, v, (4, k + 1)), v)  # greedy rows
    q = random_dists(rng, (b, k), v)
    q[:6] = one_hot(rng.integers(0, v, (6, k)), v)  # deterministic drafts (some with p(x) = 0)
    d = np.argmax(q + rng.random(q.shape) * 1e-3, -1).astype(np.int32)
    d[8:10] = rng.integers(0, v, (2, k))  # tokens with q(x) possibly 0
    nd = rng.integers(0, k + 1, b).astype(np.int32)
    u = rng.random((b, k)).astype(np.float32)
    e = rng.exponential(size=(b, k + 1, v)).astype(np.float32)
    e[0, :, :5] = 0.0  # exact-zero Exp(1) draws
    want = rule(p, q, d, nd, u, e)
    got = fn(jnp.asarray(p), jnp.asarray(q), jnp.asarray(d), jnp.asarray(nd), jnp.asarray(u), jnp.asarray(e))
    np.testing.assert_array_equal(np.asarray(want[1]), np.asarray(got[1]))
    np.testing.assert_array_equal(np.asarray(want[0]), np.asarray(got[0]))
