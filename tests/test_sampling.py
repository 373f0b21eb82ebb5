"""Sampling: greedy determinism, seed reproducibility, filters never emit excluded tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.sampling import BatchSampling, SamplingError, SamplingParams, logits_to_probs, sample_tokens


def _sample_many(logits, params, n, seed=0):
    """n independent draws (distinct output positions) for one row."""
    bs = BatchSampling.from_params([params] * n, [seed] * n)
    return np.asarray(jax.jit(sample_tokens)(jnp.tile(logits[None], (n, 1)), bs, jnp.arange(n, dtype=jnp.int32)))


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=32) * 2.0, jnp.float32)


def test_greedy_is_argmax_and_deterministic():
    out = _sample_many(LOGITS, SamplingParams(temperature=0.0), 50, seed=1)
    assert set(out) == {int(jnp.argmax(LOGITS))}
    out2 = _sample_many(LOGITS, SamplingParams(temperature=0.0), 50, seed=2)
    assert (out == out2).all()


def test_seed_reproducible_and_seed_dependent():
    p = SamplingParams(temperature=1.0)
    a, b, c = (_sample_many(LOGITS, p, 200, seed=s) for s in (7, 7, 8))
    assert (a == b).all()
    assert (a != c).any()


def test_top_k_never_emits_excluded():
    out = _sample_many(LOGITS, SamplingParams(temperature=2.0, top_k=3), 500)
    allowed = set(np.argsort(-np.asarray(LOGITS))[:3].tolist())
    assert set(out.tolist()) <= allowed and len(set(out.tolist())) == 3


def test_top_p_never_emits_excluded():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    top_p = 0.6
    n_keep = int(np.searchsorted(mass, top_p) + 1)
    out = _sample_many(LOGITS, SamplingParams(temperature=1.0, top_p=top_p), 800)
    assert set(out.tolist()) <= set(order[:n_keep].tolist())
    assert len(set(out.tolist())) == n_keep


def test_min_p_never_emits_excluded():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    out = _sample_many(LOGITS, SamplingParams(temperature=1.0, min_p=0.2), 800)
    allowed = set(np.nonzero(probs >= 0.2 * probs.max())[0].tolist())
    assert set(out.tolist()) <= allowed


def test_sampled_frequencies_follow_distribution():
    probs = np.asarray(logits_to_probs(LOGITS, 1.3, 0, 1.0, 0.0))
    n = 4000
    out = _sample_many(LOGITS, SamplingParams(temperature=1.3), n, seed=3)
    freq = np.bincount(out, minlength=32) / n
    assert np.abs(freq - probs).max() < 4 * np.sqrt(probs.max() / n) + 1e-3


def test_logits_to_probs_rows_are_normalised_and_filtered():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16)), jnp.float32)
    p = np.asarray(logits_to_probs(logits, jnp.array([0.0, 1.0, 0.5, 2.0]), jnp.array([0, 4, 0, 0]),
                                   jnp.array([1.0, 1.0, 0.3, 1.0]), jnp.array([0.0, 0.0, 0.0, 0.3])))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert (p[0] > 0).sum() == 1 and p[0].argmax() == int(jnp.argmax(logits[0]))
    assert (p[1] > 0).sum() == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2.0}, "min_p"),
        ({"stop_strings": ("",)}, "stop_strings"),
    ],
)
def test_bad_sampling_params_name_the_problem(kwargs, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)
