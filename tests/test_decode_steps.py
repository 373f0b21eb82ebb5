"""Several plain decode steps in one device call (``ModelRunner(decode_steps=N)``).

The tokens are those of one step per call whatever joins, stops or fails; calls of several steps
run only while nothing waits and every request has room for them; the paged cache grows by them;
no compilation after warm-up."""

import numpy as np
import pytest

from helpers import CompileCounter, scaled_model
from jaxspec.engine import Engine, FinishReason, ModelRunner, PlainRunner
from jaxspec.engine.engine import StepFailed
from jaxspec.engine.scheduler import Scheduler
from jaxspec.engine.slots import SlotTable
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer
from test_engine_overlap import mixed_workload, run_workload

STEPS = 4


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


class StepsRunner(PlainRunner):
    """Counts the decode steps of each dispatched call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[int] = []

    def dispatch(self, slots, plan, after=None):
        self.calls.append(plan.steps)
        return super().dispatch(slots, plan, after)


def make_engine(model, decode_steps=STEPS, overlap=True, slots=4, max_len=96, **runner_kw):
    runner = StepsRunner(ModelRunner(model, num_slots=slots, max_len=max_len, decode_steps=decode_steps, **runner_kw))
    return Engine(runner, ByteTokenizer(), overlap=overlap)


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


def test_a_failing_call_ends_every_request_in_it(model):
    eng = make_engine(model)
    ids = [eng.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in ("aa", "bb")]
    outs = eng.step() + eng.step()
    assert eng._in_flight_step is not None and eng._in_flight_step.queued.plan.steps == STEPS
    eng.runner.collect = lambda queued: (_ for _ in ()).throw(RuntimeError("device fault"))
    with pytest.raises(StepFailed) as info:
        for _ in range(3):
            outs += eng.step()
    final = {o.request_id: o for o in info.value.outputs if o.finished}
    assert set(final) == set(ids)
    assert all(o.finish_reason == FinishReason.ERROR and "device fault" in o.error for o in final.values())
    assert not eng.has_unfinished()


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
    from jaxspec.engine.factory import make_runner

    spec = make_runner(model, num_slots=2, max_len=64, spec_method="ngram", num_speculative_tokens=2, decode_steps=STEPS)
    assert spec.decode_steps == 1


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
