"""Optimistic admission over a paged KV cache: pages taken as requests grow, the newest request
preempted (and recomputed, exactly) when the pool runs dry; the up-front reservation as an option."""

import random

import numpy as np
import pytest

from helpers import CompileCounter, scaled_model
from jaxspec.engine.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.engine.pages import PagePool
from jaxspec.engine.request import FinishReason, InvalidRequestError
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def models():
    return scaled_model("tiny-moe"), scaled_model("tiny-moe", seed=1)


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = list(rng.integers(3, 200, size=9))  # two full pages of 4 shared by every prompt
    return [shared + list(rng.integers(3, 200, size=int(rng.integers(1, 12)))) for _ in range(n)]


def _run(model, prompts, params, num_pages, draft=None, overlap=False, **kw):
    spec = {"spec_method": "draft", "draft": draft, "num_speculative_tokens": 2} if draft is not None else {}
    eng = Engine(make_runner(model, num_slots=4, max_len=64, page_size=4, num_pages=num_pages, **spec),
                 ByteTokenizer(), eos_ids=[], overlap=overlap, **kw)
    done = eng.generate(prompts, params)
    assert all(c.finish_reason == FinishReason.LENGTH for c in done)
    return [c.token_ids for c in done], eng, done


# ----------------------------------------------------------------------------- the pool
def test_pool_extends_reservations_and_keeps_a_watermark():
    pool = PagePool(8, 4)
    a = pool.reserve(list(range(6)), 7)  # 2 pages
    assert pool.extend(a, 7) and len(a.pages) == 2  # already covered: nothing taken
    assert pool.extend(a, 13) and len(a.pages) == 4 and pool.available == 4
    assert pool.reserve(list(range(9)), 9, keep_free=2) is None  # 3 pages would leave 1 < 2
    assert pool.available == 4
    b = pool.reserve(list(range(9)), 9, keep_free=1)
    assert not pool.extend(b, 17) and len(b.pages) == 3  # 2 more, 1 available: nothing taken
    pool.release(a)
    pool.release(b)
    assert pool.available == 8 and not pool.refs.any()


# ------------------------------------------------------------------------ preemption
def test_tiny_pool_preempts_and_outputs_equal_a_big_pool(models):
    model, _ = models
    prompts = _prompts()
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref, big, _ = _run(model, prompts, greedy, 96)
    assert big.num_preemptions == 0
    # 4 slots of up to 40 positions (10 pages each) in 16 pages: some must give way mid-generation.
    got, eng, done = _run(model, prompts, greedy, 16)
    assert got == ref
    assert eng.num_preemptions > 0 and sum(c.num_preemptions for c in done) == eng.num_preemptions
    assert eng.pages.available == 16 and not eng._preempted


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_preempted_sampling_and_overlapped_steps_are_exact(models, overlap):
    model, _ = models
    prompts = _prompts(seed=3)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    if overlap:
        ref, _, _ = _run(model, prompts, greedy, 96, overlap=True)
        got, eng, _ = _run(model, prompts, greedy, 16, overlap=True)
        assert got == ref and eng.num_preemptions > 0
    # Sampling: a recomputed request draws its next tokens at the same (seed, position).
    sampled = [SamplingParams(max_tokens=20, temperature=0.9, top_k=30, seed=i, ignore_eos=True)
               for i in range(len(prompts))]
    ref_s, _, _ = _run(model, prompts, sampled, 96, overlap=overlap)
    got_s, eng_s, _ = _run(model, prompts, sampled, 16, overlap=overlap)
    assert got_s == ref_s and eng_s.num_preemptions > 0


@pytest.mark.slow
def test_draft_model_engine_preempts_exactly(models):
    model, draft = models
    prompts = _prompts(seed=1)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref, big, _ = _run(model, prompts, greedy, 96, draft=draft)
    assert big.num_preemptions == 0
    got, eng, done = _run(model, prompts, greedy, 16, draft=draft)
    assert got == ref
    assert eng.num_preemptions > 0
    # The target as its own draft: a recomputed draft cache proposes exactly as before.
    _, big, _ = _run(model, prompts, greedy, 96, draft=model)
    _, eng, _ = _run(model, prompts, greedy, 16, draft=model)
    assert eng.num_preemptions > 0
    assert eng.spec_stats.acceptance_rate == big.spec_stats.acceptance_rate > 0.9


def test_optimistic_admission_runs_more_at_once_than_reservation(models):
    model, _ = models
    prompts = _prompts(n=6, seed=2)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    most = {}
    for mode in ("reserve", "optimistic"):
        eng = Engine(make_runner(model, num_slots=4, max_len=64, page_size=4, num_pages=16), ByteTokenizer(),
                     eos_ids=[], kv_admission=mode)
        for p in prompts:
            eng.add_request(p, greedy)
        most[mode] = 0
        while eng.has_unfinished():
            eng.step()
            most[mode] = max(most[mode], eng.num_running)
        if mode == "reserve":
            assert eng.num_preemptions == 0
    assert most["reserve"] < most["optimistic"] == 4


def test_requests_that_cannot_fit_an_empty_pool_are_refused_by_name(models):
    model, _ = models
    eng = Engine(make_runner(model, num_slots=2, max_len=64, page_size=4, num_pages=6), ByteTokenizer(), eos_ids=[])
    with pytest.raises(InvalidRequestError, match="needs 7 KV pages of 4 positions; the pool holds 6") as e:
        eng.add_request([5] * 10, SamplingParams(max_tokens=16))
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request([5] * 30, SamplingParams(max_tokens=1))
    assert e.value.field == "prompt"
    # One that fits the whole pool alone runs to the end, however the others crowd it.
    rid = eng.add_request([5] * 10, SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True))
    eng.add_request([6] * 10, SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True))
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    assert all(o[-1].finish_reason == FinishReason.LENGTH for o in outs.values())
    assert sum(len(x.new_token_ids) for x in outs[rid]) == 14
    assert eng.num_preemptions > 0


def test_abort_of_a_preempted_request_keeps_its_output(models):
    model, _ = models
    eng = Engine(make_runner(model, num_slots=2, max_len=64, page_size=4, num_pages=8), ByteTokenizer(), eos_ids=[])
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    eng.add_request([5] * 10, params)
    late = eng.add_request([6] * 10, params)
    got = []
    while late not in eng._preempted:
        got += [t for o in eng.step() if o.request_id == late for t in o.new_token_ids]
    assert got and eng.waiting[0].request_id == late
    out = eng.abort(late)
    assert out.finished and out.num_generated_tokens == len(got) and out.num_preemptions == 1
    # The response carries the count (gRPC usage).
    from serving.protocol import merge_outputs
    assert merge_outputs([out], with_spec=False).usage.preemptions == 1
    assert late not in eng._preempted and not eng.waiting


@pytest.mark.slow
def test_no_compilation_after_warmup_with_preemption(models):
    model, draft = models
    counter = CompileCounter()
    runner = make_runner(model, num_slots=4, max_len=64, page_size=4, num_pages=20, spec_method="draft", draft=draft,
                         num_speculative_tokens=2)
    eng = Engine(runner, ByteTokenizer(), eos_ids=[])
    runner.warmup()
    before = counter.count
    rng = random.Random(0)
    for i in range(8):
        eng.add_request([rng.randrange(3, 200) for _ in range(rng.randint(3, 16))],
                        SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(12, 30), seed=i,
                                       ignore_eos=True))
    done = 0
    while eng.has_unfinished():
        done += sum(o.finished for o in eng.step())
    assert done == 8 and eng.num_preemptions > 0
    assert counter.count == before, f"{counter.count - before} compilation(s) after warm-up"
