"""Engine core: steps over the active rows only, attention over live spans, batched admission
under a token budget, and no output lost when a step fails."""

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import full_forward, moe_backend, scaled_model
from jaxspec.engine import Engine, FinishReason, ModelRunner, PlainRunner, Request
from jaxspec.engine.engine import StepFailed
from jaxspec.engine.model_runner import batch_buckets, bucket_up, kv_buckets, prefill_buckets
from jaxspec.engine.scheduler import Scheduler
from jaxspec.models.moe_dispatch import BACKENDS
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return scaled_model("tiny-moe", scale=3.0)


class SpyRunner(PlainRunner):
    """Records the (rows, attention span) of every decode call; can fail chosen decodes."""

    def __init__(self, model_runner):
        super().__init__(model_runner)
        self.shapes: list[tuple[int, int]] = []
        self.fail_next = 0
        inner = model_runner._steps[1]

        def spy(state, cache, slot_ids, *args, kv_len, steps=1):
            self.shapes.append((len(slot_ids), kv_len))
            return inner(state, cache, slot_ids, *args, kv_len=kv_len, steps=steps)

        model_runner._steps = (model_runner._steps[0], spy)

    def decode(self, slots, plan):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("device step exploded")
        return super().decode(slots, plan)


def test_buckets():
    assert batch_buckets(8) == [1, 2, 4, 8] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(1) == [1]
    assert kv_buckets(512) == [128, 256, 512] and kv_buckets(300) == [128, 256, 300] and kv_buckets(64) == [64]
    assert kv_buckets(2048, factor=4) == [128, 512, 2048] and kv_buckets(512, factor=4) == [128, 512]
    assert prefill_buckets(64) == [16, 32, 64] and prefill_buckets(512) == [16, 32, 64, 128, 192, 256, 384, 512]
    # From 128 positions on, a prompt pads to at most 1.5x its length (powers of two alone: up to 2x).
    buckets = prefill_buckets(4096)
    assert buckets == sorted(set(buckets)) and buckets[-1] == 4096
    assert max(bucket_up(n, buckets) / n for n in range(129, 4097)) <= 1.5


