"""Measured MoE dispatch: the grid of step sizes, the cold-weight measurement, the table kept per
machine and expert shape, and a runner that adopts it before its first step (``--moe-dispatch``)."""

import jax
import numpy as np
import pytest

from jaxspec.config import ConfigError, load_config
from jaxspec.engine.factory import make_runner
from jaxspec.models import create_model, moe_tuning
from jaxspec.models.expert_slices import has_expert_slices
from jaxspec.models.moe_tuning import (MAX_TUNED_TOKENS, measure_dispatch, measure_in_model, tune_dispatch, tuning_counts,
                                       with_choices_from)


def _cfg(**kw):
    # Experts of 1.5 MiB a layer in float32: large enough to be measured (MIN_TUNED_EXPERT_BYTES).
    base = dict(d_model=128, head_dim=32, moe_mlp_dim=256, num_experts=4, max_seq_len=64)
    return load_config("tiny-moe").replace(**{**base, **kw})


def _fake_times(calls):
    """Per count: ``per_expert`` fastest below 8 tokens, ``sorted`` from 8."""
    def measure(cfg, counts, candidates=moe_tuning.CPU_CANDIDATES, reps=7, seed=0, evict_bytes=0, expert_slices=False):
        calls.append((sorted(counts), evict_bytes))
        return {n: {"per_expert": 1.0, "sorted": 0.5 if n >= 8 else 2.0, "dense": 3.0} for n in counts}
    return measure


def test_tuning_counts_are_powers_of_two_up_to_the_largest_step():
    assert tuning_counts(1) == [1]
    assert tuning_counts(40) == [1, 2, 4, 8, 16, 32, 64]
    assert tuning_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert tuning_counts(10 ** 6)[-1] == MAX_TUNED_TOKENS


def test_measure_dispatch_times_every_candidate_with_cold_weights():
    times = measure_dispatch(_cfg(), [1, 4], candidates=("per_expert", "dense"), reps=2, evict_bytes=1 << 20)
    assert sorted(times) == [1, 4]
    assert all(sorted(row) == ["dense", "per_expert"] and min(row.values()) > 0 for row in times.values())


def test_a_measured_table_is_kept_per_expert_shape_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(moe_tuning, "measure_dispatch", _fake_times(calls))
    table = tune_dispatch(_cfg(), [1, 2, 4, 8, 16], store=tmp_path, extend_last=True)
    assert table.choices == ((1, "per_expert"), (2, "per_expert"), (4, "per_expert"), (8, "sorted"), (16, "sorted"))
    assert table.backend_for(3) == "per_expert" and table.backend_for(5000) == "sorted"  # extended
    assert tune_dispatch(_cfg(), [1, 2, 4, 8, 16], store=tmp_path, extend_last=True) == table
    assert len(calls) == 1  # read back, not measured again
    tune_dispatch(_cfg(moe_mlp_dim=512), [1, 2, 4, 8, 16], store=tmp_path, extend_last=True)
    assert len(calls) == 2  # another expert shape is measured on its own
    for path in tmp_path.glob("moe-dispatch-*.json"):
        path.write_text("{not json")
    assert tune_dispatch(_cfg(), [1, 2, 4, 8, 16], store=tmp_path, extend_last=True) == table
    assert len(calls) == 3  # an unreadable table is measured again
    tune_dispatch(_cfg(), [1, 2, 4, 8, 16], store=tmp_path, extend_last=True, expert_slices=True)
    assert len(calls) == 4  # measured in the other weight layout: a table of its own
    assert not list(tmp_path.glob("*.tmp"))


