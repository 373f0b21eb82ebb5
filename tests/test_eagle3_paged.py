"""EAGLE-3 heads over a paged KV cache, chunked prefill and the prefix cache: the head's one-layer
cache is paged with the target's page table (its forward through pages equals its forward through
slots), prompts are prefilled and absorbed in chunks, a request preempted when the pool runs dry is
recomputed exactly, cached prompt blocks are shared where the token after them agrees too, and
the engine drafts, accepts and emits exactly what it does with a slot cache and whole prompts,
with nothing compiled after warm-up."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CompileCounter
from jaxspec.config import load_config
from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.engine.request import FinishReason
from jaxspec.models import KVCache, create_model
from jaxspec.models.eagle3 import Eagle3Config, create_head
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpeculativeRunner, make_proposer
from jaxspec.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SLOTS, MAX_LEN, PAGE = 2, 64, 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _head_cfg(target_cfg, draft_vocab: int) -> Eagle3Config:
    return Eagle3Config(name="paged-head", hidden_size=target_cfg.d_model, target_hidden_size=target_cfg.d_model,
                        vocab_size=target_cfg.vocab_size, draft_vocab_size=draft_vocab, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128, aux_layers=(0, 1, target_cfg.num_layers), max_seq_len=MAX_LEN)


def test_head_forward_through_pages_equals_slots():
    """Absorbs (a prompt in two chunks, then a verification's positions) and a drafting step of
    three slots, through a slot cache and through a pool whose pages are handed out shuffled and
    interleaved between the slots: the same outputs, and each slot's positions land in its pages."""
    cfg = _head_cfg(load_config("tiny-moe"), 12)
    head = create_head(cfg, 3)
    rng = np.random.default_rng(0)
    n_pages = 3 * MAX_LEN // PAGE
    table = rng.permutation(n_pages).reshape(3, MAX_LEN // PAGE).astype(np.int32)
    slot = KVCache.create(cfg, 3, MAX_LEN)
    paged = KVCache.create(cfg, 3, MAX_LEN, num_pages=n_pages, page_size=PAGE)._replace(page_table=jnp.asarray(table))
    embed = jnp.asarray(rng.normal(size=(cfg.vocab_size, cfg.hidden_size)), jnp.float32)
    rows = jnp.array([2, 0, 1], jnp.int32)
    calls = [(0, 13, False), (13, 11, False), (24, 3, True), (27, 1, True)]  # (start, width, fed back)
    for start, width, fused in calls:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, width)), jnp.int32)
        feat = cfg.hidden_size if fused else cfg.feature_size
        hidden = jnp.asarray(rng.normal(size=(3, width, feat)), jnp.float32)
        starts = jnp.full(3, start, jnp.int32)
        out_s, slot = head(tokens, hidden, starts, slot, rows, embed, fused=fused, kv_len=64)
        out_p, paged = head(tokens, hidden, starts, paged, rows, embed, fused=fused, kv_len=64)
        np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_s), rtol=1e-6, atol=1e-6)
    # Slot s's position j sits at page table[s, j // PAGE], offset j % PAGE, in the pool.
    for s in range(3):
        for j in (0, 7, 8, 27):
            np.testing.assert_array_equal(np.asarray(paged.k[0, table[s, j // PAGE], j % PAGE]),
                                          np.asarray(slot.k[0, s, j]))


@pytest.fixture(scope="module")
def setup():
    target = create_model(load_config("tiny-moe"), 0)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 259, int(n)).tolist() for n in (37, 7, 20, 12)]
    plain = [o.token_ids for o in Engine(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN)), TOK, eos_ids=[])
             .generate(prompts, GREEDY)]
    return target, _head_for(target, plain), prompts, plain


def _head_for(target, outputs):
    """A head drafting among the four tokens the target emits most, its matrices scaled up so the
    drafts depend on the features and on the head's cache: accepted runs and rejections both happen."""
    ids = np.array(sorted(t for t, _ in collections.Counter(t for o in outputs for t in o).most_common(4)))
    head = create_head(_head_cfg(target.cfg, len(ids)), 5, d2t=ids - np.arange(len(ids)))
    for p in jax.tree.leaves(nnx.state(head, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if p[...].ndim > 1:
            p.set_value(p[...] * 7.5)
    return head


def _engine(target, head, fuse=True, **paging):
    runner = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, **paging), make_proposer("eagle3", head, target=target),
                               num_speculative_tokens=2, k_max=2, fuse=fuse)
    assert runner.fused_head == fuse
    return Engine(runner, TOK, eos_ids=[]), runner


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [True, False])
def test_paged_chunked_head_drafts_exactly_as_with_slots(setup, fuse):
    target, head, prompts, plain = setup
    ref, _ = _engine(target, head, fuse)
    assert [o.token_ids for o in ref.generate(prompts, GREEDY)] == plain
    want = (ref.spec_stats.num_accepted_tokens, ref.spec_stats.num_draft_tokens)
    assert 0 < want[0] < want[1], want

    engine, runner = _engine(target, head, fuse, page_size=PAGE, num_pages=16, prefill_chunk=16)
    prop = runner.proposer
    assert prop.cache.paged and prop.cache.num_pages == 16 and prop.cache.page_size == PAGE
    assert runner.prefill_chunk == 16
    runner.warmup()
    starts = []
    observe = prop.observe
    prop.observe = lambda rows, tokens, feats, start, *a: (starts.extend(np.asarray(start).tolist()),
                                                         observe(rows, tokens, feats, start, *a))
    counter = CompileCounter()
    done = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in done] == plain
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"
    assert {16, 32} <= set(starts), sorted(set(starts))  # the long prompts were absorbed in chunks
    # Same drafts accepted: the head's paged cache holds what its slot cache held.
    assert (engine.spec_stats.num_accepted_tokens, engine.spec_stats.num_draft_tokens) == want
    assert engine.pages.available == 16


