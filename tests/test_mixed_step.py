"""A long prompt's chunk and the running requests' decode step in one jitted call
(``jaxspec.engine.mixed_step``): the separate calls' results (to float32 rounding: a matmul over more
rows may sum in another order on some CPUs), the same greedy tokens, no compilation after warm-up."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import CompileCounter, scaled_model
from jaxspec.engine.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.models.kv_cache import KVCache
from jaxspec.models.transformer import Segment
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe")


def test_forward_segments_equals_the_segments_forwards_one_after_another(model):
    cfg, s, m = model.cfg, 4, 64
    rng = np.random.default_rng(0)
    first = model(jnp.asarray(rng.integers(3, 200, (1, 10)), jnp.int32), jnp.zeros(1, jnp.int32),
                  KVCache.create(cfg, s, m), jnp.array([0]), jnp.array([10]), kv_len=m)
    # Decode rows (one a padding row) and a padded prefill chunk for another slot.
    dec = Segment(jnp.array([[7], [0]], jnp.int32), jnp.array([10, 0], jnp.int32), jnp.array([0, s], jnp.int32),
                  jnp.array([1, 0], jnp.int32))
    pre = Segment(jnp.asarray(rng.integers(3, 200, (1, 8)), jnp.int32), jnp.array([0], jnp.int32),
                  jnp.array([1], jnp.int32), jnp.array([6], jnp.int32))
    a = model(*dec[:2], first.cache, *dec[2:], kv_len=m)
    b = model(*pre[:2], a.cache, *pre[2:], kv_len=m)
    (hd, hp), cache, load = model.forward_segments((dec, pre), first.cache, (m, m))
    close = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.logits(hd))[0], np.asarray(a.logits)[0], **close)
    np.testing.assert_allclose(np.asarray(model.logits(hp))[0, :6], np.asarray(b.logits)[0, :6], **close)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(b.cache.k), **close)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [11, 6, 0, 0])
    np.testing.assert_array_equal(np.asarray(load), np.asarray(a.expert_load) + np.asarray(b.expert_load))


def _serve(runner, prompts, late, params):
    """Two requests decoding, then ``late`` (a long prompt) arrives: greedy tokens per request."""
    eng = Engine(runner, ByteTokenizer(), eos_ids=[])
    ids = [eng.add_request(p, params) for p in prompts]
    got = {}
    for _ in range(3):
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    ids.append(eng.add_request(late, params))
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [got[i] for i in ids]


@pytest.mark.parametrize("paged", [False, True], ids=["slot", "paged"])
def test_chunks_run_with_decode_steps_and_outputs_equal_whole_prompt_prefill(model, paged):
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 250, size=n)] for n in (12, 20)]
    late = [int(t) for t in rng.integers(3, 250, size=100)]  # chunks of 32, 32, 32, 4
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    paging = dict(page_size=8) if paged else {}
    ref = _serve(make_runner(model, num_slots=4, max_len=256, **paging), prompts, late, params)
    runner = make_runner(model, num_slots=4, max_len=256, prefill_chunk=32, mixed_prefill="on", **paging)
    inner = runner.runner
    calls = []
    mixed = inner.prefill_with_decode
    inner.prefill_with_decode = lambda *a: calls.append(len(a[4])) or mixed(*a)
    assert _serve(runner, prompts, late, params) == ref
    assert calls == [2, 2, 2]  # the three full chunks, each with both running requests' decode


@pytest.mark.slow
@pytest.mark.parametrize("spec", [False, True], ids=["plain", "draft-k2"])
def test_no_compilation_after_warmup_with_mixed_steps(model, spec):
    kw = dict(spec_method="draft", draft=scaled_model("tiny-moe", seed=1), num_speculative_tokens=2) if spec else {}
    runner = make_runner(model, num_slots=2, max_len=64, prefill_chunk=16, page_size=8, mixed_prefill="on", **kw)
    assert (runner.target if spec else runner.runner).mixed_length == 16
    runner.warmup()
    counter = CompileCounter()
    eng = Engine(runner, ByteTokenizer(), eos_ids=[])
    rng = np.random.default_rng(2)
    for i, n in enumerate((5, 40, 9, 50, 33)):
        eng.add_request([int(t) for t in rng.integers(3, 250, size=n)],
                        SamplingParams(max_tokens=10, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True))
        eng.step()
    while eng.has_unfinished():
        eng.step()
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"


def test_mixing_is_on_where_asked_and_by_default_only_on_accelerators(model, monkeypatch):
    import jax

    assert make_runner(model, num_slots=2, max_len=64, prefill_chunk=16, mixed_prefill="off").runner.mixed_length is None
    assert make_runner(model, num_slots=2, max_len=64, prefill_chunk=16).runner.mixed_length is None  # CPU
    assert make_runner(model, num_slots=2, max_len=64, mixed_prefill="on").runner.mixed_length is None  # whole prompts
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert make_runner(model, num_slots=2, max_len=64, prefill_chunk=16).runner.mixed_length == 16
    with pytest.raises(ValueError, match="mixed_prefill must be one of"):
        make_runner(model, num_slots=2, max_len=64, mixed_prefill="yes")


@pytest.mark.parametrize("k,temperature", [(2, 0.0), (2, 0.8), (0, 0.0)], ids=["k2-greedy", "k2-sampled", "k0"])
def test_speculative_steps_verify_with_a_chunk_in_one_call_and_equal_the_separate_calls(model, k, temperature):
    """A fused draft model's drafting step (or, k = 0, its plain step) with a full chunk of a long prompt
    in the same target forward: every request's tokens equal those of the runner that prefills the
    chunk on its own, sampled ones too (the same keys drawn at the same positions)."""
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 250, size=n)] for n in (12, 20)]
    late = [int(t) for t in rng.integers(3, 250, size=100)]  # chunks of 32, 32, 32, 4
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=5, ignore_eos=True)
    draft = scaled_model("tiny-moe", seed=1)
    spec = dict(spec_method="draft", draft=draft, num_speculative_tokens=k, prefill_chunk=32, page_size=8)
    ref = _serve(make_runner(model, num_slots=4, max_len=256, mixed_prefill="off", **spec), prompts, late, params)
    runner = make_runner(model, num_slots=4, max_len=256, mixed_prefill="on", **spec)
    assert runner.fused
    calls, chunked = [], []
    mixed, fused = runner.prefill_with_decode, runner._run_fused

    def mix(chunk, slots, plan):
        out = mixed(chunk, slots, plan)
        if out is not None:
            calls.append((plan.kb, len(plan.slots)))
        return out

    def run_fused(*args):
        chunked.append(len(args) > 7 and bool(args[7]))
        return fused(*args)

    runner.prefill_with_decode, runner._run_fused = mix, run_fused
    assert _serve(runner, prompts, late, params) == ref
    assert calls == [(k, 2)] * 3  # the three full chunks, each with both running requests' step
    assert sum(chunked) == (3 if k else 0)  # a drafting step carried each chunk in its target forward
    if temperature == 0.0:
        plain = _serve(make_runner(model, num_slots=4, max_len=256, page_size=8), prompts, late, params)
        assert plain == ref
