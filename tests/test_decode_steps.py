"""Several plain decode steps in one device call (``ModelRunner(decode_steps=N)``).

The tokens are those of one step per call whatever joins, stops or fails; calls of several steps
run only while nothing waits and every request has room for them; the paged cache grows by them;
no compilation after warm-up."""

import numpy as np
import pytest

from helpers import CompileCounter, scaled_model
from jaxspec.engine import Engine, FinishReason, ModelRunner
from jaxspec.engine.scheduler import Scheduler
from jaxspec.engine.slots import SlotTable
from jaxspec.sampling import SamplingParams
from test_engine_overlap import make_engine as overlap_engine
from test_engine_overlap import mixed_workload, run_workload

STEPS = 4


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


def make_engine(model, decode_steps=STEPS, overlap=True, slots=4, max_len=96, **runner_kw):
    return overlap_engine(model, overlap, slots, max_len, decode_steps, runner_kw)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_outputs_equal_one_step_per_call(model, overlap):
    want = mixed_workload(make_engine(model, decode_steps=1, overlap=False))
    eng = make_engine(model, overlap=overlap)
    assert eng.runner.decode_steps == STEPS and eng.runner.lookahead == STEPS - 1
    assert mixed_workload(eng) == want
    assert eng.runner.calls.count(STEPS) >= 5, eng.runner.calls  # the workload really ran such calls
    assert set(eng.runner.calls) == {1, STEPS}


def test_long_requests_alone_run_whole_calls_and_stop_at_their_limit(model):
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 17, 30)]
    want = [make_engine(model, decode_steps=1).generate(["abc"], p)[0].token_ids for p in params]
    eng = make_engine(model)
    for p, w in zip(params, want):
        done = eng.generate(["abc"], p)[0]
        assert done.token_ids == w and done.finish_reason == FinishReason.LENGTH
    # 30 tokens: the prefill's first, then calls of 4 while 4 more fit, the rest one at a time.
    assert eng.runner.calls.count(STEPS) >= (30 - 1) // STEPS - 1


def test_sampled_and_stopped_requests_match(model):
    def new_request(rng, step):
        text = "".join(rng.choice("abc d") for _ in range(rng.randint(1, 12)))
        return text, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=rng.randint(5, 25), seed=step,
                                    stop_strings=rng.choice([(), ("b",), ("dd",)]))

    want = run_workload(make_engine(model, decode_steps=1), 5, 60, 10, 0.15, new_request)
    eng = make_engine(model)
    assert run_workload(eng, 5, 60, 10, 0.15, new_request) == want
    assert STEPS in eng.runner.calls


def test_paged_cache_grows_by_a_calls_steps(model):
    kw = dict(page_size=8, num_pages=20)
    want = mixed_workload(make_engine(model, decode_steps=1, **kw), seed=2)
    eng = make_engine(model, **kw)
    assert mixed_workload(eng, seed=2) == want
    assert STEPS in eng.runner.calls


def test_no_compilation_after_warmup(model):
    eng = make_engine(model, slots=4, max_len=64)
    eng.runner.warmup()
    counter = CompileCounter()
    mixed_workload(eng, seed=3, steps=60, limit=12)
    assert STEPS in eng.runner.calls
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"


def _slots(max_tokens, generated):
    from jaxspec.engine.request import Request

    table = SlotTable(len(max_tokens))
    for slot, (m, g) in enumerate(zip(max_tokens, generated)):
        table.assign(slot, Request(f"r{slot}", [1, 2], SamplingParams(max_tokens=m), seed=0))
        table.active[slot] = True
        table.num_generated[slot] = g
    return table


def test_the_scheduler_plans_several_steps_only_with_room_and_nothing_waiting():
    sched = Scheduler(4, 512, lambda n: n, decode_steps=STEPS)
    slots = _slots([20, 9], [0, 4])  # room 20 and 5
    assert sched.plan_decode(slots, several=True).steps == STEPS
    assert sched.plan_decode(slots, several=False).steps == 1  # someone waits: it is admitted after one step
    assert sched.plan_decode(slots, ahead=1, several=True).steps == STEPS  # 5 - 1 >= 4
    assert sched.plan_decode(slots, ahead=2, several=True).steps == 1  # a call in flight takes 2 of the 5
    assert Scheduler(4, 512, lambda n: n).plan_decode(slots, several=True).steps == 1


