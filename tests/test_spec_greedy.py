"""Speculation changes speed, never output: greedy speculative decoding through the
engine equals plain greedy decoding of the target token for token, for every
proposer, k, batch size and draft quality; verification logits equal step-by-step
decoding; stops inside accepted runs land exactly where plain decoding stops.

Target: tiny-moe (MoE, 2 layers). Drafts share its architecture (one compiled
draft loop per k serves them all): an identical copy (everything accepted), a
noisy copy (partial acceptance) and an unrelated random model (almost nothing
accepted); one dense draft checks the mixed pairing.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import CompileCounter
from jaxspec.config import load_config
from jaxspec.engine import Engine, FinishReason, InvalidRequestError, ModelRunner, PlainRunner
from jaxspec.models import KVCache, create_model
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import (
    CostModel,
    DraftModelProposer,
    NgramProposer,
    NoProposer,
    SpeculativeRunner,
    perturbed_copy,
)
from jaxspec.tokenizer import ByteTokenizer

SLOTS, MAX_LEN, K_MAX = 8, 64, 8
TOK = ByteTokenizer()
CFG = load_config("tiny-moe")
TARGET = create_model(CFG, 0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@functools.cache
def draft(kind: str):
    if kind == "identical":
        return perturbed_copy(TARGET, 0.0)
    if kind == "noisy":
        return perturbed_copy(TARGET, 0.15, seed=1)
    if kind == "unrelated":
        return create_model(CFG, 7)
    if kind == "dense":
        return create_model(load_config("tiny-dense").replace(num_layers=1, name="tiny-dense-1l"), 3)
    raise KeyError(kind)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = []
    for n in (3, 5, 7, 9, 11, 13, 6, 4):
        base = rng.integers(3, CFG.vocab_size, n).tolist()
        out.append(base + base[: n // 2])  # a repeat gives prompt lookup something to find
    return out


PROMPTS = _prompts()


def proposer(kind: str):
    if kind == "ngram":
        return NgramProposer()
    if kind == "none":
        return NoProposer()
    return DraftModelProposer(draft(kind))


def spec_runner(kind: str, k, slots: int = SLOTS, **kw) -> SpeculativeRunner:
    return SpeculativeRunner(ModelRunner(TARGET, slots, MAX_LEN), proposer(kind), num_speculative_tokens=k,
                             k_max=K_MAX, **kw)


def generate(runner, prompts, params, concurrent: bool = True):
    """Completions (and the engine); concurrent=False feeds one request at a time (batch size 1)."""
    engine = Engine(runner, TOK)
    if concurrent:
        return engine.generate(prompts, params), engine
    return [engine.generate([p], params)[0] for p in prompts], engine


@functools.cache
def plain_tokens(params: SamplingParams, slots: int = SLOTS) -> tuple[tuple[int, ...], ...]:
    outs, _ = generate(PlainRunner(ModelRunner(TARGET, slots, MAX_LEN)), PROMPTS, params)
    return tuple(tuple(o.token_ids) for o in outs)


def assert_same_as_plain(outs, params=GREEDY):
    want = plain_tokens(params)
    for i, o in enumerate(outs):
        assert tuple(o.token_ids) == want[i], f"prompt {i}: {o.token_ids} != {list(want[i])}"


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("k", [1, 2, 4, 8, "auto"])
@pytest.mark.parametrize("kind", ["noisy", "ngram"])
def test_greedy_equals_plain(kind, k):
    runner = spec_runner(kind, k)
    outs, engine = generate(runner, PROMPTS, GREEDY)  # batch of 8
    assert_same_as_plain(outs)
    stats = engine.spec_stats
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    if k != "auto":
        assert stats.num_draft_tokens > 0
    outs, _ = generate(spec_runner(kind, k), PROMPTS, GREEDY, concurrent=False)  # one request at a time
    assert_same_as_plain(outs)


@pytest.mark.parametrize("kind", ["identical", "unrelated", "dense"])
def test_greedy_equals_plain_any_draft(kind):
    for k in (4, "auto") if kind != "dense" else (4,):  # auto would compile every bucket for the dense draft
        outs, engine = generate(spec_runner(kind, k), PROMPTS, GREEDY)
        assert_same_as_plain(outs)
        if kind == "identical":
            assert engine.spec_stats.acceptance_rate == 1.0


@pytest.mark.slow
def test_greedy_equals_plain_single_slot_engine():
    """A true one-slot engine (its own compiled shapes); the tests above run batch size 1
    as one request at a time in the 8-slot engine."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs, _ = generate(spec_runner("noisy", 4, slots=1), PROMPTS[:3], params)
    plain, _ = generate(PlainRunner(ModelRunner(TARGET, 1, MAX_LEN)), PROMPTS[:3], params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]


