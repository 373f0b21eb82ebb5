"""Overlapped plain decoding: step n+1 queued on the device before step n is applied on the host.

Same outputs as the plain engine whatever joins, leaves, stops, expires or fails; no compilation
after warm-up; the steps really chain (the next one is fed by the previous one's device tokens)."""

import random
import time

import numpy as np
import pytest

from helpers import CompileCounter, scaled_model
from jaxspec.engine import Engine, FinishReason, ModelRunner, PlainRunner
from jaxspec.engine.engine import StepFailed
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


class CountingRunner(PlainRunner):
    """Counts dispatches fed by the previous step's device tokens; records each call's decode steps."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.chained = 0
        self.dispatched = 0
        self.calls: list[int] = []

    def dispatch(self, slots, plan, after=None):
        self.dispatched += 1
        self.chained += after is not None
        self.calls.append(plan.steps)
        return super().dispatch(slots, plan, after)


def make_engine(model, overlap=True, slots=4, max_len=96, decode_steps=1, runner_kw=None, **kw):
    runner = CountingRunner(ModelRunner(model, num_slots=slots, max_len=max_len, decode_steps=decode_steps,
                                        **(runner_kw or {})))
    return Engine(runner, ByteTokenizer(), overlap=overlap, **kw)


def run_workload(eng, seed, steps, limit, join, new_request, abort_at=()):
    """Requests join between steps (with probability ``join``; ``new_request(rng, step)`` gives the
    prompt and its settings); ``abort_at``: steps at which the oldest unfinished request is aborted.
    Returns id -> (tokens, reason)."""
    rng = random.Random(seed)
    got: dict[str, list[int]] = {}
    reasons = {}
    submitted = step = 0
    while step < steps or eng.has_unfinished():
        if step < steps and submitted < limit and rng.random() < join:
            rid = eng.add_request(*new_request(rng, step), request_id=f"r{submitted}")
            got[rid] = []
            submitted += 1
        if step in abort_at:
            for rid in got:
                if rid not in reasons:
                    out = eng.abort(rid)
                    got[rid] += out.new_token_ids
                    reasons[rid] = out.finish_reason
                    break
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                assert out.request_id not in reasons, "two final outputs"
                reasons[out.request_id] = out.finish_reason
        step += 1
    assert set(reasons) == set(got)
    return {rid: (got[rid], reasons[rid]) for rid in got}


def mixed_workload(eng, seed=0, steps=80, limit=16):
    """Mixed text prompts and settings (greedy and sampled, stop strings, short limits)."""
    def new_request(rng, step):
        text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 30)))
        return text, SamplingParams(temperature=rng.choice([0.0, 0.9]), top_k=rng.choice([0, 5]),
                                    max_tokens=rng.randint(1, 14), seed=step, stop_strings=rng.choice([(), ("a",)]))

    return run_workload(eng, seed, steps, limit, 0.4, new_request)


def test_overlapped_outputs_equal_plain_and_steps_chain(model):
    plain = mixed_workload(make_engine(model, overlap=False))
    eng = make_engine(model, overlap=True)
    assert eng.overlap
    over = mixed_workload(eng)
    assert over == plain
    assert len(plain) >= 10
    assert eng.runner.chained > eng.runner.dispatched // 3, (eng.runner.chained, eng.runner.dispatched)


def test_overlap_is_off_for_a_plain_engine_by_default(model):
    eng = make_engine(model, overlap=False)
    eng.add_request("abc", SamplingParams(max_tokens=6, ignore_eos=True))
    outs = eng.step()  # admission emits the first token, the decode step its second
    assert [len(o.new_token_ids) for o in outs] == [1, 1]
    assert eng.runner.chained == 0


def test_no_recompilation_after_warmup_when_chaining(model):
    eng = make_engine(model, slots=4, max_len=64)
    eng.runner.warmup()
    counter = CompileCounter()
    mixed_workload(eng, seed=3, steps=60, limit=12)
    assert eng.runner.chained > 0
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"


def test_abort_while_a_step_is_in_flight_loses_nothing_else(model):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = make_engine(model, overlap=False).generate(["keep me"], params)[0].token_ids
    eng = make_engine(model)
    a = eng.add_request("abort me", params)
    b = eng.add_request("keep me", params)
    got = {a: [], b: []}
    finals = {}
    for _ in range(4):
        for out in eng.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert eng._in_flight_step is not None  # a queued step covers both requests
    out = eng.abort(a)
    assert out.finished and out.finish_reason == FinishReason.ABORTED
    n_aborted = len(got[a])
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id != a, "a token for an aborted request"
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert got[b] == want and finals[b] == FinishReason.LENGTH
    assert len(got[a]) == n_aborted
    # The freed slot serves a new request exactly.
    assert eng.generate(["keep me"], params)[0].token_ids == want


def test_deadline_expiry_during_overlap(model):
    eng = make_engine(model)
    slow = eng.add_request("x", SamplingParams(max_tokens=60, ignore_eos=True), deadline=time.monotonic() + 0.3)
    fast = eng.add_request("y", SamplingParams(max_tokens=5, ignore_eos=True))
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        time.sleep(0.01)
    assert finals[fast].finish_reason == FinishReason.LENGTH and finals[fast].num_generated_tokens == 5
    assert finals[slow].finish_reason == FinishReason.DEADLINE


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_a_failing_step_ends_every_request_in_it(model, decode_steps):
    eng = make_engine(model, decode_steps=decode_steps)
    ids = [eng.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in ("aa", "bb")]
    outs = eng.step() + eng.step() + eng.step()
    assert eng._in_flight_step is not None and eng._in_flight_step.queued.plan.steps == decode_steps
    real = eng.runner.collect

    def broken(queued):
        raise RuntimeError("device fault")

    eng.runner.collect = broken
    with pytest.raises(StepFailed) as info:
        for _ in range(3):
            outs += eng.step()
    final = {o.request_id: o for o in info.value.outputs if o.finished}
    assert set(final) == set(ids)
    assert all(o.finish_reason == FinishReason.ERROR and "device fault" in o.error for o in final.values())
    assert not eng.has_unfinished() and eng._in_flight_step is None
    eng.runner.collect = real
    res = eng.generate(["cc"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(res.token_ids) == 4 and res.finish_reason == FinishReason.LENGTH


def test_serve_overlaps_plain_decoding_by_default(model):
    from jaxspec.serve import options_from_args, parse_args
    from serving.build import bundle_engine

    assert options_from_args(parse_args([]))[0].overlap
    assert not options_from_args(parse_args(["--no-overlap"]))[0].overlap
    runner = PlainRunner(ModelRunner(model, num_slots=2, max_len=64))
    assert bundle_engine(runner, ByteTokenizer(), model_id="m").engine.overlap
    assert not bundle_engine(runner, ByteTokenizer(), model_id="m", overlap=False).engine.overlap


def test_generate_overlaps_by_default():
    from jaxspec import generate

    args = generate.build_parser().parse_args(["--model", "tiny-moe", "--spec-method", "none", "x"])
    assert generate.build_engine(args).overlap


# ------------------------------------------------------------------ speculative runners
class CountingSpecRunner:
    """Wraps a SpeculativeRunner's dispatch to count chained plain steps."""

    def __init__(self, runner):
        self.chained = 0
        real = runner.dispatch

        def dispatch(slots, plan, after=None):
            self.chained += after is not None
            return real(slots, plan, after)

        runner.dispatch = dispatch