@pytest.mark.slow
def test_preempted_requests_are_recomputed_exactly(setup):
    """A pool too small for every request at once: the newest is preempted, its head cache pages
    go back with the target's, and its recomputation (prompt and output prefilled again, in
    chunks, and absorbed by the head) continues exactly."""
    target, head, prompts, plain = setup
    engine, runner = _engine(target, head, page_size=PAGE, num_pages=10, prefill_chunk=16)
    done = engine.generate(prompts, GREEDY)
    assert all(o.finish_reason == FinishReason.LENGTH for o in done)
    assert [o.token_ids for o in done] == plain
    assert engine.num_preemptions > 0 and engine.spec_stats.num_accepted_tokens > 0
    assert engine.pages.available == 10


@pytest.mark.slow
def test_prefix_cache_shares_the_heads_pages_where_the_next_token_agrees(setup):
    """A prompt sharing three whole pages and the token after them with an earlier one reuses all
    three; one that agrees on the pages but not on that token reuses two (the head's entries of the
    third read it). Outputs stay plain decoding's, and the drafts accepted equal a run without the
    prefix cache: the shared pages hold the head's entries the new prompt would have written."""
    target = setup[0]
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 259, 3 * PAGE).tolist()
    first = shared + [5] + rng.integers(3, 259, 4).tolist()
    agree = shared + [5] + rng.integers(3, 259, 6).tolist()
    differ = shared + [6] + rng.integers(3, 259, 9).tolist()
    waves = [[first], [agree, differ]]
    plain = [[o.token_ids for o in Engine(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN)), TOK, eos_ids=[])
              .generate(w, GREEDY)] for w in waves]
    head = _head_for(target, [o for w in plain for o in w])
    stats = []
    for prefix in (True, False):
        runner = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, page_size=PAGE, num_pages=24, prefill_chunk=16),
                                   make_proposer("eagle3", head, target=target), num_speculative_tokens=2, k_max=2)
        engine = Engine(runner, TOK, eos_ids=[], prefix_caching=prefix)
        runner.warmup()
        counter = CompileCounter()
        done = [engine.generate(w, GREEDY) for w in waves]
        assert [[o.token_ids for o in d] for d in done] == plain
        assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"
        cached = [o.num_cached_tokens for d in done for o in d]
        assert cached == ([0, 3 * PAGE, 2 * PAGE] if prefix else [0, 0, 0]), cached
        stats.append((engine.spec_stats.num_accepted_tokens, engine.spec_stats.num_draft_tokens))
    assert stats[0] == stats[1] and 0 < stats[0][0] < stats[0][1], stats


def test_block_keys_cover_the_next_token():
    """``key_tokens=1``: a block's key changes with the token after it, and a prompt shares a
    cached block only where that token agrees (the block holding the last token never)."""
    from jaxspec.engine.pages import PagePool

    plain, keyed = PagePool(8, 4), PagePool(8, 4, key_tokens=1)
    a, b = list(range(10, 19)), list(range(10, 18)) + [99]  # two whole blocks, then 18 or 99
    assert plain.digests(a) == plain.digests(b) and len(plain.digests(a)) == 2
    da, db = keyed.digests(a), keyed.digests(b)
    assert len(da) == 2 and da[0] == db[0] and da[1] != db[1]
    assert len(keyed.digests(a[:8])) == 1  # the second block holds the last token
    res = keyed.reserve(a, 10)
    keyed.register(a, res)
    assert keyed.reserve(b, 10).cached_blocks == 1 and keyed.reserve(a + [7], 11).cached_blocks == 2
    with pytest.raises(ValueError, match="key_tokens"):
        PagePool(8, 4, key_tokens=-1)


def test_kv_memory_fraction_counts_the_heads_pages(monkeypatch):
    """``--kv-memory-fraction`` with an EAGLE-3 head: every page holds the target's layers and the
    head's one layer, and the head's weights come off the budget too."""
    from jaxspec import mesh
    from serving.build import EngineOptions, pages_for_memory_fraction

    target = create_model(load_config("tiny-moe"), 0)
    head = create_head(_head_cfg(target.cfg, 12), 1)
    opts = EngineOptions(model="tiny-moe", kv_cache="paged", page_size=PAGE, kv_memory_fraction=0.5, max_len=MAX_LEN)
    monkeypatch.setattr(mesh, "device_memory_bytes", lambda device: 64 << 20)
    weights = sum(x.nbytes for m in (target, head) for x in jax.tree.leaves(nnx.state(m)))
    page = sum(2 * c.num_layers * PAGE * c.num_kv_heads * c.head_dim * 4 for c in (target.cfg, head.cfg))
    assert pages_for_memory_fraction(opts, target, head) == int(((32 << 20) - weights) // page)