def test_near_ties_keep_the_previous_count_s_choice_else_the_candidate_order():
    from jaxspec.models.moe_tuning import TIE_MARGIN, table_from_times

    near = 1.0 + TIE_MARGIN / 2
    times = {
        1: {"per_expert": 1.0 * near, "sorted": 2.0, "dense": 1.0},  # a tie: the first in order
        2: {"per_expert": 1.0, "sorted": 1.0 * near, "dense": 1.0 * near},  # a three-way tie: per_expert, as at 1
        4: {"per_expert": 1.0 * near, "sorted": 1.0, "dense": 3.0},  # a tie: per_expert again
        8: {"per_expert": 2.0, "sorted": 1.0, "dense": 1.0 * near},  # sorted wins clearly
        16: {"per_expert": 1.0, "sorted": 1.0 * near, "dense": 2.0},  # a tie: sorted, as at 8
    }
    assert table_from_times(times).choices == (
        (1, "per_expert"), (2, "per_expert"), (4, "per_expert"), (8, "sorted"), (16, "sorted"))
    # Without the margin every count takes its fastest, however close.
    assert table_from_times(times, tie=0.0).choices == (
        (1, "dense"), (2, "per_expert"), (4, "sorted"), (8, "sorted"), (16, "per_expert"))


def test_a_kept_table_is_rederived_from_its_times(tmp_path, monkeypatch):
    """The store holds the measured times, so a table kept by an earlier rule, or one without
    times, is not served as it was."""
    import json

    calls = []
    monkeypatch.setattr(moe_tuning, "measure_dispatch", _fake_times(calls))
    table = tune_dispatch(_cfg(), [1, 8], store=tmp_path, extend_last=True)
    (path,) = tmp_path.glob("moe-dispatch-*.json")
    saved = json.loads(path.read_text())
    saved["choices"] = [[1, "dense"], [8, "dense"]]  # what another rule might have chosen
    path.write_text(json.dumps(saved))
    assert tune_dispatch(_cfg(), [1, 8], store=tmp_path, extend_last=True) == table
    assert len(calls) == 1
    path.write_text(json.dumps({"choices": [[1, "dense"], [8, "dense"]], "fallback": "dense"}))
    assert tune_dispatch(_cfg(), [1, 8], store=tmp_path, extend_last=True) == table
    assert len(calls) == 2  # no times kept: measured again


@pytest.mark.slow
def test_a_measured_runner_uses_the_table_in_every_step_and_decodes_as_auto(monkeypatch):
    import uuid

    calls, timed = [], []
    monkeypatch.setattr(moe_tuning, "measure_dispatch", _fake_times(calls))

    def in_model(seconds, counts, candidates=moe_tuning.IN_MODEL_CANDIDATES, rounds=3):
        # The runner's own timer, once per candidate at the smallest count (it compiles a forward
        # each); the choices: per-expert slices below 8 tokens, every expert stacked from 8.
        timed.append((list(counts), [seconds(name, counts[0]) for name in candidates]))
        return {n: {"per_expert_static": 1.0, "expert_chunks": 2.0, "dense": 0.5 if n >= 8 else 3.0} for n in counts}

    monkeypatch.setattr(moe_tuning, "measure_in_model", in_model)
    # A machine no table was kept for (the tests' compilation cache directory outlives a run).
    monkeypatch.setattr(moe_tuning, "_machine", lambda: f"test-{uuid.uuid4()}")
    model = create_model(_cfg())
    measured = make_runner(model, num_slots=4, max_len=64, spec_method="ngram", num_speculative_tokens=3,
                           moe_dispatch="measured")
    # The largest step: 4 prefill rows of a whole 64-token context; decode rows verify 4 tokens each.
    assert calls and calls[0][0] == tuning_counts(4 * 64) and 0 < calls[0][1]
    # Decode and verification steps (up to 4 rows x 5 tokens: k up to 4) are timed as forwards of the runner.
    assert timed and timed[0][0] == tuning_counts(4 * 5) and all(t > 0 for t in timed[0][1])
    target = measured.target
    assert isinstance(target.moe_backend, moe_tuning.DispatchTable)
    assert target.statics.moe_backend is target.moe_backend is measured.moe_dispatch()
    choices = dict(target.moe_backend.choices)
    assert [choices[n] for n in (1, 4, 8, 16)] == ["per_expert_static", "per_expert_static", "dense", "dense"]
    assert choices[64] == "sorted"  # prefill sizes keep the per-layer times
    assert has_expert_slices(target.state)  # experts held per expert: the steps read them in place
    assert target.moe_backend.expert_slices  # and the table says it was measured for that layout

    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12], [3] * 20]
    auto = make_runner(model, num_slots=4, max_len=64, spec_method="ngram", num_speculative_tokens=3)
    got = [c.token_ids for c in Engine(measured, ByteTokenizer()).generate(prompts, params)]
    want = [c.token_ids for c in Engine(auto, ByteTokenizer()).generate(prompts, params)]
    assert got == want