def _expensive_drafting():
    """Costs under which drafting never pays: adaptive k stays at 0 except for its probes."""
    from jaxspec.speculative.adaptive import CostModel

    buckets = [1, 2, 4, 8]
    return CostModel({0: 0.0, **{b: 1.0 * b for b in buckets}}, {0: 1e-2, **{b: 1e-2 for b in buckets}},
                     smoothing=0.0)


@pytest.mark.parametrize("kind,k", [("identical", "auto"), ("ngram", "auto"), ("noisy", 4)])
def test_speculative_engine_overlaps_its_plain_steps_exactly(kind, k):
    """Plain steps (adaptive k at 0 between probes) are queued ahead; speculative ones (the probes,
    fixed k) wait for every token, the draft catching up on the chained steps' tokens: greedy and
    seeded sampled output equal the engine's without overlap."""
    from test_spec_greedy import PROMPTS, TOK, spec_runner

    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    kw = dict(cost_model=_expensive_drafting(), probe_every=3) if k == "auto" else {}
    for params in (greedy, sampled):
        ref = Engine(spec_runner(kind, k, **kw), TOK)
        want = ref.generate(PROMPTS, params)
        runner = spec_runner(kind, k, **kw)
        counter = CountingSpecRunner(runner)
        eng = Engine(runner, TOK, overlap=True)
        assert eng.overlap
        got = eng.generate(PROMPTS, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        if kind != "ngram":  # a lookup may find nothing to propose
            assert eng.spec_stats.num_draft_tokens > 0  # probes / fixed k drafted
        if k != "auto":  # the same steps draft (with adaptive k, probes fall on other steps)
            assert eng.spec_stats.num_draft_tokens == ref.spec_stats.num_draft_tokens
        if kind == "identical" and params is greedy:
            assert eng.spec_stats.acceptance_rate == 1.0  # the draft caught up on every chained token
        if k == "auto":
            assert counter.chained > 0
        else:  # every step drafts: chained only where the runner queues drafting steps
            assert (counter.chained > 0) == runner.queues_drafting


class DraftChainCounter:
    """Wraps a SpeculativeRunner's dispatch: counts drafting steps queued, and those chained
    behind the drafting step before (fed by its carry on the device)."""

    def __init__(self, runner):
        self.queued = self.chained = 0
        real = runner.dispatch

        def dispatch(slots, plan, after=None):
            self.queued += plan.kb > 0
            self.chained += plan.kb > 0 and after is not None
            return real(slots, plan, after)

        runner.dispatch = dispatch


def spec_workload(eng, seed, steps=60, limit=14, abort_at=()):
    """Token prompts, greedy and seeded sampled, stop tokens, short and long limits."""
    from test_spec_greedy import CFG

    def new_request(rng, step):
        prompt = [rng.randrange(3, CFG.vocab_size) for _ in range(rng.randint(2, 12))]
        return prompt, SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.choice([1, 3, 9, 17, 30]),
                                      seed=step, stop_token_ids=rng.choice([(), tuple(range(3, 40))]), ignore_eos=True)

    return run_workload(eng, seed, steps, limit, 0.35, new_request, abort_at)


