"""Orbax round trip (incl. restore into target shardings) and tokenizer round trips."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import full_forward, scaled_model
from jaxspec.checkpoint import CheckpointError, load_model, save_model
from jaxspec.config import ConfigError, load_config
from jaxspec.loading import load_any
from jaxspec.sharding import TENSOR_PARALLEL_RULES
from jaxspec.tokenizer import ByteTokenizer, IncrementalDetokenizer, SentencePieceTokenizer, load_tokenizer

TEXT = "naïve café — 日本語のテキスト ✓ 🚀 Ünïcödé\n    indented = {'k': [1, 2]}\n"


def test_orbax_round_trip_identical_logits(tmp_path):
    model = scaled_model("tiny-qwen2-moe")
    save_model(tmp_path / "m", model, ByteTokenizer())
    restored, tok = load_model(tmp_path / "m")
    assert restored.cfg == model.cfg
    assert isinstance(tok, ByteTokenizer)
    tokens = np.arange(3, 30)
    np.testing.assert_array_equal(full_forward(restored, tokens), full_forward(model, tokens))
    # load_any resolves the directory too
    again, _ = load_any(str(tmp_path / "m"))
    np.testing.assert_array_equal(full_forward(again, tokens), full_forward(model, tokens))


def test_restore_into_target_shardings(tmp_path):
    model = scaled_model("tiny-moe")
    save_model(tmp_path / "m", model, ByteTokenizer())
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    restored, _ = load_model(tmp_path / "m", mesh=mesh, rules=TENSOR_PARALLEL_RULES)
    wq = restored.layers[0].attn.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape[1] == wq.shape[1] // 4


def test_missing_and_mismatched_checkpoints_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="config.json missing"):
        load_model(tmp_path)
    model = scaled_model("tiny-moe")
    save_model(tmp_path / "m", model, ByteTokenizer())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_model"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "m")


def test_unknown_config_name_lists_available():
    with pytest.raises(ConfigError, match="unknown model config 'no-such-model'.*tiny-moe"):
        load_config("no-such-model")


def test_config_rejects_unsupported_rope_scaling():
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        load_config("tiny-dense").replace(rope_scaling={"type": "yarn", "factor": 4.0})


def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == TEXT


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    lines = [f"def function_{i}(x, y):\n    return x * {i} + y  # café {i}\n" for i in range(300)]
    lines += ["日本語のテキストです。", "naïve café", "✓ done"] * 20
    corpus.write_text("".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=340, model_type="bpe", character_coverage=0.98,
        byte_fallback=True, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", bos_id=1, eos_id=2, pad_id=0, unk_id=3,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return d / "tokenizer.model"


def test_sentencepiece_round_trip_and_incremental_detok(sp_model, tmp_path):
    tok = SentencePieceTokenizer(sp_model)
    ids = tok.encode(TEXT, add_bos=False)
    assert tok.decode(ids) == TEXT
    assert any(tok.sp.is_byte(i) for i in ids), "emoji should use byte fallback"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas), "a delta split a UTF-8 character"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) and again.bos_id == 1 and again.eos_ids == (2,)


def test_incremental_detok_never_emits_half_characters():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in tok.encode(TEXT, add_bos=False)]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
