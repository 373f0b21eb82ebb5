"""Weight-only quantization (jaxspec.models.quant): the formats' error bounds, a quantized
model's logits against float, speculative decoding staying exact for a quantized target
and draft, quantized model directories, and the CLI flags."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import full_forward, scaled_model
from jaxspec.config import load_config
from jaxspec.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.models import create_model
from jaxspec.models.moe_dispatch import BACKENDS, load_backend
from jaxspec.models.quant import (
    QArray,
    QuantizedWeight,
    dequantize,
    pack_int4,
    qeinsum,
    quantize,
    quantize_model,
    unpack_int4,
    weight_bytes,
)
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import perturbed_copy
from jaxspec.tokenizer import ByteTokenizer


def _spread_weight(shape, seed=0) -> jax.Array:
    """Normal weights whose magnitude varies by 1000x across every axis, so one scale too coarse
    (per tensor instead of per channel, per channel instead of per group) breaks the bounds."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    w = jax.random.normal(key1, shape)
    return w * 10.0 ** jax.random.uniform(key2, shape, minval=-3, maxval=0)


# ------------------------------------------------------------------------- formats
def test_int4_packing_round_trips_every_value():
    values = jnp.array(np.random.default_rng(0).integers(-8, 8, (6, 10, 3)), jnp.int8)
    for axis in (-3, -2):
        packed = pack_int4(values, axis)
        assert packed.dtype == jnp.int8 and packed.shape[axis] == values.shape[axis] // 2
        np.testing.assert_array_equal(unpack_int4(packed, axis), values)


def test_int8_per_channel_error_bound():
    """|w - dequant(q)| <= amax(channel) / 254 everywhere: the error of rounding to the grid of
    that output channel's own scale (amax over the contracted axis / 127)."""
    w = _spread_weight((3, 64, 40))  # [E, D, F], contracted D
    qa = quantize(w, (1,), 8)
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (3, 1, 40)
    bound = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 254
    err = jnp.abs(dequantize(qa) - w)
    assert bool(jnp.all(err <= bound * 1.001 + 1e-12))
    # The channels' scales differ (the test is sensitive to them): a per-tensor scale would miss.
    assert float(jnp.max(err / bound)) > 0.5
    per_tensor = jnp.max(jnp.abs(w)) / 127
    assert bool(jnp.any(jnp.abs(jnp.round(w / per_tensor) * per_tensor - w) > bound))