@pytest.mark.parametrize("k,paged", [(1, False), pytest.param(3, False, marks=pytest.mark.slow),
                                     pytest.param(2, True, marks=pytest.mark.slow)])
def test_drafting_steps_queue_behind_each_other_exactly(k, paged):
    """A fused draft model's drafting steps are queued like plain ones: step n+1 takes its inputs
    (the draft's pending block, start and output positions, the token fed) from step n's outputs on
    the device. Requests join, stop on tokens, hit their limits and are aborted with steps in
    flight: every output equals the engine's without overlap, token for token (greedy and seeded
    sampled alike), and nothing compiles after warm-up."""
    from test_spec_greedy import MAX_LEN, TARGET, proposer

    from jaxspec.speculative import SpeculativeRunner

    def runner():
        kw = dict(page_size=8, num_pages=48) if paged else {}
        return SpeculativeRunner(ModelRunner(TARGET, 4, MAX_LEN, **kw), proposer("noisy"),
                                 num_speculative_tokens=k, k_max=4)

    ref = spec_workload(Engine(runner(), ByteTokenizer()), seed=k, abort_at=(20, 31))
    r = runner()
    counter = DraftChainCounter(r)
    eng = Engine(r, ByteTokenizer(), overlap=True)
    r.warmup()
    compiles = CompileCounter()
    got = spec_workload(eng, seed=k, abort_at=(20, 31))
    assert got.keys() == ref.keys()
    for rid, (tokens, reason) in got.items():
        want, want_reason = ref[rid]
        assert reason == want_reason, rid
        if reason == FinishReason.ABORTED:  # the engine step that aborts it may hold a step in flight
            n = min(len(tokens), len(want))
            assert tokens[:n] == want[:n], rid
        else:
            assert tokens == want, rid
    assert r.queues_drafting and counter.chained > 0 and counter.queued > counter.chained
    assert compiles.count == 0
    assert any(reason == FinishReason.STOP for _, reason in got.values())
    assert any(reason == FinishReason.ABORTED for _, reason in got.values())


