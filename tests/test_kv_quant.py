"""int8 KV cache (per-head-per-token scales): the quantizer's error bound, slot and paged forwards
against the float cache, greedy speculative == greedy plain on an int8-KV target, the bytes it
saves, and the flags that choose it."""

from __future__ import annotations

import functools

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import feed_in_blocks, full_forward, scaled_model
from jaxspec.config import ConfigError, load_config
from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.models import KVCache, create_model
from jaxspec.models.kv_cache import check_kv_dtype, dequantize_kv, quantize_kv
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner, perturbed_copy
from jaxspec.tokenizer import ByteTokenizer


# ----------------------------------------------------------------------------- the quantizer
def test_quantize_dequantize_error_is_at_most_half_a_step_per_vector():
    rng = np.random.default_rng(0)
    # Vectors of very different magnitudes (one scale each), an all-zero one and one spike.
    x = rng.normal(size=(3, 5, 4, 64)) * np.exp(rng.uniform(-6, 6, size=(3, 5, 4, 1)))
    x[0, 0, 0] = 0.0
    x[1, 2, 3] = 0.0
    x[1, 2, 3, 7] = 1e4
    q, scale = quantize_kv(jnp.asarray(x, jnp.float32))
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
    back = np.asarray(dequantize_kv(q, scale, jnp.float32))
    assert np.all(np.isfinite(back))
    absmax = np.abs(x).max(axis=-1, keepdims=True)
    # Rounding to the nearest of 255 levels over [-absmax, absmax]: at most absmax / 254 per element.
    assert np.all(np.abs(back - x) <= absmax / 254 * (1 + 1e-5) + 1e-30)
    assert np.all(back[0, 0, 0] == 0) and back[1, 2, 3, 7] == pytest.approx(1e4, rel=1e-6)
    assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127  # the full range is used


# ----------------------------------------------------------------------------- forwards
SEQ_LENS = (30, 19)
PLAN = (5, 1, 7, 3, 8, 6, 2)  # tokens per forward: prefill-like blocks and single-token decodes


@functools.cache
def _model():
    return scaled_model("tiny-moe")


@functools.cache
def _fwd(graphdef):
    return jax.jit(lambda state, tokens, start, cache, slot_ids, num_valid: nnx.merge(graphdef, state)(
        tokens, start, cache, slot_ids, num_valid, kv_len=48))


def _run_blocks(model, cache: KVCache, seqs, slot_of) -> tuple[list[np.ndarray], KVCache]:
    """Feed two sequences through ``cache`` in the blocks of PLAN -> (logits [T, V] per sequence, cache)."""
    graphdef, state = nnx.split(model)
    return feed_in_blocks(_fwd(graphdef), state, cache, seqs, slot_of, PLAN)


def _seqs(model):
    rng = np.random.default_rng(0)
    return [rng.integers(3, model.cfg.vocab_size, size=n) for n in SEQ_LENS]


def _paged_cache(cfg, kv_dtype):
    cache = KVCache.create(cfg, 4, 48, num_pages=20, page_size=8, kv_dtype=kv_dtype)
    table = np.full((4, 6), 20, np.int32)
    table[2] = [7, 3, 11, 0, 19, 5]  # scattered, interleaved with slot 0's pages
    table[0, :4] = [1, 18, 2, 4]
    return cache._replace(page_table=jnp.asarray(table))


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@functools.cache
def _slot_int8_logits():
    model = _model()
    cache = KVCache.create(model.cfg, 4, 48, kv_dtype="int8")
    assert cache.quantized and cache.k.dtype == jnp.int8 and cache.k_scale.shape == (2, 4, model.cfg.num_kv_heads, 48)
    logits, cache = _run_blocks(model, cache, _seqs(model), [2, 0])
    return logits, cache


def test_slot_int8_forward_is_close_to_the_float_cache():
    model = _model()
    refs = [full_forward(model, s) for s in _seqs(model)]  # float32 cache, one forward
    logits, cache = _slot_int8_logits()
    for got, want in zip(logits, refs):
        err = _relative_error(got, want)
        assert 0 < err < 2e-2, err  # quantized (not bit-equal to float), and close
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # Values and scales landed in the rows' slots (padding tokens past a row's length are written too,
    # stale until overwritten), never in the other slots.
    scales = np.asarray(cache.k_scale)  # [L, S, K, M]
    assert np.all(scales[:, 2, :, :30] > 0) and np.all(scales[:, 0, :, :19] > 0)
    assert np.all(scales[:, [1, 3]] == 0)
    assert np.all(np.asarray(cache.k)[:, [1, 3]] == 0)