def test_none_method_reproduces_plain_decoding_exactly():
    """k = 0 through the speculative loop: the same tokens as plain decoding, greedy and seeded sampled."""
    sampled = [SamplingParams(temperature=t, top_k=tk, seed=100 + i, max_tokens=12, ignore_eos=True)
               for i, (t, tk) in enumerate([(1.0, 0), (0.7, 5), (1.3, 0), (0.0, 0)] * 2)]
    outs, engine = generate(spec_runner("none", 0), PROMPTS, sampled)
    plain, _ = generate(PlainRunner(ModelRunner(TARGET, SLOTS, MAX_LEN)), PROMPTS, sampled)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert engine.spec_stats.num_draft_tokens == 0


def test_verification_logits_equal_step_by_step_decoding():
    """The target's logits over a k+1 block (padded rows, MoE routing over the whole
    block) equal feeding the same tokens one at a time."""
    runner = ModelRunner(TARGET, 4, MAX_LEN)
    fwd = jax.jit(runner.forward_fn())
    rng = np.random.default_rng(1)
    prompt_len, k = 6, 4
    ctx = rng.integers(3, CFG.vocab_size, (4, prompt_len + k + 1)).astype(np.int32)
    cache = KVCache.create(CFG, 4, MAX_LEN)
    for i in range(prompt_len):
        cache = fwd(runner.state, ctx[:, i : i + 1], np.full(4, i, np.int32), cache).cache
    start = np.full(4, prompt_len, np.int32)
    num_valid = np.array([k + 1, 3, 1, 0], np.int32)  # several k per row, and a padding row
    block = fwd(runner.state, ctx[:, prompt_len:], start, cache, None, num_valid)
    step_cache, steps = cache, []
    for i in range(k + 1):
        out = fwd(runner.state, ctx[:, prompt_len + i : prompt_len + i + 1], start + i, step_cache)
        step_cache = out.cache
        steps.append(np.asarray(out.logits[:, 0]))
    steps = np.stack(steps, 1)
    for row in range(3):
        n = num_valid[row]
        np.testing.assert_allclose(np.asarray(block.logits)[row, :n], steps[row, :n], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(block.cache.lengths), start + num_valid)


# --------------------------------------------------------------------- stop handling
def _first_occurrence_inside_a_run(plain, run: int) -> tuple[int, int]:
    """(row, index) of a token that first appears at that index, not at the end of a run
    (token 0 comes from prefill, then runs of `run` tokens)."""
    for row, toks in enumerate(plain):
        for at in range(2, len(toks) - 1):
            if (at - 1) % run != run - 1 and toks[at] not in toks[:at]:
                return row, at
    raise AssertionError("no suitable stop token in the plain outputs")


def test_stops_inside_an_accepted_run():
    """EOS and a stop token inside an accepted run (identical draft, k=4: runs of 5) end
    the output exactly where plain decoding ends it; so does max_tokens (the runner never
    drafts past max_tokens, so that one lands on a run's end)."""
    plain = plain_tokens(GREEDY)
    row, at = _first_occurrence_inside_a_run(plain, 5)
    tok = plain[row][at]
    cases = [
        (SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=(tok,)), FinishReason.STOP, {}),
        (SamplingParams(temperature=0.0, max_tokens=24), FinishReason.EOS, dict(eos_ids=(tok,))),
        (SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), FinishReason.LENGTH, {}),
    ]
    for params, reason, engine_kw in cases:
        engine = Engine(spec_runner("identical", 4), TOK, **engine_kw)
        (out,) = engine.generate([PROMPTS[row]], params)
        want = list(plain[row][:7]) if reason == FinishReason.LENGTH else list(plain[row][:at])
        assert out.token_ids == want and out.finish_reason == reason
        if reason != FinishReason.LENGTH:
            assert out.stop_match == tok
            assert engine.spec_stats.num_accepted_tokens > len(want) - 1  # the run went past the stop


