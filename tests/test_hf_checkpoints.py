"""Hugging Face checkpoints: logits and greedy tokens match transformers for every supported family.

Each family gets a tiny random-weight model built by transformers (several layers,
experts, GQA with head_dim != hidden / heads, biases, q/k norm, scaled RoPE,
sliding window, dense layers inside an MoE model), saved with save_pretrained and
loaded by jaxspec in float32.
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxspec.checkpoint import CheckpointError, load_hf, load_hf_config, load_model  # noqa: E402
from jaxspec.checkpoint.hf_config import hf_to_model_config  # noqa: E402
from jaxspec.config import ConfigError  # noqa: E402
from jaxspec.hf_tokenizer import HFTokenizer, byte_level_alphabet  # noqa: E402
from jaxspec.models import KVCache  # noqa: E402
from jaxspec.tokenizer import IncrementalDetokenizer, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 320
PROMPT_LENGTHS = (5, 9, 12)
DECODE_STEPS = 16
GENERATE_STEPS = 32
TOL = 1e-4

# Shared by every family: GQA 4 query / 2 kv heads with head_dim 24 != 64 / 4.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    initializer_range=0.1,  # logits far from uniform, so comparisons are sensitive
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,  # generate() runs the full length on both sides
    pad_token_id=0,
)

FAMILIES = {
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40, num_experts=4,
             num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=False),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
             mlp_only_layers=[2]),
    ),
    "llama": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(intermediate_size=48, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    ),
    "mistral": (
        "MistralConfig", "MistralForCausalLM",
        dict(intermediate_size=48, sliding_window=7),  # shorter than the prompts: the window matters
    ),
    "qwen2": (
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(intermediate_size=48, tie_word_embeddings=True),
    ),
    "qwen3": (
        "Qwen3Config", "Qwen3ForCausalLM",
        dict(intermediate_size=48, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ),
}


# ------------------------------------------------------------------------ helpers
def _byte_level_tokenizer() -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld naïve café", "日本語のテキスト"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>", "<s>"]
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _write_tokenizer(directory: Path) -> None:
    _byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>", "add_bos_token": True})
    )


def _build_hf(family: str, directory: Path, seed: int = 0, dtype=torch.float32, **save_kwargs):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**_COMMON, **extra)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    model.save_pretrained(directory, **save_kwargs)
    _write_tokenizer(directory)
    return model


# One jitted forward per model structure and one cache shape for every test, so the
# compiled executables (the bulk of this file's run time) are shared between tests.
CACHE_LEN = max(PROMPT_LENGTHS) + GENERATE_STEPS
_FORWARDS: dict[str, object] = {}


def _jit_forward(model):
    """(tokens, start, cache, num_valid) -> (logits, cache), with the cache donated."""
    graphdef, state = nnx.split(model)
    key = json.dumps({**model.cfg.to_dict(), "name": ""}, sort_keys=True)
    if key not in _FORWARDS:

        @partial(jax.jit, donate_argnums=(3,))
        def forward(state, tokens, start, cache, num_valid):
            out = nnx.merge(graphdef, state)(tokens, start, cache, num_valid=num_valid)
            return out.logits, out.cache

        _FORWARDS[key] = forward
    fn = _FORWARDS[key]
    # Commit the inputs where the weights are (replicated over a mesh): committed and
    # uncommitted arguments would otherwise compile separately.
    weights = jax.tree.leaves(state)[0].sharding
    if isinstance(weights, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(weights.mesh, jax.sharding.PartitionSpec())
    else:
        where = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def call(tokens, start, cache, num_valid):
        tokens, start, num_valid = (jax.device_put(jnp.asarray(x, jnp.int32), where) for x in (tokens, start, num_valid))
        return fn(state, tokens, start, cache, num_valid)

    return call


def _prefill(model, prompts: list[np.ndarray]) -> np.ndarray:
    tokens, lengths = _padded(prompts)
    cache = KVCache.create(model.cfg, len(prompts), CACHE_LEN)
    return np.asarray(_jit_forward(model)(tokens, jnp.zeros_like(lengths), cache, lengths)[0])


def _prompts(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(3, VOCAB, size=n) for n in PROMPT_LENGTHS]


def _padded(rows: list[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32)


def _hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()


def _assert_prefill_matches(model, hf_model, prompts: list[np.ndarray]) -> None:
    logits = _prefill(model, prompts)
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, : len(p)], _hf_logits(hf_model, p), atol=TOL, rtol=0, err_msg=f"row {b}")


def greedy(model, prompts: list[np.ndarray], steps: int) -> np.ndarray:
    """Greedy tokens [B, steps]: one padded prefill, then T=1 decode steps."""
    forward = _jit_forward(model)
    tokens, lengths = _padded(prompts)
    cache = KVCache.create(model.cfg, len(prompts), CACHE_LEN)
    logits, cache = forward(tokens, jnp.zeros_like(lengths), cache, lengths)
    nxt = jnp.argmax(logits[jnp.arange(len(prompts)), lengths - 1], axis=-1).astype(jnp.int32)
    out = [nxt]
    for j in range(steps - 1):
        logits, cache = forward(nxt[:, None], lengths + j, cache, jnp.ones_like(lengths))
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        out.append(nxt)
    return np.asarray(jnp.stack(out, axis=1))


# --------------------------------------------------------------- family parity
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = _build_hf(request.param, directory)
    model, tokenizer = load_hf(directory, dtype="float32")
    return request.param, directory, hf_model, model, tokenizer


def test_config_mapping(family):
    name, _, hf_model, model, tokenizer = family
    cfg = model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 24)
    assert cfg.dtype == "float32"
    expected_dense = {"qwen2_moe": (1,), "qwen3_moe": (2,)}.get(name, ())
    assert cfg.dense_layers == expected_dense
    assert cfg.is_moe == (name in ("mixtral", "qwen2_moe", "qwen3_moe"))
    assert cfg.shared_expert_mlp_dim == (40 if name == "qwen2_moe" else 0)
    assert cfg.qk_norm == name.startswith("qwen3")
    assert cfg.qkv_bias == (name in ("qwen2", "qwen2_moe"))
    assert cfg.tie_embeddings == (name == "qwen2")
    assert cfg.sliding_window == (7 if name == "mistral" else None)
    assert cfg.router_renormalize == (name in ("mixtral", "qwen3_moe")) or not cfg.is_moe
    # The tokenizer's special ids reach the model config.
    assert cfg.bos_id == tokenizer.bos_id is not None
    assert cfg.eos_ids == tokenizer.eos_ids != ()


def test_prefill_and_decode_logits_match(family):
    _, _, hf_model, model, _ = family
    prompts = _prompts()
    rng = np.random.RandomState(2)
    continuations = rng.randint(3, VOCAB, size=(len(prompts), DECODE_STEPS)).astype(np.int32)
    # Reference: one full-sequence forward per row, no padding involved.
    refs = [_hf_logits(hf_model, np.concatenate([p, c])) for p, c in zip(prompts, continuations)]

    forward = _jit_forward(model)
    tokens, lengths = _padded(prompts)
    cache = KVCache.create(model.cfg, len(prompts), CACHE_LEN)
    logits, cache = forward(tokens, jnp.zeros_like(lengths), cache, lengths)
    logits = np.asarray(logits)
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, : len(p)], refs[b][: len(p)], atol=TOL, rtol=0, err_msg=f"prefill row {b}")

    for j in range(DECODE_STEPS):
        logits, cache = forward(jnp.asarray(continuations[:, j : j + 1]), lengths + j, cache, jnp.ones_like(lengths))
        got = np.asarray(logits[:, 0])
        for b, p in enumerate(prompts):
            np.testing.assert_allclose(got[b], refs[b][len(p) + j], atol=TOL, rtol=0, err_msg=f"decode {j} row {b}")


def test_greedy_generation_matches_transformers(family):
    _, _, hf_model, model, _ = family
    prompts = _prompts(seed=3)
    ours = greedy(model, prompts, GENERATE_STEPS)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor(p[None], dtype=torch.long),
                do_sample=False,
                max_new_tokens=GENERATE_STEPS,
                eos_token_id=None,
                pad_token_id=0,
            )
        theirs = out[0, len(p) :].numpy()
        assert len(theirs) == GENERATE_STEPS
        np.testing.assert_array_equal(ours[b], theirs, err_msg=f"row {b}")


# ------------------------------------------------------------ storage variants
def test_sharded_checkpoint(tmp_path):
    hf_model = _build_hf("mixtral", tmp_path, seed=5, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(shards) > 2 and set(index.values()) == {s.name for s in shards}
    seen: list[tuple[int, int, str]] = []
    model, _ = load_hf(tmp_path, dtype="float32", progress=lambda done, total, name: seen.append((done, total, name)))
    _assert_prefill_matches(model, hf_model, _prompts())
    # Every tensor is read exactly once, one at a time, across all shards.
    assert [d for d, _, _ in seen] == list(range(1, len(index) + 1))
    assert {t for _, t, _ in seen} == {len(index)} and sorted(n for _, _, n in seen) == sorted(index)

    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        load_hf(tmp_path)


def test_bfloat16_checkpoint_loads_and_stays_close(tmp_path):
    _build_hf("qwen3_moe", tmp_path, seed=6, dtype=torch.bfloat16)
    assert load_hf_config(tmp_path).dtype == "bfloat16"  # the checkpoint's dtype by default
    assert load_hf(tmp_path)[0].embed[...].dtype == jnp.bfloat16
    model, _ = load_hf(tmp_path, dtype="float32")
    # bf16 -> f32 is exact, so transformers loading the same file in f32 must agree to f32 precision.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _assert_prefill_matches(model, hf_model, _prompts())


def test_round_trip_through_convert_hf(tmp_path):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "orbax"
    _build_hf("qwen2_moe", hf_dir, seed=7)
    spec = importlib.util.spec_from_file_location("convert_hf", REPO / "tools" / "convert_hf.py")
    convert_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_hf)
    convert_hf.main([str(hf_dir), str(out_dir), "--dtype", "float32", "--quiet"])

    direct, direct_tok = load_hf(hf_dir, dtype="float32")
    restored, restored_tok = load_model(out_dir)
    assert restored.cfg == direct.cfg
    np.testing.assert_array_equal(_prefill(restored, _prompts()), _prefill(direct, _prompts()))
    assert isinstance(restored_tok, HFTokenizer)
    text = "héllo wörld 日本"
    assert restored_tok.encode(text) == direct_tok.encode(text)
    assert (restored_tok.bos_id, restored_tok.eos_ids) == (direct_tok.bos_id, direct_tok.eos_ids)


def test_load_onto_a_mesh(tmp_path):
    from jax.sharding import Mesh

    from jaxspec.sharding import TENSOR_PARALLEL_RULES

    assert len(jax.devices()) >= 2, "tests/conftest.py provides 8 virtual CPU devices"
    hf_model = _build_hf("qwen2_moe", tmp_path, seed=8)
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    model, _ = load_hf(tmp_path, dtype="float32", mesh=mesh, rules=TENSOR_PARALLEL_RULES)
    wq = model.layers[0].attn.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)  # heads split over "model"
    assert {s.data.shape for s in wq.addressable_shards} == {(64, 2, 24)}
    _assert_prefill_matches(model, hf_model, _prompts())


# -------------------------------------------------------------------- errors
@pytest.fixture
def llama_dir(tmp_path):
    _build_hf("llama", tmp_path, seed=9)
    return tmp_path


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*MixtralForCausalLM.*Qwen3ForCausalLM"):
        load_hf(llama_dir)


def test_unsupported_rope_scaling(llama_dir):
    _edit_config(llama_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ConfigError, match="'yarn'.*default, linear, llama3"):
        load_hf(llama_dir)


def test_missing_safetensors(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(llama_dir)


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(llama_dir)


def test_shape_mismatch_names_the_tensor(llama_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_tensors(llama_dir, lambda t: t.__setitem__(name, np.zeros((40, 64), np.float32)))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[40, 64\] but config.json implies \[48, 64\]"):
        load_hf(llama_dir)


def test_missing_and_unexpected_tensors(llama_dir):
    def edit(t):
        del t["model.layers.2.mlp.up_proj.weight"]
        t["model.layers.2.mlp.extra.weight"] = np.zeros((2,), np.float32)

    _edit_tensors(llama_dir, edit)
    with pytest.raises(CheckpointError) as err:
        load_hf(llama_dir)
    assert "missing tensor(s): model.layers.2.mlp.up_proj.weight" in str(err.value)
    assert "unexpected tensor(s): model.layers.2.mlp.extra.weight" in str(err.value)


def test_unsupported_tensor_dtype(llama_dir):
    name = "model.norm.weight"
    _edit_tensors(llama_dir, lambda t: t.__setitem__(name, np.ones((64,), np.int8)))
    with pytest.raises(CheckpointError, match=f"{name} has dtype I8"):
        load_hf(llama_dir)


def test_unsupported_target_dtype(llama_dir):
    with pytest.raises(CheckpointError, match="int8"):
        load_hf(llama_dir, dtype="int8")


# ------------------------------------------------------------ config mapping
def _hf(arch: str, **fields) -> dict:
    base = dict(architectures=[arch], vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
    return {**base, **fields}


def test_qwen2_moe_sparse_step_and_mlp_only_layers():
    cfg = hf_to_model_config(_hf("Qwen2MoeForCausalLM", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                 decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
                                 shared_expert_intermediate_size=24))
    assert cfg.dense_layers == (0, 2, 3)  # (i + 1) % 2 != 0 -> dense, plus mlp_only_layers
    assert cfg.router_renormalize and cfg.shared_expert_mlp_dim == 24 and cfg.qkv_bias
    assert not hf_to_model_config(_hf("Qwen2MoeForCausalLM", num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=16, qkv_bias=False)).qkv_bias


@pytest.mark.parametrize(
    "arch, fields, expected",
    [
        ("MistralForCausalLM", dict(sliding_window=4096), 4096),
        ("MixtralForCausalLM", dict(sliding_window=None), None),
        ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=4096), None),
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=512, max_window_layers=0), 512),
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=512, max_window_layers=4), None),
        ("Qwen3MoeForCausalLM", dict(use_sliding_window=True, sliding_window=256, num_experts=4,
                                     num_experts_per_tok=1, moe_intermediate_size=8), 256),
    ],
)
def test_sliding_window_honoured(arch, fields, expected):
    assert hf_to_model_config(_hf(arch, **fields)).sliding_window == expected


@pytest.mark.parametrize(
    "arch, fields, match",
    [
        ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=512, max_window_layers=2),
         r"sliding_window=512 applies to layers \[2, 3\] only"),
        ("LlamaForCausalLM", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        ("LlamaForCausalLM", dict(attention_bias=True), "attention_bias"),
        ("LlamaForCausalLM", dict(mlp_bias=True), "mlp_bias"),
        ("Qwen3ForCausalLM", dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
        ("LlamaForCausalLM", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "original_max_position_embeddings"),
        ("LlamaForCausalLM", dict(quantization_config={"quant_method": "gptq"}), "gptq"),
        ("Qwen3ForCausalLM", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
)
def test_unsupported_fields_refused(arch, fields, match):
    with pytest.raises(ConfigError, match=match):
        hf_to_model_config(_hf(arch, **fields))


def test_legacy_rope_spelling_and_token_ids():
    cfg = hf_to_model_config(
        _hf("LlamaForCausalLM", rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}),
        generation_config={"eos_token_id": [2, 7]},
    )
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.bos_id == 1 and cfg.eos_ids == (2, 7)  # generation_config wins, as in HF generate()
    assert cfg.head_dim == 8  # hidden_size / heads when head_dim is absent


# ---------------------------------------------------------------- tokenizers
TEXTS = ["héllo wörld — naïve café", "日本語のテキスト 🤖!", "plain ascii, the quick brown fox", " leading space"]


def test_byte_level_tokenizer_round_trip(tmp_path):
    _write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos, eos = reference.token_to_id("<s>"), reference.token_to_id("<|endoftext|>")
    assert tok.bos_id == bos and tok.eos_ids == (eos,) and tok.vocab_size == reference.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == bos and ids[1:] == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert tok.decode(ids + [eos]) == text == reference.decode(ids[1:])
        # Token by token the bytes still add up exactly, even when a token splits a character.
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.add([i]) for i in ids) + detok.flush() == text


def test_byte_level_alphabet_is_a_bijection():
    table = byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert table["Ġ"] == ord(" ") and table["a"] == ord("a")


def _metaspace_tokenizer(directory: Path) -> None:
    """A Llama-2-style BPE: ▁ for spaces, <0xXX> byte fallback, leading space stripped on decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "c", "a", "f", "he", "ll", "▁w", "hell", "hello", "▁hello"]
    vocab.update({p: 259 + i for i, p in enumerate(pieces)})
    merges = [("h", "e"), ("l", "l"), ("▁", "w"), ("he", "ll"), ("hell", "o"), ("▁", "hello")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )


def test_metaspace_byte_fallback_tokenizer_round_trip(tmp_path):
    _metaspace_tokenizer(tmp_path)
    tok = HFTokenizer(tmp_path)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.bos_id == 1 and tok.eos_ids == (2,)
    for text in ["hello world", "hello café 日本 🤖", "héllo"]:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert any(3 <= i < 259 for i in ids[1:]) or text == "hello world"  # byte fallback exercised
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert tok.decode(ids) == reference.decode(ids)
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.add([i]) for i in ids) + detok.flush() == text