def test_int8_scale_spans_every_contracted_axis():
    w = _spread_weight((4, 8, 24), seed=1)  # [H, Dh, D] (wo): contracted H and Dh
    qa = quantize(w, (0, 1), 8)
    assert qa.scale.shape == (1, 1, 24)
    bound = jnp.max(jnp.abs(w), axis=(0, 1), keepdims=True) / 254
    assert bool(jnp.all(jnp.abs(dequantize(qa) - w) <= bound * 1.001 + 1e-12))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_grouped_error_bound(group):
    """|w - dequant(q)| <= amax(group) / 14 everywhere, with groups of ``group`` along the contracted axis."""
    w = _spread_weight((2, 256, 24), seed=2)  # [E, D, F], contracted D
    qa = quantize(w, (1,), 4, group)
    assert qa.q.shape == (2, 128, 24) and qa.scale.shape == (2, 256 // group, 24) and qa.shape == w.shape
    amax = jnp.max(jnp.abs(w.reshape(2, 256 // group, group, 24)), axis=2)
    bound = jnp.repeat(amax, group, axis=1) / 14
    err = jnp.abs(dequantize(qa) - w)
    assert bool(jnp.all(err <= bound * 1.001 + 1e-12))
    assert float(jnp.max(err / bound)) > 0.5
    if group < 256:  # a single scale per channel would break the grouped bound
        per_channel = jnp.max(jnp.abs(w), axis=1, keepdims=True) / 7
        assert bool(jnp.any(jnp.abs(jnp.clip(jnp.round(w / per_channel), -7, 7) * per_channel - w) > bound))


def test_int4_group_divides_the_axis():
    qa = quantize(jnp.ones((192, 8)), (0,), 4, 128)  # 192 is no multiple of 128: groups of gcd = 64
    assert qa.scale.shape == (3, 8)
    with pytest.raises(ValueError, match="even"):
        quantize(jnp.ones((7, 8)), (0,), 4, 128)


def test_zero_weights_stay_zero():
    for bits in (8, 4):
        w = jnp.zeros((16, 4)).at[:, 1].set(1.0)
        np.testing.assert_array_equal(dequantize(quantize(w, (0,), bits, 8)), w)


@pytest.mark.parametrize("bits", [8, 4])
def test_qeinsum_is_einsum_with_the_dequantized_weight(bits):
    w = _spread_weight((3, 32, 16), seed=3)  # [E, D, F]
    x = jax.random.normal(jax.random.PRNGKey(9), (3, 5, 32))
    qa = quantize(w, (1,), bits, 16)
    want = jnp.einsum("erd,edf->erf", x, dequantize(qa))
    np.testing.assert_allclose(qeinsum("erd,edf->erf", x, qa), want, rtol=1e-5, atol=1e-5)
    # Indexing leading axes (an expert, a gather of tiles' experts) keeps the format.
    np.testing.assert_allclose(qeinsum("rd,df->rf", x[1], qa[1]), want[1], rtol=1e-5, atol=1e-5)
    tiles = jnp.array([2, 0, 2])
    np.testing.assert_allclose(qeinsum("trd,tdf->trf", x, qa[tiles]), jnp.einsum("trd,tdf->trf", x, dequantize(qa)[tiles]),
                               rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- models
def test_quantize_model_replaces_the_projections_and_keeps_axes():
    model = quantize_model(create_model(load_config("tiny-moe"), 0), "int8")
    attn, moe = model.layers[0].attn, model.layers[0].moe
    assert model.cfg.quantization == "int8"
    for w in (attn.wq, attn.wk, attn.wv, attn.wo, moe.w_gate, moe.w_up, moe.w_down, model.lm_head):
        assert isinstance(w, QuantizedWeight) and w.q.dtype == jnp.int8
    assert isinstance(model.embed, nnx.Param) and isinstance(moe.router, nnx.Param)  # embeddings, router: float
    assert moe.w_gate.q.get_metadata()["logical_axes"] == ("expert", "embed", "moe_mlp")
    assert moe.w_gate.scale.get_metadata()["logical_axes"] == ("expert", None, "moe_mlp")
    assert attn.wo.scale.get_metadata()["logical_axes"] == (None, None, "embed")
    assert isinstance(attn.wq[...], QArray)
    int4 = quantize_model(create_model(load_config("tiny-moe"), 0), "int4", 32)
    w = int4.layers[0].moe.w_down  # [E, F, D], F=64 in groups of 32, packed along F
    assert w.q.shape == (4, 32, 64) and w.scale.shape == (4, 2, 64)
    assert w.scale.get_metadata()["logical_axes"] == ("expert", "moe_mlp", "embed")
    float_bytes = weight_bytes(create_model(load_config("tiny-moe"), 0))
    assert weight_bytes(int4) < weight_bytes(model) < float_bytes / 2


def test_quantize_model_refuses_twice():
    model = quantize_model(create_model(load_config("tiny-dense"), 0), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_model(create_model(load_config("tiny-dense"), 0), "fp8")


@pytest.mark.parametrize("config", ["tiny-moe", "tiny-qwen2-moe"])  # plain MoE; shared expert, biases, a dense layer
def test_quantized_logits_close_to_float(config):
    """Logits of the quantized model against float, relative to the logits' spread (scaled random
    weights: logits far from uniform). Rounding noise per weight has std amax / (qmax * sqrt(12)):
    for Gaussian weights (amax ~ 2.5 std) 0.6% of the weights' std for int8, 10% for int4 in
    groups of 32; about nine projections in series compound it to ~2% and ~30% of the logits'
    spread. Bounds: twice that, on the median position, because a flipped top-k routing choice
    (a legitimate discontinuity of MoE) moves a few positions further. Wrong scales (per tensor,
    or misplaced) give errors of the order of the spread itself."""
    model = scaled_model(config, seed=0)
    tokens = np.random.default_rng(0).integers(3, 259, 48)
    want = full_forward(model, tokens)
    bounds = {"int8": (0.04, 0.9), "int4": (0.5, 0.45)}  # (median relative error, greedy agreement)
    for mode, (rel, agree) in bounds.items():
        graphdef, state = nnx.split(model)
        copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        got = full_forward(quantize_model(copy, mode, 32), tokens)
        per_position = np.sqrt(np.mean((got - want) ** 2, axis=-1)) / np.std(want)  # [T]
        assert np.median(per_position) < rel, (mode, per_position)
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= agree, mode


@pytest.mark.parametrize("backend", ["dense", "sorted", "per_expert", "per_expert_static", "expert_rows", "ragged", "pallas"])
def test_every_dispatch_backend_reads_quantized_experts(backend):
    assert load_backend(backend), f"{backend} is not registered"
    e, d, f, n = 4, 32, 16, 12
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (n, d))
    ws = [quantize(_spread_weight(s, seed=i), (1,), bits, 16)
          for i, (s, bits) in enumerate((((e, d, f), 8), ((e, d, f), 4), ((e, f, d), 8)))]
    ids = jax.random.randint(keys[1], (n, 2), 0, e).at[0].set(e)  # row 0: a padding token (id E, weight 0, as
    gates = jax.nn.softmax(jax.random.normal(keys[2], (n, 2))).at[0].set(0.0)  # MoEBlock routes padding)
    want = BACKENDS["dense"](x, ids, gates, *(dequantize(w) for w in ws))
    got = jax.jit(BACKENDS[backend])(x, ids, gates, *ws)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("local", ["per_expert", "dense", "grouped"])
def test_expert_parallel_reads_quantized_experts(local):
    """Experts split over a (data 2, expert 2, tensor 2) mesh of CPU devices: the int8 scales'
    size-1 contracted axis is replicated, int4 groups split with the width they scale."""
    from jax.sharding import Mesh

    from jaxspec.models.moe_parallel import ExpertParallel

    mesh = Mesh(np.asarray(jax.devices()[:8], dtype=object).reshape(2, 2, 2), ("data", "expert", "tensor"))
    e, d, f, n = 8, 32, 64, 16
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], (n, d))
    ws = [quantize(_spread_weight(s, seed=i), (1,), bits, 16)
          for i, (s, bits) in enumerate((((e, d, f), 8), ((e, d, f), 4), ((e, f, d), 4 if local == "dense" else 8)))]
    ids = jax.random.randint(keys[1], (n, 2), 0, e)
    gates = jax.nn.softmax(jax.random.normal(keys[2], (n, 2)))
    want = BACKENDS["dense"](x, ids, gates, *(dequantize(w) for w in ws))
    backend = ExpertParallel(mesh, ("expert",), ("tensor",), ("data",), local)
    got = jax.jit(lambda *a: backend(*a))(x, ids, gates, *ws)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------ speculative decoding
@pytest.mark.slow
def test_greedy_speculative_equals_greedy_plain_of_the_same_quantized_target():
    """Speculation is exact for whichever target is served: an int8 target with an int4 draft
    (a noisy copy of the float target, so some proposals are rejected) decodes exactly what the
    int8 target decodes alone."""
    cfg = load_config("tiny-moe")
    float_target = create_model(cfg, 0)
    draft = quantize_model(perturbed_copy(float_target, 0.15, seed=1), "int4", 32)
    target = quantize_model(float_target, "int8")
    prompts = [list(np.random.default_rng(i).integers(3, 259, n)) for i, n in enumerate((5, 9, 13))]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    def run(**kw):
        engine = Engine(make_runner(target, num_slots=4, max_len=64, **kw), ByteTokenizer())
        return [o.token_ids for o in engine.generate(prompts, params)], engine

    plain, _ = run()
    spec, engine = run(spec_method="draft", draft=draft, num_speculative_tokens=4)
    assert spec == plain
    stats = engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # the draft was used, and was imperfect


# ---------------------------------------------------------------------- directories
def test_quantized_model_directory_round_trip(tmp_path):
    from jaxspec.checkpoint.orbax_io import load_model, save_model

    model = quantize_model(create_model(load_config("tiny-moe"), 0), "int4", 32)
    save_model(tmp_path / "m", model, ByteTokenizer())
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.cfg.quantization == "int4" and loaded.cfg.quant_group_size == 32
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    tokens = np.arange(3, 30)
    np.testing.assert_array_equal(full_forward(loaded, tokens), full_forward(model, tokens))


def test_load_any_quantizes_at_load_and_keeps_a_saved_precision(tmp_path):
    from jaxspec.checkpoint.orbax_io import save_model
    from jaxspec.config import ConfigError
    from jaxspec.loading import load_any

    model, _ = load_any("tiny-moe", quantize="int8")  # a config name (random weights)
    assert model.cfg.quantization == "int8" and isinstance(model.layers[0].moe.w_gate, QuantizedWeight)
    save_model(tmp_path / "float", create_model(load_config("tiny-dense"), 0), ByteTokenizer())
    loaded, _ = load_any(str(tmp_path / "float"), quantize="int4")  # a float directory, quantized at load
    assert loaded.cfg.quantization == "int4"
    save_model(tmp_path / "int4", loaded, ByteTokenizer())
    assert load_any(str(tmp_path / "int4"))[0].cfg.quantization == "int4"  # as saved
    assert load_any(str(tmp_path / "int4"), quantize="int4")[0].cfg.quantization == "int4"
    with pytest.raises(ConfigError, match="saved quantized"):
        load_any(str(tmp_path / "int4"), quantize="int8")


# ------------------------------------------------------------------------------ CLI
def test_generate_flags_quantize_target_and_draft():
    from jaxspec import generate

    parser = generate.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int2", "x"])
    args = parser.parse_args(["--model", "tiny-moe", "--draft", "tiny-moe", "--quantize", "int8",
                              "--draft-quantize", "int4", "--max-len", "64", "--kernel-selftest", "off", "x"])
    engine = generate.build_engine(args)
    assert generate.precision(engine) == {"target": {"dtype": "float32", "quantization": "int8"},
                                          "draft": {"dtype": "float32", "quantization": "int4"}}
    args = parser.parse_args(["--model", "tiny-moe", "--spec-method", "ngram", "--draft-quantize", "int4", "x"])
    with pytest.raises(ValueError, match="draft-quantize"):
        generate.build_engine(args)


def test_serve_flags_reach_the_engine_options_and_model_info():
    from jaxspec.config import ConfigError
    from jaxspec.serve import options_from_args, parse_args
    from serving.build import EngineOptions, load_engine

    opts, _ = options_from_args(parse_args(["--model", "tiny-moe", "--draft", "tiny-moe", "--quantize", "int4",
                                            "--draft-quantize", "int8"]))
    assert (opts.quantize, opts.draft_quantize, opts.spec_method) == ("int4", "int8", "draft")
    assert options_from_args(parse_args(["--model", "tiny-moe", "--spec-method", "none"]))[0].quantize is None
    with pytest.raises(ConfigError, match="draft-quantize"):
        options_from_args(parse_args(["--model", "tiny-moe", "--spec-method", "none", "--draft-quantize", "int4"]))
    with pytest.raises(ConfigError, match="quantize"):
        EngineOptions(model="tiny-moe", quantize="fp8").validate()
    bundle = load_engine(EngineOptions(model="tiny-moe", draft="tiny-moe", spec_method="draft", quantize="int8",
                                       draft_quantize="int4", slots=2, max_len=64, kernel_selftest=False))
    d = bundle.description
    assert (d.dtype, d.quantization, d.draft_quantization) == ("float32", "int8", "int4")


def test_memory_planner_counts_quantized_bytes():
    """The planner builds the abstract model from the config, quantization included."""
    from jaxspec.planning import check_fits_on_device

    cfg = load_config("tiny-moe")
    plans = {q: check_fits_on_device(cfg.replace(quantization=q), 2, 64) for q in (None, "int8", "int4")}
    assert plans["int4"].weights < plans["int8"].weights < plans[None].weights / 2
    assert plans["int8"].weights == weight_bytes(quantize_model(create_model(cfg, 0), "int8"))
    assert plans["int8"].kv_cache == plans[None].kv_cache  # weights only: the KV cache keeps its dtype