def test_a_step_runs_the_active_rows_over_their_live_span(model):
    runner = SpyRunner(ModelRunner(model, num_slots=8, max_len=256, min_kv_bucket=32))
    engine = Engine(runner, ByteTokenizer())
    engine.generate(["abc"], GREEDY)
    # One request on an 8-slot engine: every decode step ran one row over a 32-position span.
    assert set(runner.shapes) == {(1, 32)}
    runner.shapes.clear()
    engine.generate(["x" * 40, "y", "z"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert {rows for rows, _ in runner.shapes} <= {2, 4} and (4, 64) in runner.shapes  # 3 rows -> bucket 4
    assert max(span for _, span in runner.shapes) == 64  # the longest context (41..43 tokens) fits 64


def test_bucketed_steps_equal_full_steps(model):
    """Greedy tokens with row and span buckets equal those of a runner whose every step covers
    all slots and the whole cache (one bucket each)."""
    prompts = ["def f(x):", "a" * 50, "import os", "z", "class A:"]
    bucketed = Engine(PlainRunner(ModelRunner(model, num_slots=4, max_len=128, min_kv_bucket=16)),
                      ByteTokenizer()).generate(prompts, GREEDY)
    full = ModelRunner(model, num_slots=4, max_len=128, min_kv_bucket=128)
    full.batch_buckets = [4]
    reference = Engine(PlainRunner(full), ByteTokenizer()).generate(prompts, GREEDY)
    assert [c.token_ids for c in bucketed] == [c.token_ids for c in reference]


@pytest.mark.parametrize("backend", ["dense", "per_expert", "per_expert_static", "expert_rows", "expert_chunks", "sorted",
                                     "ragged", "cpu_fused"])
def test_padding_tokens_reach_no_expert(backend):
    """Ids == E (padding) with weight 0 contribute nothing and leave the valid rows unchanged."""
    rng = np.random.default_rng(0)
    e, d, f, n = 4, 8, 16, 6
    w_gate, w_up = (jnp.asarray(rng.normal(size=(e, d, f)), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, (n, 2)), jnp.int32)
    w = jnp.asarray(rng.random((n, 2)), jnp.float32)
    pad = jnp.array([False, True, False, False, True, False])[:, None]
    out = moe_backend(backend)(x, jnp.where(pad, e, ids), jnp.where(pad, 0.0, w), w_gate, w_up, w_down)
    alone = BACKENDS[backend](x[~pad[:, 0]], ids[~pad[:, 0]], w[~pad[:, 0]], w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(out)[np.asarray(pad[:, 0])], 0.0)
    np.testing.assert_allclose(np.asarray(out)[~np.asarray(pad[:, 0])], np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_steps_take_the_parameters_as_a_plain_dict(model):
    """jit flattens a nested dict in C++ where an nnx.State calls into Python per variable: the
    runner hands its steps a dict holding the model's own arrays, and its model is the same."""
    runner = ModelRunner(model, num_slots=2, max_len=64)
    leaves = jax.tree.leaves(runner.state)
    assert all(type(node) is dict for node in _nodes(runner.state))
    assert all(isinstance(x, jax.Array) for x in leaves) and len(leaves) == len(jax.tree.leaves(nnx.state(model)))
    tokens = np.array([3, 4, 5], np.int32)
    np.testing.assert_array_equal(full_forward(runner.model(), tokens), full_forward(model, tokens))


def _nodes(tree):
    """Every container of a nested dict/list tree (leaves excluded)."""
    out = [tree]
    for child in (tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()):
        if isinstance(child, (dict, list, tuple)):
            out += _nodes(child)
    return out


def test_a_released_slot_goes_back_to_length_zero_without_touching_others(model):
    runner = ModelRunner(model, num_slots=4, max_len=64)
    engine = Engine(PlainRunner(runner), ByteTokenizer())
    engine.generate(["abc", "defgh"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert runner.lengths().tolist() == [0, 0, 0, 0]  # both released
    runner.set_length(2, 7)
    runner.set_length(1, 5)
    assert runner.lengths().tolist() == [0, 5, 7, 0] and runner.host_lengths.tolist() == [0, 5, 7, 0]


def test_padding_rows_do_not_count_as_expert_load(model):
    runner = ModelRunner(model, num_slots=8, max_len=64)
    engine = Engine(PlainRunner(runner), ByteTokenizer())
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True))
    # prompt (3 tokens) + 4 decode steps of one row, top-2 routing in each layer
    assert runner.expert_load.sum(axis=1).tolist() == [2 * (3 + 4)] * model.cfg.num_layers


def test_scheduler_admits_under_the_token_budget():
    def req(n, i):
        return Request(f"r{i}", [1] * n, GREEDY, 0)

    sched = Scheduler(max_prefill_rows=4, prefill_token_budget=64, padded_length=lambda n: max(16, 1 << (n - 1).bit_length()))
    waiting = collections.deque(req(n, i) for i, n in enumerate([10, 12, 30, 100, 5]))
    first = sched.plan_prefill(waiting, [0, 1, 2, 3, 4])
    # 10, 12 -> 2 rows x 16; + 30 -> 4 rows x 32 = 128 > 64: stops at two
    assert [r.request_id for _, r in first.admitted] == ["r0", "r1"] and [s for s, _ in first.admitted] == [0, 1]
    assert [(c.slot, c.start, c.end) for c in first.chunks] == [(0, 0, 10), (1, 0, 12)]
    second = sched.plan_prefill(waiting, [2, 3, 4])
    assert [r.request_id for _, r in second.admitted] == ["r2"]  # 30 then 100 -> 2 x 128 > 64
    third = sched.plan_prefill(waiting, [3, 4])
    assert [r.request_id for _, r in third.admitted] == ["r3"]  # over the budget alone: still admitted
    assert [r.request_id for _, r in sched.plan_prefill(waiting, []).admitted] == []  # no free slot
    # A request the memory check refuses waits at the head of the queue.
    assert sched.plan_prefill(waiting, [4], reserve=lambda r, free: None).chunks == ()
    assert [r.request_id for _, r in sched.plan_prefill(waiting, [4]).admitted] == ["r4"]


def test_scheduler_continues_long_prompts_in_chunks_before_admitting():
    sched = Scheduler(max_prefill_rows=4, prefill_token_budget=64, padded_length=lambda n: max(16, 1 << (n - 1).bit_length()),
                      chunk=32)
    long = Request("long", [1] * 100, GREEDY, 0)
    waiting = collections.deque([long, Request("short", [1] * 8, GREEDY, 0)])
    plan = sched.plan_prefill(waiting, [0, 1, 2])
    # the long prompt's first chunk (32 padded to 32) and the short one (16) -> 2 rows x 32 <= 64
    assert [(c.request.request_id, c.start, c.end, c.last) for c in plan.chunks] == [
        ("long", 0, 32, False), ("short", 0, 8, True)]
    plan = sched.plan_prefill(collections.deque(), [2], in_progress=[(0, long, 96)])
    assert [(c.start, c.end, c.last) for c in plan.chunks] == [(96, 100, True)]


def test_a_burst_of_arrivals_does_not_stall_running_requests(model):
    engine = Engine(PlainRunner(ModelRunner(model, num_slots=8, max_len=128)), ByteTokenizer(),
                    prefill_token_budget=32)
    engine.add_request("running", SamplingParams(max_tokens=40, ignore_eos=True), request_id="r")
    engine.step()
    for i in range(6):
        engine.add_request("burst " * 2, SamplingParams(max_tokens=4, ignore_eos=True))
    for _ in range(4):
        outs = engine.step()
        # the running request gets a token in every step while the burst is admitted 2 by 2 (2 x 16 <= 32)
        assert sum(len(o.new_token_ids) for o in outs if o.request_id == "r") == 1
    assert engine.num_waiting == 0


def test_failed_decode_delivers_every_output_of_the_step(model):
    runner = SpyRunner(ModelRunner(model, num_slots=4, max_len=64))
    engine = Engine(runner, ByteTokenizer())
    engine.add_request("running", SamplingParams(max_tokens=20, ignore_eos=True), request_id="a")
    engine.step()
    engine.add_request("expires", GREEDY, request_id="c", deadline=time.monotonic() - 1)
    engine.add_request("joins", GREEDY, request_id="b")
    runner.fail_next = 1
    with pytest.raises(StepFailed) as err:
        engine.step()
    outs = err.value.outputs
    finals = {o.request_id: o for o in outs if o.finished}
    assert set(finals) == {"a", "b", "c"}
    assert finals["c"].finish_reason == FinishReason.DEADLINE
    assert finals["a"].finish_reason == finals["b"].finish_reason == FinishReason.ERROR
    assert "device step exploded" in finals["a"].error
    assert [o.new_token_ids for o in outs if o.request_id == "b" and not o.finished]  # b's first token, kept
    assert not engine.has_unfinished()
    # The engine goes on serving.
    assert engine.generate(["after"], GREEDY)[0].finish_reason == FinishReason.LENGTH


def test_serve_defaults_to_adaptive_speculation():
    from jaxspec.serve import options_from_args, parse_args

    engine, _ = options_from_args(parse_args([]))
    assert engine.spec_method == "draft" and engine.adaptive_k and engine.num_speculative_tokens == 4
    engine, _ = options_from_args(parse_args(["--num-speculative-tokens", "3"]))
    assert engine.spec_method == "draft" and not engine.adaptive_k and engine.num_speculative_tokens == 3
    engine, _ = options_from_args(parse_args(["--max-speculative-tokens", "6"]))
    assert engine.adaptive_k and engine.num_speculative_tokens == 6
    with pytest.raises(SystemExit):
        parse_args(["--num-speculative-tokens", "0"])


def test_one_factory_chooses_plain_or_speculative(model):
    from jaxspec.engine.factory import make_runner
    from jaxspec.speculative import SpeculativeRunner

    assert isinstance(make_runner(model, num_slots=2, max_len=64), PlainRunner)
    spec = make_runner(model, num_slots=2, max_len=64, spec_method="ngram")
    assert isinstance(spec, SpeculativeRunner) and spec.adaptive and spec.k_max == 4
    fixed = make_runner(model, num_slots=2, max_len=64, spec_method="ngram", num_speculative_tokens=6)
    assert not fixed.adaptive and fixed.default_k == 6 and fixed.k_max == 6
    with pytest.raises(ValueError, match="spec_method"):
        make_runner(model, num_slots=2, max_len=64, spec_method="eagle")