# ---------------------------------------------------------------- per-request k, stats
def test_per_request_override_and_stats():
    runner = spec_runner("identical", "auto", cost_model=_cheap_draft_costs())
    engine = Engine(runner, TOK)
    ks = [0, 1, 3, 50, None, 2, 0, 8]
    ids = [engine.add_request(p, GREEDY, num_speculative_tokens=k) for p, k in zip(PROMPTS, ks)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
            if o.finished:
                final[o.request_id] = o
    assert [tuple(tokens[i]) for i in ids] == list(plain_tokens(GREEDY))
    by_k = {k: final[i].spec for i, k in zip(ids, ks)}
    assert by_k[0].num_draft_tokens == 0
    assert len(by_k[1].drafted_per_position) == 1
    assert len(by_k[3].drafted_per_position) == 3
    assert len(by_k[50].drafted_per_position) == K_MAX  # bounded by k_max
    assert by_k[8].acceptance_rate == 1.0 and by_k[8].mean_acceptance_length > 4
    agg = engine.spec_stats
    assert agg.num_draft_tokens == sum(o.spec.num_draft_tokens for o in final.values())
    assert agg.acceptance_per_position[0] == 1.0
    assert agg.num_steps > 0 and agg.verify_time_s > 0 and agg.draft_time_s > 0
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        engine.add_request(PROMPTS[0], GREEDY, num_speculative_tokens=-1)


def _cheap_draft_costs() -> CostModel:
    """Synthetic costs under which speculating is worth it (draft nearly free). Held fixed
    (no refinement from observed step times, which a loaded machine makes arbitrary), so the
    policy's choices depend on acceptance alone."""
    buckets = [1, 2, 4, 8]
    return CostModel({0: 0.0, **{b: 1e-4 * b for b in buckets}}, {0: 1e-2, **{b: 1e-2 * (1 + 0.02 * b) for b in buckets}},
                     smoothing=0.0)


# ------------------------------------------------------- adaptive k and batch mixing
def test_adaptive_backs_off_with_an_unrelated_draft_and_stays_exact():
    """Almost nothing is accepted: the policy turns speculation off (kb = 0) except for
    probes, which catch the lagging draft cache up first — output still exact."""
    runner = spec_runner("unrelated", "auto", cost_model=_cheap_draft_costs(), probe_every=4)
    outs, engine = generate(runner, PROMPTS, GREEDY)
    assert_same_as_plain(outs)
    assert runner.bucket_steps[0] > sum(n for kb, n in runner.bucket_steps.items() if kb > 0)
    runner = spec_runner("identical", "auto", cost_model=_cheap_draft_costs())
    outs, engine = generate(runner, PROMPTS, GREEDY)
    assert_same_as_plain(outs)
    assert runner.bucket_steps[K_MAX] >= runner.bucket_steps[0]


def test_draft_catches_up_after_steps_without_drafting():
    """Drafting far too expensive: the draft is skipped except for probes, each of which
    first feeds the draft the tokens it missed. An identical draft that caught up
    correctly proposes exactly the target's tokens: every probe is fully accepted."""
    buckets = [1, 2, 4, 8]
    expensive = CostModel({0: 0.0, **{b: 1.0 * b for b in buckets}}, {0: 1e-2, **{b: 1e-2 for b in buckets}},
                          smoothing=0.0)
    runner = spec_runner("identical", "auto", cost_model=expensive, probe_every=3)
    outs, engine = generate(runner, PROMPTS, GREEDY)
    assert_same_as_plain(outs)
    assert runner.bucket_steps[0] > 0 and engine.spec_stats.num_draft_tokens > 0
    assert engine.spec_stats.acceptance_rate == 1.0


def test_a_probe_catches_up_and_drafts_for_one_request_while_several_run():
    """With speculation off, a draft model's probe is a step over the running request with the
    shortest context alone: only that request's draft is fed (the others wait out one step instead
    of each catching up), and the output stays plain decoding's."""
    buckets = [1, 2, 4, 8]
    expensive = CostModel({0: 0.0, **{b: 1.0 * b for b in buckets}}, {0: 1e-2, **{b: 1e-2 for b in buckets}},
                          smoothing=0.0)
    runner = spec_runner("identical", "auto", cost_model=expensive, probe_every=3)
    events, plan_fn = [], runner.spec.plan

    def plan(slots, act, steps=1):
        p = plan_fn(slots, act, steps)
        events.append(("plan", len(act), p.slots.tolist(), p.kb))
        return p

    runner.spec.plan = plan
    prop = runner.proposer
    feed = prop._feed
    prop._feed = lambda slot, ids, start=0: events.append(("feed", slot)) or feed(slot, ids, start)
    outs, engine = generate(runner, PROMPTS, GREEDY)
    assert_same_as_plain(outs)
    probes = [e for e in events if e[0] == "plan" and e[3] > 0]
    assert probes and all(len(e[2]) == 1 for e in probes)
    assert any(e[1] > 1 for e in probes)  # while several requests ran
    last_probe = None
    for e in events:
        if e[0] == "plan" and e[3] > 0:
            last_probe = e[2][0]
        elif e[0] == "feed":
            assert e[1] == last_probe  # only the probed request's draft catches up
    assert engine.spec_stats.acceptance_rate == 1.0


def test_slot_cache_draft_gets_the_prompt_at_its_first_drafting_step_in_one_call():
    """With a slot cache the draft is not fed at prefill (a request that never drafts never pays
    for it); one request running, the first probe feeds its prompt and every token since in one
    prefill-shaped call, later probes the tokens since the last. An identical draft fed right
    proposes exactly the target's tokens: every probe is fully accepted."""
    buckets = [1, 2, 4, 8]
    expensive = CostModel({0: 0.0, **{b: 1.0 * b for b in buckets}}, {0: 1e-2, **{b: 1e-2 for b in buckets}},
                          smoothing=0.0)
    runner = spec_runner("identical", "auto", cost_model=expensive, probe_every=3)
    engine = Engine(runner, TOK)
    prop = runner.proposer
    feeds, feed = [], prop._feed
    prop._feed = lambda slot, ids, start=0: feeds.append((slot, start, len(ids))) or feed(slot, ids, start)
    chunks, extend = [], prop._extend
    prop._extend = lambda: chunks.append(1) or extend()
    fed_at_prefill, prefill = [], prop.prefill

    def counted_prefill(*args, **kw):
        before = len(feeds)
        prefill(*args, **kw)
        fed_at_prefill.append(len(feeds) - before)

    prop.prefill = counted_prefill
    for i, prompt in enumerate(PROMPTS[:3]):
        before = len(feeds)
        engine.add_request(prompt, GREEDY, request_id=f"r{i}")
        tokens = []
        while engine.has_unfinished():
            tokens += [t for out in engine.step() for t in out.new_token_ids]
        assert tuple(tokens) == plain_tokens(GREEDY)[i]
        mine = feeds[before:]
        assert mine and mine[0][1] == 0 and mine[0][2] >= len(prompt)  # the whole prompt at once
        assert all(a[2] <= b[1] for a, b in zip(mine, mine[1:]))  # never feeds a position twice
    assert fed_at_prefill == [0, 0, 0]
    assert len(chunks) == len(feeds)  # every catch-up was one call for the one lagging slot
    assert engine.spec_stats.num_draft_tokens > 0 and engine.spec_stats.acceptance_rate == 1.0


@pytest.mark.parametrize("kind", ["noisy", "ngram"])
def test_no_compilation_after_warmup(kind):
    """After ``warmup`` no step compiles again, whatever the mix: every proposal bucket, k = 0
    steps (the plain decode step), draft catch-up after them, greedy and sampled rows,
    requests joining and leaving. A compile mid-serving is a multi-second stall."""
    # Weights committed to the device, as loaded from a checkpoint: jit outputs (the drafts) are
    # then committed too, and a warm-up with host arrays in their place compiled other variants.
    def committed(model):
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))

    drafter = DraftModelProposer(committed(draft(kind))) if kind != "ngram" else NgramProposer()
    runner = SpeculativeRunner(ModelRunner(committed(TARGET), SLOTS, MAX_LEN), drafter, num_speculative_tokens="auto",
                               k_max=K_MAX, cost_model=_cheap_draft_costs(), probe_every=2)
    engine = Engine(runner, TOK)
    runner.warmup()
    counter = CompileCounter()
    ks = [0, 1, 2, 4, 8, None, 3, None, 0, 5]
    for i, k in enumerate(ks):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=6 + i, ignore_eos=True)
        engine.add_request(PROMPTS[i % len(PROMPTS)], params, num_speculative_tokens=k)
        if i % 3 == 2:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    used = {kb for kb, n in runner.bucket_steps.items() if n}
    # A model drafter drafts every bucket asked for; a lookup only where it finds a match.
    assert used >= {0, 1, 2, 4, 8} if kind == "noisy" else (0 in used and len(used) >= 2), used
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"


