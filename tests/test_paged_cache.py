"""Paged KV cache: the page pool, the paged forward, and engines over it (exact against the slot cache)."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CompileCounter, feed_in_blocks, full_forward, scaled_model
from jaxspec.engine.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.engine.pages import PagePool
from jaxspec.engine.request import InvalidRequestError
from jaxspec.models import KVCache
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer


# ----------------------------------------------------------------------------- the pool
def test_pool_reserves_whole_pages_and_refuses_what_does_not_fit():
    pool = PagePool(10, 4)
    a = pool.reserve(list(range(9)), 9)  # 3 pages
    assert len(a.pages) == 3 and a.cached_blocks == 0
    assert pool.available == 7
    assert pool.reserve(list(range(40)), 29) is None  # 8 pages: nothing taken
    assert pool.available == 7
    b = pool.reserve(list(range(100, 128)), 28)
    assert len(b.pages) == 7 and not set(a.pages) & set(b.pages)
    assert pool.available == 0
    pool.release(a)
    assert pool.available == 3


def test_pool_shares_full_prompt_blocks_but_never_the_last_tokens_block():
    pool = PagePool(32, 4)
    prompt = list(range(1, 14))  # 13 tokens: blocks 0..2 full, the 4th holds the last token
    a = pool.reserve(prompt, 20)
    pool.register(prompt, a)
    b = pool.reserve(prompt + [99, 98], 20)  # same first 3 blocks
    assert b.cached_blocks == 3 and b.pages[:3] == a.pages[:3]
    assert pool.refs[a.pages[0]] == 2
    # A prompt that is exactly 3 blocks long reuses only 2: its last token must run.
    c = pool.reserve(prompt[:12], 16)
    assert c.cached_blocks == 2
    # A different second block stops the match there.
    d = pool.reserve(prompt[:4] + [77] * 9, 16)
    assert d.cached_blocks == 1
    e = pool.reserve(prompt, 20, use_cache=False)
    assert e.cached_blocks == 0
    assert pool.stats.hit_tokens == (3 + 2 + 1) * 4


def test_pool_keeps_finished_prefixes_until_the_pages_are_needed_lru_first():
    pool = PagePool(6, 2)
    p1, p2 = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    a = pool.reserve(p1, 6)
    pool.register(p1, a)
    pool.release(a)
    b = pool.reserve(p2, 6)
    pool.register(p2, b)
    pool.release(b)
    assert pool.available == 6 and pool.cached_pages == 4
    again = pool.reserve(p1, 6)  # p1's blocks are still there
    assert again.cached_blocks == 2
    pool.release(again)
    # Needing every page evicts: p2's blocks (least recently used) go first.
    big = pool.reserve([50] * 11, 10)
    assert big is not None and pool.stats.evictions >= 2
    pool.release(big)
    assert pool.reserve(p2, 6).cached_blocks == 0


def test_pool_counts_unreferenced_cached_pages_it_would_revive():
    pool = PagePool(4, 2)
    p = [1, 2, 3, 4, 5]
    a = pool.reserve(p, 6)
    pool.register(p, a)
    pool.release(a)
    held = pool.reserve([9] * 3, 4)  # 2 fresh pages; the 2 cached ones stay
    assert held.cached_blocks == 0 and pool.available == 2
    # 3 pages: 2 revived from the cache + 1 fresh, but only 2 are left in all.
    assert pool.reserve(p, 6) is None
    assert pool.available == 2 and pool.cached_pages == 2


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen2-moe"])
def test_paged_forward_in_blocks_matches_full_forward(name):
    model = scaled_model(name)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, tokens, start, cache, slot_ids, num_valid):
        return nnx.merge(graphdef, state)(tokens, start, cache, slot_ids, num_valid, kv_len=48)

    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, model.cfg.vocab_size, size=n) for n in (30, 19)]
    refs = [full_forward(model, s) for s in seqs]
    cache = KVCache.create(model.cfg, 4, 48, num_pages=20, page_size=8)
    table = np.full((4, 6), 20, np.int32)
    table[2] = [7, 3, 11, 0, 19, 5]  # scattered, interleaved with slot 0's pages
    table[0, :4] = [1, 18, 2, 4]
    cache = cache._replace(page_table=jnp.asarray(table))
    got, cache = feed_in_blocks(fwd, state, cache, seqs, [2, 0], [5, 1, 7, 3, 8, 6, 2])
    for r in range(2):
        np.testing.assert_allclose(got[r], refs[r], atol=2e-5, rtol=2e-5)
    # The table is what addresses the pool: slot 2's first page really is page 7.
    assert float(jnp.abs(cache.k[:, 7]).sum()) > 0 and float(jnp.abs(cache.k[:, 6]).sum()) == 0


def test_paged_forward_drops_writes_of_padding_rows_and_unassigned_pages():
    model = scaled_model("tiny-moe")
    cache = KVCache.create(model.cfg, 2, 16, num_pages=4, page_size=4)
    table = np.full((2, 4), 4, np.int32)
    table[0, 0] = 1  # slot 0 owns one page; slot 1 none
    cache = cache._replace(page_table=jnp.asarray(table))
    out = model(jnp.ones((3, 6), jnp.int32), jnp.zeros((3,), jnp.int32), cache, jnp.array([0, 1, 2], jnp.int32))
    written = np.asarray(jnp.abs(out.cache.k).sum(axis=(0, 2, 3, 4)))
    assert written[1] > 0 and written[[0, 2, 3]].sum() == 0  # positions 4, 5 of slot 0 had no page


# ----------------------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def models():
    return scaled_model("tiny-moe"), scaled_model("tiny-moe", seed=1)


def _prompts(vocab: int, n: int = 7, shared: int = 37, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = list(rng.integers(3, vocab, size=shared))
    return [prefix + list(rng.integers(3, vocab, size=int(rng.integers(1, 25)))) for _ in range(n)]


def _run(model, prompts, params, **kw):
    prefix_caching = kw.pop("prefix_caching", True)
    eng = Engine(make_runner(model, num_slots=3, max_len=128, **kw), ByteTokenizer(), eos_ids=[],
                 prefix_caching=prefix_caching)
    done = eng.generate(prompts, params)
    return [c.token_ids for c in done], [c.num_cached_tokens for c in done], eng


@pytest.mark.parametrize("spec", [{}, {"spec_method": "draft", "num_speculative_tokens": 3},
                                  {"spec_method": "ngram", "num_speculative_tokens": 2}])
def test_paged_engine_output_equals_slot_cache_output_with_prefix_hits(models, spec):
    model, draft = models
    if spec.get("spec_method") == "draft":
        spec = {**spec, "draft": draft}
    prompts = _prompts(model.cfg.vocab_size)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ref, _, _ = _run(model, prompts, greedy, **spec)
    got, cached, eng = _run(model, prompts, greedy, page_size=8, num_pages=48, **spec)
    assert got == ref
    assert cached[0] == 0 and max(cached) == 32  # 37 shared tokens: 4 whole pages of 8
    assert eng.pages.stats.hit_tokens == sum(cached)
    sampled = [SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=i, ignore_eos=True)
               for i in range(len(prompts))]
    ref_s, _, _ = _run(model, prompts, sampled, **spec)
    got_s, _, _ = _run(model, prompts, sampled, page_size=8, num_pages=48, **spec)
    assert got_s == ref_s


def test_prefix_cache_off_and_per_request_opt_out(models):
    model, _ = models
    prompts = _prompts(model.cfg.vocab_size, n=4)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    _, cached, eng = _run(model, prompts, greedy, page_size=8, num_pages=48, prefix_caching=False)
    assert cached == [0] * 4 and eng.pages.cached_pages == 0
    eng = Engine(make_runner(model, num_slots=2, max_len=128, page_size=8, num_pages=48), ByteTokenizer(), eos_ids=[])
    eng.generate(prompts[:1], greedy)
    rid = eng.add_request(prompts[1], greedy, use_prefix_cache=False)
    hit = eng.add_request(prompts[2], greedy)
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, o.num_cached_tokens)
    assert outs[rid] == 0 and outs[hit] == 32


def test_reserved_admission_waits_for_pages_and_every_request_finishes(models):
    model, _ = models
    # 12 pages of 8: a request of 24 prompt + 16 output tokens needs 5, so with every page reserved
    # at admission two run at once although there are 6 slots.
    eng = Engine(make_runner(model, num_slots=6, max_len=64, page_size=8, num_pages=12), ByteTokenizer(), eos_ids=[],
                 prefix_caching=False, kv_admission="reserve")
    rng = np.random.default_rng(3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(list(rng.integers(3, 200, size=24)), params) for _ in range(6)]
    most, finished = 0, {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        most = max(most, eng.num_running)
        assert eng.pages.available >= 0
    assert most == 2
    assert set(finished) == set(ids)
    assert all(o.finish_reason.value == "length" and o.num_generated_tokens == 16 for o in finished.values())
    assert eng.pages.available == 12
    small = Engine(make_runner(model, num_slots=2, max_len=64, page_size=8, num_pages=4), ByteTokenizer(), eos_ids=[])
    with pytest.raises(InvalidRequestError, match="needs 5 KV pages of 8 positions; the pool holds 4"):
        small.add_request([5] * 30, SamplingParams(max_tokens=10))
    small.add_request([5] * 30, SamplingParams(max_tokens=2))  # 4 pages: fits


def test_no_compilation_after_warmup_with_pages_and_prefix_hits(models):
    model, draft = models
    counter = CompileCounter()
    runner = make_runner(model, num_slots=4, max_len=64, page_size=8, num_pages=20, spec_method="draft", draft=draft,
                         num_speculative_tokens=2)
    eng = Engine(runner, ByteTokenizer(), eos_ids=[])
    runner.warmup()
    before = counter.count
    rng = random.Random(0)
    shared = [rng.randrange(3, 200) for _ in range(20)]
    submitted = done = 0
    for step in range(80):
        if submitted < 16 and rng.random() < 0.5:
            tail = [rng.randrange(3, 200) for _ in range(rng.randint(1, 20))]
            eng.add_request((shared if rng.random() < 0.6 else []) + tail,
                            SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 10), seed=step))
            submitted += 1
        done += sum(o.finished for o in eng.step())
    while eng.has_unfinished():
        done += sum(o.finished for o in eng.step())
    assert done == submitted >= 8
    assert eng.pages.stats.hit_tokens > 0
    assert counter.count == before, f"{counter.count - before} compilation(s) after warm-up"


# ----------------------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("kw", [{}, {"page_size": 8, "num_pages": 64},
                                {"spec_method": "draft", "num_speculative_tokens": 2}])
def test_chunked_prefill_is_exact_and_interleaves_with_decoding(models, kw):
    model, draft = models
    if kw.get("spec_method") == "draft":
        kw = {**kw, "draft": draft}
    rng = np.random.default_rng(5)
    long_prompt = list(rng.integers(3, model.cfg.vocab_size, size=100))
    short = list(rng.integers(3, model.cfg.vocab_size, size=5))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref, _, _ = _run(model, [short, long_prompt], params, **kw)
    eng = Engine(make_runner(model, num_slots=3, max_len=128, prefill_chunk=16, **kw), ByteTokenizer(), eos_ids=[],
                 prefill_token_budget=16)
    a = eng.add_request(short, params)
    got = {a: [t for o in eng.step() for t in o.new_token_ids]}  # the short request is running
    b = eng.add_request(long_prompt, params)
    got[b] = []
    steps_while_prefilling = 0
    while eng.has_unfinished():
        outs = eng.step()
        steps_while_prefilling += bool(eng.prefilling)
        for o in outs:
            got[o.request_id] += o.new_token_ids
    assert steps_while_prefilling >= 100 // 16 - 1
    assert [got[a], got[b]] == ref


def test_chunked_prefill_gives_running_requests_tokens_every_step(models):
    model, _ = models
    rng = np.random.default_rng(6)
    eng = Engine(make_runner(model, num_slots=2, max_len=128, prefill_chunk=16), ByteTokenizer(), eos_ids=[],
                 prefill_token_budget=16)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a = eng.add_request(list(rng.integers(3, 200, size=4)), params)
    eng.step()
    eng.add_request(list(rng.integers(3, 200, size=110)), SamplingParams(max_tokens=4))
    per_step = []
    for _ in range(8):
        outs = eng.step()
        per_step.append(sum(len(o.new_token_ids) for o in outs if o.request_id == a))
    assert per_step == [1] * 8  # one decode token per step, every step, while 110 tokens prefill in 7 chunks


def test_pallas_backend_reads_pages_through_the_paged_kernel(models):
    """attention_backend="pallas" over a paged cache runs pallas_kernels.paged_attention (interpreted
    here) and decodes exactly what the XLA path decodes."""
    model, _ = models
    prompts = _prompts(model.cfg.vocab_size, n=3, shared=20)
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    def run(backend):
        runner = make_runner(model, num_slots=2, max_len=64, page_size=16, num_pages=8)
        runner.runner.set_backends(attention=backend)
        return [c.token_ids for c in Engine(runner, ByteTokenizer(), eos_ids=[]).generate(prompts, greedy)]

    import pallas_kernels.paged_attention as kernel

    calls = []
    real = kernel.paged_attention
    kernel.paged_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = run("pallas")
    finally:
        kernel.paged_attention = real
    assert calls and got == run("xla")


def test_serve_defaults_and_checks_for_the_cache_flags():
    from jaxspec.config import ConfigError
    from jaxspec.serve import options_from_args, parse_args

    engine, _ = options_from_args(parse_args([]))
    assert (engine.kv_cache, engine.page_size, engine.kv_pages, engine.prefix_cache, engine.max_step_tokens) == (
        "slot", 16, None, True, 512)
    engine, _ = options_from_args(parse_args(["--kv-cache", "paged", "--kv-pages", "100", "--no-prefix-cache",
                                              "--max-step-tokens", "64"]))
    assert (engine.kv_cache, engine.kv_pages, engine.prefix_cache, engine.max_step_tokens) == ("paged", 100, False, 64)
    with pytest.raises(ConfigError, match="page_size 24 must be >= 1 and divide max_len"):
        options_from_args(parse_args(["--kv-cache", "paged", "--page-size", "24", "--max-len", "100"]))
    assert engine.kv_admission == "optimistic"  # the default: pages as requests grow, preemption when dry
    engine, _ = options_from_args(parse_args(["--kv-cache", "paged", "--kv-admission", "reserve"]))
    assert engine.kv_admission == "reserve"
    with pytest.raises(ConfigError, match="kv_admission must be one of optimistic, reserve, got 'lazy'"):
        dataclasses.replace(engine, kv_admission="lazy").validate()


def test_bundle_engine_passes_the_admission_mode(models):
    from serving.build import bundle_engine

    model, _ = models
    runner = make_runner(model, num_slots=2, max_len=64, page_size=8, num_pages=16)
    for mode in ("optimistic", "reserve"):
        bundle = bundle_engine(runner, ByteTokenizer(), model_id="tiny", kv_admission=mode)
        assert bundle.engine.kv_admission == mode


def test_kv_memory_fraction_sizes_the_pool_from_device_memory(models, monkeypatch):
    from jaxspec import mesh
    from jaxspec.config import ConfigError
    from serving.build import EngineOptions, pages_for_memory_fraction

    model, draft = models
    opts = EngineOptions(model="tiny-moe", kv_cache="paged", page_size=8, kv_memory_fraction=0.5, max_len=128)
    opts.validate()
    with pytest.raises(ConfigError, match="needs a device that reports its memory"):
        pages_for_memory_fraction(opts, model, None)  # CPU: memory unknown
    monkeypatch.setattr(mesh, "device_memory_bytes", lambda device: 64 << 20)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    page = 2 * model.cfg.num_layers * 8 * model.cfg.num_kv_heads * model.cfg.head_dim * 4
    assert pages_for_memory_fraction(opts, model, None) == int(((32 << 20) - weights) // page)
    both = pages_for_memory_fraction(opts, model, draft)
    assert 0 < both < pages_for_memory_fraction(opts, model, None)
    # Pages split over a data axis of 2: each device holds one group, so the pool holds twice as many.
    from jax.sharding import Mesh
    from jaxspec.mesh import TP_RULES, Placement

    devs = np.asarray(jax.devices()[:8], dtype=object).reshape(2, 1, 4)
    split = Placement.create(Mesh(devs, ("data", "expert", "tensor")), TP_RULES)
    assert opts.slots % 2 == 0
    assert pages_for_memory_fraction(opts, model, None, split) == 2 * int(((32 << 20) - weights) // page)
    with pytest.raises(ConfigError, match="instead of --kv-pages"):
        EngineOptions(model="tiny-moe", kv_cache="paged", kv_pages=10, kv_memory_fraction=0.5).validate()


def test_kernel_selftest_checks_paged_attention_for_a_paged_runner(models):
    """On a paged runner with the pallas attention backend the self-test checks the paged kernel (not
    the slot one) and falls back to XLA when it disagrees."""
    from jaxspec import kernels
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.kernels import KernelCheck

    model, _ = models
    runner = ModelRunner(model, 2, 64, attention_backend="pallas", page_size=16, num_pages=8)
    seen = []

    def failing(*args, **kwargs):
        seen.append(kwargs.get("page_size"))
        return KernelCheck("paged_attention", False, "injected")

    passing = lambda *a, **k: KernelCheck("gmm", True, "")  # noqa: E731
    results = kernels.selftest(runner, force=True, checks={"paged_attention": failing, "gmm": passing})
    assert [r.kernel for r in results if r.kernel != "gmm"] == ["paged_attention"] and seen == [16]
    assert runner.statics.attention_backend == "xla"