def test_measured_dispatch_leaves_small_experts_and_named_backends_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(moe_tuning, "measure_dispatch", _fake_times(calls))
    small = make_runner(create_model(load_config("tiny-moe")), num_slots=2, max_len=32, moe_dispatch="measured")
    assert small.runner.moe_backend is None and not calls  # 24 KiB of experts a layer: nothing to tell apart
    named = make_runner(create_model(_cfg()), num_slots=2, max_len=32, moe_dispatch="expert_rows")
    assert named.runner.moe_backend == "expert_rows" and not calls
    with pytest.raises(ValueError, match="unknown MoE dispatch 'fastest'"):
        make_runner(create_model(_cfg()), num_slots=2, max_len=32, moe_dispatch="fastest")


def test_serve_measures_the_dispatch_by_default_and_the_engine_api_does_not():
    from jaxspec.serve import options_from_args, parse_args
    from serving.build import EngineOptions

    assert options_from_args(parse_args(["--model", "tiny-moe"]))[0].moe_dispatch == "measured"
    assert options_from_args(parse_args(["--model", "tiny-moe", "--moe-dispatch", "dense"]))[0].moe_dispatch == "dense"
    assert EngineOptions().moe_dispatch == "auto"
    with pytest.raises(ConfigError, match="moe_dispatch: unknown MoE dispatch 'fastest'"):
        EngineOptions(model="tiny-moe", moe_dispatch="fastest").validate()