def test_measured_costs_cover_every_bucket():
    runner = spec_runner("noisy", "auto", measure_reps=1)
    costs = runner.measure_costs(reps=1)
    assert sorted(costs.verify_s) == [0, *runner.buckets]
    assert all(t > 0 for t in costs.verify_s.values()) and costs.draft_s[0] == 0.0
    # Fused, a step's time holds its draft; split, the draft loop is timed on its own.
    assert runner.fused and all(costs.draft_s[kb] == 0.0 for kb in runner.buckets)
    split = spec_runner("noisy", "auto", measure_reps=1, fuse=False).measure_costs(reps=1)
    assert all(split.draft_s[kb] > 0 for kb in runner.buckets)


def test_sampled_requests_do_not_depend_on_batch_composition():
    """A seeded request gives the same tokens alone and in a mixed greedy/sampled batch,
    in a different slot (fixed k, so the compiled shapes are the same)."""
    mixed = [SamplingParams(temperature=[0.0, 1.0, 0.8][i % 3], top_p=[1.0, 0.9][i % 2], seed=1000 + i,
                            max_tokens=16, ignore_eos=True) for i in range(len(PROMPTS))]
    batch, _ = generate(spec_runner("noisy", 4), PROMPTS, mixed)
    for i in (1, 4, 5):
        alone, _ = generate(spec_runner("noisy", 4), [PROMPTS[i]], [mixed[i]])
        assert alone[0].token_ids == batch[i].token_ids
    for i in (0, 3, 6):  # the greedy members of the mixed batch
        assert tuple(batch[i].token_ids) == plain_tokens(GREEDY)[i][:16]