def test_paged_int8_forward_equals_the_slot_int8_forward():
    """Same tokens, same per-token quantization: the paged pool reads back what the slot cache does."""
    model = _model()
    slot_logits, _ = _slot_int8_logits()
    logits, cache = _run_blocks(model, _paged_cache(model.cfg, "int8"), _seqs(model), [2, 0])
    for got, want in zip(logits, slot_logits):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    # The scales follow the table: slot 2's first page is page 7 (flat positions 56..63), page 6 is unused.
    scales = np.asarray(cache.k_scale).reshape(2, model.cfg.num_kv_heads, 20, 8)
    assert np.all(scales[:, :, 7] > 0) and np.all(scales[:, :, 6] == 0)
    assert np.all(scales[:, :, 0] > 0)  # slot 2's 4th page (positions 24..31)


@pytest.mark.slow
@pytest.mark.parametrize("paged", [False, True])
def test_pallas_backend_with_an_int8_cache_matches_the_xla_path(paged):
    model = _model()
    graphdef, state = nnx.split(model)
    seqs = _seqs(model)
    make = (lambda: _paged_cache(model.cfg, "int8")) if paged else (
        lambda: KVCache.create(model.cfg, 4, 48, kv_dtype="int8"))
    cache = make()
    toks = np.zeros((2, 16), np.int32)
    for r in range(2):
        toks[r, :16] = seqs[r][:16]
    args = (jnp.asarray(toks), jnp.zeros(2, jnp.int32), cache, jnp.array([2, 0], jnp.int32), jnp.full(2, 16, jnp.int32))
    outs = {b: nnx.merge(graphdef, state)(*args, kv_len=16 if paged else 48, attention_backend=b) for b in ("xla", "pallas")}
    np.testing.assert_allclose(np.asarray(outs["pallas"].logits), np.asarray(outs["xla"].logits), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- engines
SLOTS, MAX_LEN = 4, 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@functools.cache
def _target():
    return create_model(load_config("tiny-moe"), 0)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in (3, 7, 11, 5)]


def _generate(runner, prompts):
    return [tuple(o.token_ids) for o in Engine(runner, ByteTokenizer()).generate(prompts, GREEDY)]


@pytest.mark.slow
@pytest.mark.parametrize("paged", [False, True])
def test_greedy_speculative_equals_greedy_plain_with_an_int8_target(paged):
    target = _target()
    prompts = _prompts(target.cfg.vocab_size)
    pages = dict(page_size=8, num_pages=SLOTS * MAX_LEN // 8) if paged else {}
    plain_runner = ModelRunner(target, SLOTS, MAX_LEN, kv_dtype="int8", **pages)
    assert plain_runner.cache.quantized and plain_runner.cache.paged == paged
    plain = _generate(PlainRunner(plain_runner), prompts)
    # The draft's cache is int8 too (its own option): it costs acceptance, never the output.
    proposer = DraftModelProposer(perturbed_copy(target, 0.15, seed=1), kv_dtype="int8")
    spec = SpeculativeRunner(ModelRunner(target, SLOTS, MAX_LEN, kv_dtype="int8", **pages), proposer,
                             num_speculative_tokens=4, k_max=4)
    assert _generate(spec, prompts) == plain
    assert proposer.cache.quantized
    # The float target decodes the same prompts (almost always) the same: int8 KV changes little.
    float_plain = _generate(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN, **pages)), prompts)
    agree = np.mean([a == b for p, q in zip(plain, float_plain) for a, b in zip(p, q)])
    assert agree >= 0.8, agree


@pytest.mark.slow  # about 35 s on the shared 2-core machine
def test_greedy_prompt_lookup_equals_greedy_plain_with_an_int8_target():
    """The quick form of the test above: prompt lookup (no draft model to compile), two requests."""
    from jaxspec.speculative import NgramProposer

    target = _target()
    prompts = [p + p[:4] for p in _prompts(target.cfg.vocab_size)[1:3]]  # repeats give lookup matches
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = Engine(PlainRunner(ModelRunner(target, 2, 32, kv_dtype="int8")), ByteTokenizer()).generate(prompts, params)
    spec = SpeculativeRunner(ModelRunner(target, 2, 32, kv_dtype="int8"), NgramProposer(), num_speculative_tokens=2,
                             k_max=2)
    engine = Engine(spec, ByteTokenizer())
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]
    assert engine.spec_stats.num_draft_tokens > 0  # verification really ran over drafted tokens


