"""Plain generation engine: batching, continuous admission, no recompilation, stopping, bad input."""

import random

import jax
import numpy as np
import pytest

from helpers import CompileCounter, full_forward, scaled_model
from jaxspec.engine import Engine, FinishReason, InvalidRequestError, ModelRunner, PlainRunner, QueueFullError
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


def make_engine(model, slots=4, max_len=96, **kw):
    return Engine(PlainRunner(ModelRunner(model, num_slots=slots, max_len=max_len)), ByteTokenizer(), **kw)


def greedy_reference(model, prompt_ids, n):
    seq = list(prompt_ids)
    for _ in range(n):
        seq.append(int(np.argmax(full_forward(model, np.array(seq))[-1])))
    return seq[len(prompt_ids):]


def test_batched_greedy_equals_single_sequence_reference(model):
    eng = make_engine(model)
    prompts = ["def f(x):", "import os", "class A:\n    pass\n", "z"]
    res = eng.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    tok = ByteTokenizer()
    for p, r in zip(prompts, res):
        assert r.token_ids == greedy_reference(model, tok.encode(p), 8)
        assert r.finish_reason == FinishReason.LENGTH


def test_seeded_output_independent_of_batch(model):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = make_engine(model).generate(["hello"], params)[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=5 + i) for i in range(5)]
    mixed = make_engine(model, slots=3).generate(["a", "bb", "hello", "ccc", "d", "ee"],
                                                 others[:2] + [params] + others[2:] + [others[0]])
    assert mixed[2].token_ids == alone


def test_no_recompilation_after_warmup_with_continuous_batching(model):
    counter = CompileCounter()
    eng = make_engine(model, slots=4, max_len=64)
    eng.runner.warmup()
    before = counter.count
    rng = random.Random(0)
    done = 0
    submitted = 0
    # Requests join and leave between steps with mixed prompt lengths and settings.
    for step in range(120):
        if submitted < 24 and rng.random() < 0.5:
            n = rng.randint(1, 40)
            text = "".join(rng.choice("abcdefgh ") for _ in range(n))
            sp = SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]),
                                max_tokens=rng.randint(1, 12), seed=step)
            eng.add_request(text, sp)
            submitted += 1
        for out in eng.step():
            done += out.finished
    while eng.has_unfinished():
        for out in eng.step():
            done += out.finished
    assert done == submitted >= 10
    assert counter.count == before, f"{counter.count - before} compilation(s) after warm-up"


def test_stop_string_cuts_output(model):
    eng = make_engine(model)
    free = eng.generate(["xyz"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    text = free.text
    assert len(text) >= 6
    stop = text[3:5]
    cut = eng.generate(["xyz"], SamplingParams(max_tokens=12, ignore_eos=True, stop_strings=(stop,)))[0]
    assert cut.finish_reason == FinishReason.STOP and cut.stop_match == stop
    assert cut.text == text[: text.find(stop)]


def test_stop_token_and_eos(model):
    eng = make_engine(model)
    free = eng.generate(["xyz"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    res = eng.generate(["xyz"], SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,)))[0]
    assert res.finish_reason == FinishReason.STOP and res.stop_match == stop_tok
    assert res.token_ids == free.token_ids[:first]
    eos_eng = make_engine(model, eos_ids=[stop_tok])
    res = eos_eng.generate(["xyz"], SamplingParams(max_tokens=10))[0]
    assert res.finish_reason == FinishReason.EOS and res.token_ids == free.token_ids[:first]
    res = eos_eng.generate(["xyz"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert res.token_ids == free.token_ids


def test_abort_frees_slot(model):
    eng = make_engine(model, slots=1)
    a = eng.add_request("aaaa", SamplingParams(max_tokens=50, ignore_eos=True))
    b = eng.add_request("bbbb", SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1
    out = eng.abort(a)
    assert out.finished and out.finish_reason == FinishReason.ABORTED
    finished = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
    assert finished[b].finish_reason == FinishReason.LENGTH and finished[b].num_generated_tokens == 3


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(), "prompt"),
        ([], SamplingParams(), "prompt"),
        ("x" * 200, SamplingParams(max_tokens=1), "prompt"),
        ("x" * 50, SamplingParams(max_tokens=60), "max_tokens"),
        ([5, 999], SamplingParams(), "prompt_token_ids"),
        ([5, -1], SamplingParams(), "prompt_token_ids"),
        ("ok", SamplingParams(stop_token_ids=(400,)), "stop_token_ids"),
    ],
)
def test_bad_requests_name_the_problem(model, prompt, params, field):
    eng = make_engine(model)
    with pytest.raises(InvalidRequestError, match=field) as e:
        eng.add_request(prompt, params)
    assert e.value.field == field
    assert not eng.has_unfinished()


def test_queue_limit_and_duplicate_ids(model):
    eng = make_engine(model, max_waiting=2)
    eng.add_request("a", request_id="same")
    with pytest.raises(InvalidRequestError, match="request_id"):
        eng.add_request("b", request_id="same")
    eng.add_request("c")
    with pytest.raises(QueueFullError):
        eng.add_request("d")


def test_generate_takes_more_prompts_than_the_waiting_queue(model):
    """Offline generation of many prompts (distillation data) is fed in as the queue drains."""
    eng = make_engine(model, slots=2, max_waiting=2)
    prompts = [f"x = {i}" for i in range(7)]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    got = eng.generate(prompts, params)
    assert [r.token_ids for r in got] == [eng.generate([p], params)[0].token_ids for p in prompts]


class _FragileTokenizer(ByteTokenizer):
    """Fails to detokenise one poisoned token id (a stand-in for any host-side fault)."""

    def __init__(self, poison: int):
        self.poison = poison

    def decode_bytes(self, ids):
        if self.poison in ids:
            raise RuntimeError("detokenizer exploded")
        return super().decode_bytes(ids)


def test_host_side_failure_fails_only_that_request(model):
    probe = make_engine(model).generate(["poison"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    poison = probe.token_ids[2]
    eng = Engine(PlainRunner(ModelRunner(model, num_slots=4, max_len=96)), _FragileTokenizer(poison))
    healthy = "".join(chr(c) for c in range(97, 103))
    res = eng.generate(["poison", healthy], SamplingParams(max_tokens=4, ignore_eos=True))
    assert res[0].finish_reason == FinishReason.ERROR
    reference = make_engine(model).generate([healthy], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    if poison not in reference.token_ids:
        assert res[1].finish_reason == FinishReason.LENGTH and res[1].token_ids == reference.token_ids
    assert not eng.has_unfinished()
