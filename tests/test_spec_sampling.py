"""Sampled speculative decoding end to end: whole generated sequences follow the
target's exact distribution (computed by teacher forcing), with top-k/top-p
respected, through the real engine, draft model and verification.

The vectorised tests in test_spec_verify.py carry the statistical power (tens of
thousands of sequences, injected bugs rejected); this is the engine-level run.
The models are test_spec_greedy.py's (same architecture and shapes, so the
compiled steps are shared when both files run in one process).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxspec.config import load_config
from jaxspec.engine import Engine, ModelRunner
from jaxspec.models import KVCache, create_model
from jaxspec.sampling import SamplingParams, logits_to_probs
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner, perturbed_copy
from jaxspec.tokenizer import ByteTokenizer

SLOTS, MAX_LEN = 8, 64
CFG = load_config("tiny-moe")
TARGET = create_model(CFG, 0)
DRAFT = perturbed_copy(TARGET, 0.15, seed=1)
PROMPT = [5, 77, 130, 9]
N_TOKENS, TOP_K = 4, 3
# Random-init logits are small; a low temperature makes p far from uniform over the top-k,
# so a wrong draw would show.
SETTINGS = dict(temperature=0.1, top_k=TOP_K, top_p=0.95)
NUM_SAMPLES = 1200


def exact_distribution(model, prompt: list[int], n: int, settings: dict) -> dict[tuple[int, ...], float]:
    """P(x_1..x_n | prompt) for every sequence of non-zero probability, by teacher forcing
    level by level (rows padded to one shape, so one compiled forward serves every level)."""
    rows_max = TOP_K ** (n - 1)
    length = len(prompt) + n - 1

    @jax.jit
    def conditionals(tokens, pos):
        out = model(tokens, jnp.zeros(tokens.shape[0], jnp.int32), KVCache.create(model.cfg, rows_max, length))
        logits = jnp.take_along_axis(out.logits, pos[:, None, None], axis=1)[:, 0]
        b = logits.shape[0]
        return logits_to_probs(logits, jnp.full(b, settings["temperature"]), jnp.full(b, settings["top_k"]),
                               jnp.full(b, settings["top_p"]), jnp.zeros(b))

    level = {(): 1.0}
    for t in range(n):
        prefixes = list(level)
        tokens = np.zeros((rows_max, length), np.int32)
        for r, pre in enumerate(prefixes):
            tokens[r, : len(prompt) + t] = prompt + list(pre)
        probs = np.asarray(conditionals(tokens, np.full(rows_max, len(prompt) + t - 1, np.int32)), np.float64)
        nxt = {}
        for r, pre in enumerate(prefixes):
            for tok in np.flatnonzero(probs[r] > 0):
                nxt[pre + (int(tok),)] = level[pre] * probs[r, tok]
        level = nxt
    return level


@pytest.mark.parametrize("paged", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["slot", "paged"])
def test_engine_sampled_sequences_follow_the_target_distribution(paged):
    # Paged: every sample shares the prompt's cached pages (prefix hits) with the others in flight.
    pages = dict(page_size=2, num_pages=SLOTS * MAX_LEN // 2) if paged else {}
    runner = SpeculativeRunner(ModelRunner(TARGET, SLOTS, MAX_LEN, **pages), DraftModelProposer(DRAFT),
                               num_speculative_tokens=2, k_max=8)
    engine = Engine(runner, ByteTokenizer(), max_waiting=NUM_SAMPLES)
    params = [SamplingParams(**SETTINGS, seed=10_000 + i, max_tokens=N_TOKENS, ignore_eos=True)
              for i in range(NUM_SAMPLES)]
    outs = engine.generate([PROMPT] * NUM_SAMPLES, params)
    seqs = [tuple(o.token_ids) for o in outs]
    assert all(len(s) == N_TOKENS for s in seqs)

    exact = exact_distribution(TARGET, PROMPT, N_TOKENS, SETTINGS)
    assert abs(sum(exact.values()) - 1) < 1e-5
    assert max(exact.values()) < 0.5, "degenerate target distribution: the test would have no power"
    outside = [s for s in seqs if s not in exact]
    assert not outside, f"sequences the filtered target cannot produce (top-k/top-p violated): {outside[:3]}"

    cells = sorted(exact, key=exact.get, reverse=True)
    counts = np.array([sum(1 for s in seqs if s == c) for c in cells], np.float64)
    expected = np.array([exact[c] for c in cells]) * NUM_SAMPLES
    big = expected >= 5  # pool rare sequences
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    pvalue = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"

    # Every kind of step happened: rejections, fully accepted runs (bonus tokens), drafts sampled.
    if paged:
        assert engine.pages.stats.hit_tokens > 0
    agg = engine.spec_stats
    assert 0.1 < agg.acceptance_rate < 0.95
    assert agg.accepted_per_position[1] > 0 and agg.num_accepted_tokens < agg.num_draft_tokens
    assert len(set(itertools.chain.from_iterable(seqs))) > TOP_K