# ----------------------------------------------------------------------------- bytes and flags
def test_int8_cache_takes_about_half_the_bytes_of_bfloat16():
    cfg = load_config("tiny-moe").replace(dtype="bfloat16")
    for pages in ({}, dict(num_pages=64, page_size=16)):
        bf16 = KVCache.abstract(cfg, 4, 256, **pages).nbytes()
        int8 = KVCache.abstract(cfg, 4, 256, kv_dtype="int8", **pages).nbytes()
        # int8 values (half) plus one float32 scale per head per token: 4 / head_dim more.
        values = 2 * cfg.num_layers * 4 * 256 * cfg.num_kv_heads * cfg.head_dim
        scales = 2 * cfg.num_layers * 4 * 256 * cfg.num_kv_heads * 4
        assert int8 - (bf16 - 2 * values) == values + scales, pages
        assert 0.5 < int8 / bf16 < 0.5 + 4 / cfg.head_dim / 2 + 0.01, (pages, int8 / bf16)
        created = KVCache.create(cfg, 4, 256, kv_dtype="int8", **pages)
        assert created.nbytes() == int8 and created.kv_dtype == "int8"


def test_planner_counts_int8_kv_bytes():
    from jaxspec.planning import plan_memory
    from jaxspec.mesh import load_mesh_config

    cfg = load_config("qwen3-30b-a3b").replace(dtype="bfloat16")
    mesh = load_mesh_config("tpu-v5e-4")
    kw = dict(compile=False, devices=None)
    base = plan_memory(cfg, mesh, 8, 4096, **kw)  # libtpu (test extras) supplies the v5e topology
    q = plan_memory(cfg, mesh, 8, 4096, kv_dtype="int8", **kw)
    assert q.kv_dtype == "int8" and base.kv_dtype == "bfloat16"
    assert 0.5 < q.kv_cache / base.kv_cache < 0.52
    assert q.kv_bytes_per_token < 0.52 * base.kv_bytes_per_token
    assert q.weights == base.weights and "KV cache (int8)" in q.table()


def test_bad_kv_dtype_values_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown KV cache dtype 'fp8'; choose from auto, int8"):
        check_kv_dtype("fp8")
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        KVCache.abstract(load_config("tiny-moe"), 2, 16, kv_dtype="int4")
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        ModelRunner(_target(), 2, 16, kv_dtype="float8")
    assert check_kv_dtype("auto") is None and check_kv_dtype(None) is None and check_kv_dtype("int8") == "int8"

    from jaxspec.serve import options_from_args, parse_args
    from serving.build import EngineOptions

    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "fp8"])
    engine, _ = options_from_args(parse_args(["--model", "tiny-moe", "--kv-cache-dtype", "int8"]))
    assert engine.kv_cache_dtype == "int8" and engine.draft_kv_cache_dtype == "auto"
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, int8, got 'fp8'"):
        EngineOptions(model="tiny-moe", kv_cache_dtype="fp8").validate()
    with pytest.raises(ConfigError, match="--draft-kv-cache-dtype sets a draft model's or EAGLE-3 head's cache"):
        EngineOptions(model="tiny-moe", draft_kv_cache_dtype="int8").validate()