def test_runners_that_cannot_run_several_steps_say_so(model):
    runner = ModelRunner(model, num_slots=2, max_len=64, decode_steps=STEPS)
    assert runner.max_decode_steps == STEPS
    with pytest.raises(ValueError, match="1 or 4 steps"):
        runner.dispatch_decode(np.array([0]), np.array([1]), SlotTable(2).sampling(np.array([0])), np.array([0]),
                               steps=3)
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        ModelRunner(model, num_slots=2, max_len=64, decode_steps=0)
    runner.capture_hidden([1])  # steps that return hidden features (an EAGLE-3 head's) run one at a time
    assert runner.max_decode_steps == 1
    from jaxspec.engine.factory import make_runner

    spec = make_runner(model, num_slots=2, max_len=64, spec_method="ngram", num_speculative_tokens=2, decode_steps=STEPS)
    assert spec.decode_steps == STEPS and spec.lookahead == max(spec.k_max, STEPS - 1)  # its plain steps


def test_serve_runs_several_steps_by_default():
    from jaxspec.serve import options_from_args, parse_args
    from serving.build import EngineOptions

    assert options_from_args(parse_args([]))[0].decode_steps == EngineOptions.decode_steps == STEPS
    assert options_from_args(parse_args(["--decode-steps", "1"]))[0].decode_steps == 1
    with pytest.raises(Exception, match="decode_steps must be >= 1"):
        options_from_args(parse_args(["--decode-steps", "0"]))


def test_the_readme_states_the_default():
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"runs up to {STEPS} decode steps as one device call while no request waits" in readme
    assert "`make_runner(decode_steps=N)`, default 1, so `generate` runs one" in readme
    import inspect

    from jaxspec.engine.factory import make_runner

    assert inspect.signature(make_runner).parameters["decode_steps"].default == 1


# ------------------------------------------------------------------ speculative runners
class PlanCounter:
    """Wraps a SpeculativeRunner's dispatch: the (kb, steps) of every queued call."""

    def __init__(self, runner):
        self.plans: list[tuple[int, int]] = []
        real = runner.dispatch

        def dispatch(slots, plan, after=None):
            self.plans.append((plan.kb, plan.steps))
            return real(slots, plan, after)

        runner.dispatch = dispatch


@pytest.mark.parametrize("kind", ["identical", "noisy"])
def test_adaptive_speculation_runs_its_plain_steps_several_to_a_call(kind):
    """With speculation off (drafting priced out) the plain steps run 4 to a call, probes draft
    between them, and the tokens equal one step per call's (greedy and seeded sampled)."""
    from test_engine_overlap import _expensive_drafting
    from test_spec_greedy import K_MAX, MAX_LEN, PROMPTS, TARGET, TOK, proposer

    from jaxspec.speculative import SpeculativeRunner

    def runner(steps):
        return SpeculativeRunner(ModelRunner(TARGET, 4, MAX_LEN, decode_steps=steps), proposer(kind),
                                 num_speculative_tokens="auto", k_max=K_MAX, cost_model=_expensive_drafting(),
                                 probe_every=3)

    for params in (SamplingParams(max_tokens=20, ignore_eos=True),
                   SamplingParams(temperature=0.8, seed=5, max_tokens=20, ignore_eos=True)):
        want = Engine(runner(1), TOK, overlap=True).generate(PROMPTS, params)
        r = runner(STEPS)
        assert r.decode_steps == STEPS and r.lookahead == max(K_MAX, STEPS - 1)
        counter = PlanCounter(r)
        eng = Engine(r, TOK, overlap=True)
        got = eng.generate(PROMPTS, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert (0, STEPS) in counter.plans  # plain calls of several steps ran
        assert all(steps == 1 for kb, steps in counter.plans if kb > 0)
        assert eng.spec_stats.num_draft_tokens > 0  # and probes drafted between them


def test_a_calls_period_prices_one_step():
    """The adaptive policy weighs a plain step at its share of a call's period (a call of 4 steps
    taking 4 ms is a 1 ms step), not at the call's."""
    from jaxspec.engine.step import StepResult
    from jaxspec.speculative.adaptive import CostModel
    from jaxspec.speculative.scheduling import SpecScheduler

    now = [0.0]
    costs = CostModel({0: 0.0, 1: 1e-3}, {0: 2e-3, 1: 3e-3})
    sched = SpecScheduler(2, [1], 1, None, lambda n: 1, lambda rows: costs, clock=lambda: now[0], trial_steps=0)
    assert sched.costs_for(1) is costs
    slots = np.array([0])
    for _ in range(12):
        now[0] += 4e-3
        sched.update(StepResult.plain(slots, np.array([[5, 6, 7, 8]]), 3.6e-3, queued=True))
    assert sched.bucket_steps[0] == 48
    assert costs.period(0) == pytest.approx(1e-3)