def test_kernel_backend_through_the_runner_matches_the_xla_path():
    """The runner's full-tensor path (uniforms and [B, K+1, V] noise handed to the kernel
    engineer's reference implementation) emits exactly what the XLA path emits."""
    from jaxspec.speculative.verify import available_backends

    assert "reference" in available_backends(), "pallas_kernels.rejection_sampling_reference must import"
    mixed = [SamplingParams(temperature=[0.0, 1.0, 0.8][i % 3], top_k=[0, 20][i % 2], seed=2000 + i, max_tokens=12,
                            ignore_eos=True) for i in range(len(PROMPTS))]
    xla, _ = generate(spec_runner("noisy", 4), PROMPTS, mixed)
    ref, _ = generate(spec_runner("noisy", 4, verify_backend="reference"), PROMPTS, mixed)
    assert [o.token_ids for o in ref] == [o.token_ids for o in xla]


def test_fused_step_equals_the_two_call_step():
    """A single-device draft model runs fused into the verification (one call per step); the
    two-call path (draft loop, then verification) emits exactly the same tokens, sampled too."""
    mixed = [SamplingParams(temperature=[0.0, 1.0, 0.7][i % 3], top_k=[0, 20][i % 2], seed=3000 + i, max_tokens=12,
                            ignore_eos=True) for i in range(len(PROMPTS))]
    fused_runner, split_runner = spec_runner("noisy", 4), spec_runner("noisy", 4, fuse=False)
    assert fused_runner.fused and not split_runner.fused
    fused, engine = generate(fused_runner, PROMPTS, mixed)
    split, _ = generate(split_runner, PROMPTS, mixed)
    assert [o.token_ids for o in fused] == [o.token_ids for o in split]
    assert engine.spec_stats.num_draft_tokens > 0 and fused_runner.bucket_steps[4] > 0


def test_speculation_counters_come_on_the_final_output():
    """A request's speculation counters are copied once, onto its final output (what the server,
    metrics and generate read), not onto every token's."""
    engine = Engine(spec_runner("noisy", 2), TOK)
    engine.add_request(PROMPTS[0], GREEDY, request_id="r")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].spec is not None and outs[-1].spec.num_draft_tokens > 0
    assert all(o.spec is None for o in outs[:-1]) and len(outs) > 1