def test_prefill_logits_at_the_last_position_equal_the_full_projection():
    """A prefill computes the output projection at each row's last valid position only."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxspec.models import KVCache

    cfg = load_config("tiny-moe")
    model = create_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (3, 9)), jnp.int32)
    num_valid = jnp.asarray([9, 4, 1], jnp.int32)
    start = jnp.zeros((3,), jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, at: nnx.merge(graphdef, state)(tokens, start, KVCache.create(cfg, 3, 16),
                                                                    num_valid=num_valid, logits_at=at))
    full, last = forward(state, None), forward(state, num_valid - 1)
    assert last.logits.shape == (3, 1, cfg.vocab_size)
    np.testing.assert_array_equal(last.logits[:, 0], full.logits[jnp.arange(3), num_valid - 1])
    np.testing.assert_array_equal(last.cache.k, full.cache.k)


def test_in_model_times_take_candidates_in_turns_and_keep_the_median():
    order, clock = [], iter(range(1, 100))

    def seconds(name, n):
        order.append((name, n))
        return float(next(clock)) if name == "a" else 10.0

    times = measure_in_model(seconds, [1, 2], candidates=("a", "b"), rounds=3)
    assert order[:4] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)] and len(order) == 12
    assert times == {1: {"a": 3.0, "b": 10.0}, 2: {"a": 4.0, "b": 10.0}}  # a: 1, 3, 5 and 2, 4, 6


def test_in_model_choices_replace_only_the_counts_they_measured():
    table = moe_tuning.DispatchTable(((1, "per_expert"), (8, "sorted"), (64, "expert_chunks")), "expert_chunks")
    got = with_choices_from(table, {1: {"per_expert_static": 1.0, "dense": 2.0}, 8: {"per_expert_static": 3.0, "dense": 1.0}})
    assert got.choices == ((1, "per_expert_static"), (8, "dense"), (64, "expert_chunks"))
    assert got.fallback == "expert_chunks"


def test_experts_stay_stacked_where_per_expert_copies_would_not_fit(monkeypatch):
    import uuid

    import jaxspec.engine.model_runner as model_runner

    calls = []
    monkeypatch.setattr(moe_tuning, "measure_dispatch", _fake_times(calls))
    monkeypatch.setattr(moe_tuning, "measure_in_model", lambda seconds, counts, *a, **k: {
        n: {"per_expert_static": 1.0, "expert_chunks": 2.0, "dense": 3.0} for n in counts})
    monkeypatch.setattr(moe_tuning, "_machine", lambda: f"test-{uuid.uuid4()}")
    model = create_model(_cfg())
    # 1 MiB free: experts of 1.5 MiB a layer do not fit twice.
    monkeypatch.setattr(model_runner, "available_memory", lambda: 1 << 20)
    tight = make_runner(model, num_slots=2, max_len=64, moe_dispatch="measured")
    assert isinstance(tight.runner.moe_backend, moe_tuning.DispatchTable) and not has_expert_slices(tight.runner.state)
    assert not tight.runner.moe_backend.expert_slices
    monkeypatch.setattr(model_runner, "available_memory", lambda: 1 << 40)
    roomy = make_runner(model, num_slots=2, max_len=64, moe_dispatch="measured")
    assert has_expert_slices(roomy.runner.state)


def test_a_runner_on_the_cpu_kernel_keeps_its_experts_stacked_and_speculates_exactly(monkeypatch):
    """Where the C++ kernel (``cpu_fused``) wins every count, no step reads experts per expert, so
    the runner holds them stacked only; speculative greedy output equals plain greedy output."""
    import uuid

    from helpers import moe_backend

    moe_backend("cpu_fused")  # built here (skips only where there is no C++ compiler)
    seen = []

    def fastest_kernel(counts, candidates):
        seen.append(tuple(candidates))
        return {n: {name: 0.5 if name == "cpu_fused" else 1.0 for name in candidates} for n in counts}

    monkeypatch.setattr(moe_tuning, "measure_dispatch", lambda cfg, counts, candidates, *a, **k: fastest_kernel(counts, candidates))
    monkeypatch.setattr(moe_tuning, "measure_in_model", lambda seconds, counts, candidates, *a, **k: fastest_kernel(counts, candidates))
    monkeypatch.setattr(moe_tuning, "_machine", lambda: f"test-{uuid.uuid4()}")
    model = create_model(_cfg())
    spec = make_runner(model, num_slots=4, max_len=64, spec_method="ngram", num_speculative_tokens=3,
                       moe_dispatch="measured")
    plain = make_runner(model, num_slots=4, max_len=64, moe_dispatch="measured")
    assert len(seen) == 4 and all("cpu_fused" in c for c in seen)  # per layer and in the forward, twice
    for runner in (spec.target, plain.runner):
        assert runner.moe_backend.backends() == {"cpu_fused"}
        assert not has_expert_slices(runner.state) and not runner.moe_backend.expert_slices

    from jaxspec.engine import Engine
    from jaxspec.sampling import SamplingParams
    from jaxspec.tokenizer import ByteTokenizer

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12], [3] * 20]
    got = [c.token_ids for c in Engine(spec, ByteTokenizer()).generate(prompts, params)]
    want = [c.token_ids for c in Engine(plain, ByteTokenizer()).generate(prompts, params)]
    assert got == want and all(len(t) == 16 for t in got)


def test_the_cpu_kernel_is_a_candidate_for_float32_experts_only():
    from helpers import moe_backend

    moe_backend("cpu_fused")
    assert moe_tuning.with_kernel(_cfg(), ("dense",)) == ("cpu_fused", "dense")  # first: ties go to it
    tied = moe_tuning.table_from_times({1: {"cpu_fused": 1.03, "dense": 1.0}})
    assert tied.choices == ((1, "cpu_fused"),)
    assert moe_tuning.with_kernel(_cfg(dtype="bfloat16"), ("dense",)) == ("dense",)
    table = moe_tuning.DispatchTable(((1, "cpu_fused"), (8, "expert_chunks")), "dense")
    assert table.backends() == {"cpu_fused", "expert_chunks", "dense"} and moe_tuning.uses_expert_slices(table)
    assert not moe_tuning.uses_expert_slices(moe_tuning.DispatchTable(((1, "cpu_fused"),), "cpu_fused"))
    assert moe_tuning.uses_expert_slices(moe_tuning.DispatchTable(((1, "cpu_fused"),), "auto"))  # auto: per_expert... on CPU