def test_plan_memory_tool_refuses_a_bad_kv_dtype(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as e:
        tool.main(["tiny-moe", "cpu-8", "--kv-cache-dtype", "fp8"])
    assert e.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_server_options_build_int8_caches_for_target_and_draft():
    from serving.build import EngineOptions, load_engine

    opts = EngineOptions(model="tiny-moe", draft="tiny-moe", spec_method="draft", slots=2, max_len=32,
                         kv_cache="paged", page_size=8, kv_cache_dtype="int8", draft_kv_cache_dtype="int8",
                         kernel_selftest=False, mesh=None)
    bundle = load_engine(opts)
    runner = bundle.engine.runner._inner  # under serving's GuardedRunner: the SpeculativeRunner
    assert runner.target.cache.quantized and runner.target.cache.paged
    assert runner.proposer.cache.quantized and runner.proposer.cache.paged
    assert bundle.description.kv_cache_dtype == "int8"
    plain = load_engine(EngineOptions(model="tiny-moe", slots=2, max_len=32, kernel_selftest=False, mesh=None))
    assert plain.description.kv_cache_dtype == "float32"


def test_kernel_selftest_checks_verify_attention_for_an_int8_paged_runner():
    """An int8 pool is gathered and attended by verify_attention (the paged kernel has no int8 input):
    the self-test checks that kernel, and falls back to XLA when it disagrees."""
    from jaxspec import kernels
    from jaxspec.kernels import KernelCheck

    runner = ModelRunner(_target(), 2, 64, attention_backend="pallas", page_size=16, num_pages=8, kv_dtype="int8")
    failing = lambda *a, **k: KernelCheck("verify_attention", False, "injected")  # noqa: E731
    unexpected = lambda *a, **k: KernelCheck("paged_attention", True, "")  # noqa: E731
    passing = lambda *a, **k: KernelCheck("gmm", True, "")  # noqa: E731
    results = kernels.selftest(runner, force=True, checks={"verify_attention": failing, "paged_attention": unexpected,
                                                           "gmm": passing})
    assert [r.kernel for r in results if r.kernel != "gmm"] == ["verify_attention"]
    assert runner.statics.attention_backend == "xla"


def test_kv_memory_fraction_counts_the_bytes_of_int8_pages(monkeypatch):
    """--kv-memory-fraction sizes the pool by the bytes an int8 page really takes (values + scales)."""
    import dataclasses

    from jaxspec import mesh
    from serving.build import EngineOptions, pages_for_memory_fraction

    model = _target()  # float32: int8 values are a quarter of the bytes, plus 4 / head_dim for the scales
    monkeypatch.setattr(mesh, "device_memory_bytes", lambda device: 64 << 20)
    opts = EngineOptions(model="tiny-moe", kv_cache="paged", page_size=8, kv_memory_fraction=0.5, max_len=128)
    float_pages = pages_for_memory_fraction(opts, model, None)
    int8_pages = pages_for_memory_fraction(dataclasses.replace(opts, kv_cache_dtype="int8"), model, None)
    cfg = model.cfg
    page = 2 * cfg.num_layers * 8 * cfg.num_kv_heads * (cfg.head_dim + 4)  # int8 values + float32 scales
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert int8_pages == int(((32 << 20) - weights) // page)
    # float32 pages take 4 * head_dim bytes per head and position, int8 ones head_dim + 4.
    assert int8_pages / float_pages == pytest.approx(4 * cfg.head_dim / (cfg.head_dim + 4), rel=0.01)


@pytest.mark.slow
def test_greedy_eagle3_with_int8_caches_equals_greedy_plain():
    """An EAGLE-3 head with its own int8 cache, proposing for an int8-KV target: the output is the
    plain int8-KV target's."""
    from jaxspec.engine.factory import make_runner
    from jaxspec.models.eagle3 import Eagle3Config, Eagle3Head

    target = _target()
    cfg = target.cfg
    head_cfg = Eagle3Config(name="int8-kv-head", hidden_size=cfg.d_model, target_hidden_size=cfg.d_model,
                            vocab_size=cfg.vocab_size, draft_vocab_size=cfg.vocab_size, num_heads=cfg.num_heads,
                            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
                            aux_layers=(0, 1, cfg.num_layers), max_seq_len=MAX_LEN)
    head = Eagle3Head(head_cfg, nnx.Rngs(params=3))
    prompts = _prompts(cfg.vocab_size)
    plain = _generate(PlainRunner(ModelRunner(target, SLOTS, MAX_LEN, kv_dtype="int8")), prompts)
    runner = make_runner(target, num_slots=SLOTS, max_len=MAX_LEN, spec_method="eagle3", draft=head,
                         num_speculative_tokens=2, k_max=2, kv_dtype="int8", draft_kv_dtype="int8")
    assert runner.proposer.cache.quantized and runner.target.cache.quantized
    assert _generate(runner, prompts) == plain


def test_generate_cli_runs_an_int8_kv_cache(capsys):
    from jaxspec import generate

    argv = ["--model", "tiny-moe", "--spec-method", "none", "--max-tokens", "6", "--ignore-eos", "--json", "ab"]
    assert generate.main([*argv, "--kv-cache-dtype", "int8"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] == 6
    with pytest.raises(SystemExit):
        generate.main([*argv, "--kv-cache-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