def test_lookup_steps_that_find_nothing_are_queued_ahead():
    """Fixed k with n-gram lookup: a step none of whose slots' lookups finds anything is planned
    plain and queued behind the step before (chained on the device), instead of waiting for every
    token to find that out; steps whose lookups do find something still draft. Output unchanged."""
    from test_spec_greedy import TOK, spec_runner

    # Prompts of distinct tokens: a lookup finds nothing until the output repeats a token.
    rng = np.random.default_rng(2)
    prompts = [rng.permutation(np.arange(3, 259))[:12].tolist() for _ in range(4)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = Engine(spec_runner("ngram", 2), TOK)
    want = ref.generate(prompts, greedy)
    runner = spec_runner("ngram", 2)
    counter = CountingSpecRunner(runner)
    eng = Engine(runner, TOK, overlap=True)
    got = eng.generate(prompts, greedy)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert counter.chained > 0
    assert eng.spec_stats.num_draft_tokens > 0 and runner.bucket_steps[2] > 0


def test_scheduler_plans_no_drafts_for_slots_whose_lookup_finds_nothing():
    from jaxspec.engine.slots import SlotTable
    from jaxspec.engine.request import Request
    from jaxspec.speculative.adaptive import CostModel
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = CostModel({0: 0.0, 2: 1e-4}, {0: 1e-2, 2: 1e-2}, smoothing=0.0)  # drafting is free
    can = np.array([True, False, True])
    for default_k in (2, None):
        sched = SpecScheduler(3, [2], 2, default_k, rows_for=lambda n: 4, measure=lambda rows: costs,
                              cost_model=costs, would_propose=lambda slots: can[slots])
        slots = SlotTable(3)
        for s in range(3):
            sched.start(s, Request(f"r{s}", [1, 2], SamplingParams(max_tokens=8), seed=0))
        plan = sched.plan(slots, np.array([0, 1, 2]))
        assert plan.k.tolist() == [2, 0, 2] and plan.kb == 2
        plan = sched.plan(slots, np.array([1]))  # nobody could draft: a plain step
        assert plan.k.tolist() == [0] and plan.kb == 0


def test_a_queued_steps_time_is_not_taken_for_its_cost():
    """A queued step is collected a step later: its wall time spans the host's work on the step
    before, so the adaptive policy's costs (measured without it) must not learn from it."""
    import dataclasses

    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.adaptive import CostModel
    from jaxspec.speculative.scheduling import SpecScheduler

    costs = CostModel({0: 0.0, 1: 1e-3}, {0: 1e-2, 1: 1.2e-2}, smoothing=0.5)
    sched = SpecScheduler(2, [1], 1, None, rows_for=lambda n: 2, measure=lambda rows: costs, cost_model=costs)
    step = StepResult.plain(np.array([0, 1]), np.array([5, 6]), 1.0)
    sched.update(dataclasses.replace(step, queued=True))
    assert costs.verify_s[0] == 1e-2
    sched.update(step)
    assert costs.verify_s[0] > 0.1
