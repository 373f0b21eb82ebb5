"""The built-in dense pair (``--model builtin-dense``, jaxspec/assets/dense): the dense target of
the same active size as the built-in MoE target, and a draft distilled from it.

Checks that the names resolve to the dense pair (and its draft is the one that proposes), that
the config really has the MoE target's active size, that the shipped pair loads and decodes
exactly under speculation, that its model card states what was shipped and was trained with the
MoE target's recipe, and that the assets stay small."""

import json
import math
import re

import pytest

from jaxspec import builtin
from jaxspec.config import ConfigError, load_config
from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.loading import default_draft, load_any
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner

DENSE_DIR = builtin.ASSETS_DIR / "dense"


@pytest.fixture(scope="module")
def target():
    return load_any(builtin.BUILTIN_DENSE, dtype="float32")


@pytest.fixture(scope="module")
def draft():
    return load_any(builtin.BUILTIN_DENSE, dtype="float32", role="draft")


# ----------------------------------------------------------------------------- names
def test_names_resolve_to_the_dense_pair():
    assert builtin.available(builtin.BUILTIN_DENSE)
    assert builtin.resolve(builtin.BUILTIN_DENSE) == str(DENSE_DIR / "target")
    assert builtin.resolve(builtin.BUILTIN_DENSE, "draft") == str(DENSE_DIR / "draft")
    # The MoE names are unchanged.
    assert builtin.resolve(builtin.BUILTIN) == str(builtin.ASSETS_DIR / "target")
    assert builtin.resolve(builtin.BUILTIN, "draft") == str(builtin.ASSETS_DIR / "draft")
    assert builtin.resolve("builtin-dense-target") == "builtin-dense-target"  # a config name stays one


def test_the_dense_target_drafts_with_its_own_draft():
    dense = builtin.BUILTIN_DENSE
    assert default_draft(dense, None, None) == dense
    assert default_draft(dense, None, "draft") == dense
    assert default_draft(dense, builtin.BUILTIN, None) == dense  # --draft builtin: the pair's own draft
    assert default_draft(dense, None, "none") is None
    assert default_draft(dense, None, "ngram") is None
    assert default_draft(dense, "tiny-dense", None) == "tiny-dense"
    # The MoE pair and other models as before.
    assert default_draft(None, None, None) == builtin.BUILTIN
    assert default_draft(builtin.BUILTIN, builtin.BUILTIN, None) == builtin.BUILTIN
    assert default_draft("tiny-moe", builtin.BUILTIN, None) == builtin.BUILTIN
    assert default_draft("tiny-moe", None, None) is None


def test_serve_uses_the_dense_pair():
    from jaxspec.serve import options_from_args, parse_args

    engine, _ = options_from_args(parse_args(["--model", "builtin-dense"]))
    assert (engine.model, engine.draft, engine.spec_method) == ("builtin-dense", "builtin-dense", "draft")
    engine, _ = options_from_args(parse_args(["--model", "builtin-dense", "--draft", "builtin"]))
    assert engine.draft == "builtin-dense"
    engine, _ = options_from_args(parse_args(["--model", "builtin-dense", "--spec-method", "none"]))
    assert (engine.draft, engine.spec_method) == (None, "none")


def test_missing_dense_assets_are_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(builtin.FAMILY_DIRS, builtin.BUILTIN_DENSE, tmp_path / "dense")
    assert not builtin.available(builtin.BUILTIN_DENSE)
    for role in builtin.ROLES:
        with pytest.raises(ConfigError, match=r"dense .*missing.*build_assets\.py --family dense"):
            builtin.resolve(builtin.BUILTIN_DENSE, role)
        with pytest.raises(ConfigError, match="--family dense"):
            load_any(builtin.BUILTIN_DENSE, role=role)
    # The MoE pair does not depend on the dense one.
    assert builtin.available(builtin.BUILTIN)


# ----------------------------------------------------------------------------- config
def test_dense_config_has_the_moe_targets_active_size():
    moe, dense = load_config("builtin-target"), load_config("builtin-dense-target")
    assert moe.is_moe and not dense.is_moe and dense.num_experts == 0
    assert dense.mlp_dim == moe.num_experts_per_tok * moe.moe_mlp_dim
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len",
                "rope_theta", "tie_embeddings", "bos_id", "eos_ids", "pad_id", "dtype"):
        assert getattr(dense, key) == getattr(moe, key), key
    mc, dc = moe.param_counts(), dense.param_counts()
    assert dc["active"] == dc["total"]
    # Equal active parameters, up to the router the MoE adds (d_model x num_experts per MoE layer).
    router = sum(moe.d_model * moe.num_experts for layer in range(moe.num_layers) if moe.layer_is_moe(layer))
    assert dc["active"] == mc["active"] - router
    assert abs(dc["active"] - mc["active"]) / mc["active"] < 0.005


def test_shipped_configs_are_the_named_ones(target, draft):
    shipped = json.loads((DENSE_DIR / "target" / "config.json").read_text())
    assert shipped["name"] == "builtin-dense-target"
    named = load_config("builtin-dense-target")
    for key, value in json.loads(json.dumps(named.to_dict())).items():
        if key in shipped and key != "name":
            assert shipped[key] == value, key
    assert target[0].cfg.param_counts() == named.param_counts()
    assert draft[0].cfg.param_counts() == load_config("builtin-draft").param_counts()
    moe_tok = (builtin.ASSETS_DIR / "tokenizer" / "tokenizer.model").read_bytes()
    assert (DENSE_DIR / "target" / "tokenizer.model").read_bytes() == moe_tok
    assert (DENSE_DIR / "draft" / "tokenizer.model").read_bytes() == moe_tok


# ----------------------------------------------------------------------------- the shipped pair
@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy(target, draft):
    (model, tokenizer), (draft_model, _) = target, draft
    assert model.cfg.dtype == draft_model.cfg.dtype == "float32"
    prompts = ["def f(", "import os\n\n\nclass Config:\n    def __init__(self"]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = Engine(PlainRunner(ModelRunner(model, 2, 96)), tokenizer)
    spec = Engine(SpeculativeRunner(ModelRunner(model, 2, 96), DraftModelProposer(draft_model),
                                    num_speculative_tokens=4, k_max=4), tokenizer)
    want = [c.token_ids for c in plain.generate(prompts, params)]
    got = [c.token_ids for c in spec.generate(prompts, params)]
    assert got == want and all(len(t) == 32 for t in want)
    # A distilled draft agrees with its target far more often than a random one (~1.0).
    assert spec.spec_stats.mean_acceptance_length >= 1.5, spec.spec_stats


@pytest.mark.slow
def test_generate_cli_speculates_with_the_dense_pair(capsys, monkeypatch):
    from jaxspec import generate

    loaded = []

    def recording_load_any(name, *args, **kwargs):
        loaded.append((name, kwargs.get("role", "target")))
        return load_any(name, *args, **kwargs)

    monkeypatch.setattr(generate, "load_any", recording_load_any)
    argv = ["--model", "builtin-dense", "--max-tokens", "12", "--ignore-eos", "--json", "def f("]
    assert generate.main([*argv, "--num-speculative-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert loaded == [("builtin-dense", "target"), ("builtin-dense", "draft")]
    assert out["usage"]["completion_tokens"] == 12 and out["spec"]["num_drafts"] > 0
    assert generate.main([*argv, "--spec-method", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["token_ids"] == out["token_ids"] and "spec" not in plain


# ----------------------------------------------------------------------------- card and size
def _card_config(card: str, section: str) -> dict[str, str]:
    """The ``key=value, ...`` line the card prints under ``section``."""
    match = re.search(rf"^## {re.escape(section)}\n\n`([^`]*)`", card, re.M)
    assert match, section
    return dict(item.split("=", 1) for item in match.group(1).split(", "))


def test_model_card_states_the_shipped_configs_and_figures():
    card = (DENSE_DIR / "MODEL_CARD.md").read_text()
    for section, role in (("Target (dense)", "target"), ("Draft (dense)", "draft")):
        shipped = json.loads((DENSE_DIR / role / "config.json").read_text())
        stated = _card_config(card, section)
        assert stated and all(str(shipped[key]) == value for key, value in stated.items()), (role, stated)
        for key in ("vocab_size", "d_model", "num_layers", "mlp_dim"):
            assert stated[key] == str(shipped[key]), key
        assert stated.get("num_experts", "0") == "0"
    counts = load_config(DENSE_DIR / "target" / "config.json").param_counts()
    assert f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active per token" in card
    ev = json.loads((DENSE_DIR / "eval.json").read_text())
    bpb = ev["bits_per_byte"]["bits_per_byte"]
    assert math.isfinite(bpb) and 0 < bpb < math.log2(load_config("builtin-dense-target").vocab_size)
    assert f"| target bits per byte | {bpb:.3f} |" in card
    assert f"{ev['acceptance']['mean_acceptance_length']:.3f}" in card
    assert f"{ev['throughput']['plain_tokens_per_s']:.1f} tokens/s" in card
    assert ev["bits_per_byte"]["expert_balance_per_layer"] == [] and "expert load" not in card
    assert "python tools/build_assets.py --family dense" in card and "--model builtin-dense" in card


def test_trained_with_the_moe_targets_recipe():
    """The comparison is fair: the same data, steps, batch, length and optimizer as the MoE target;
    only the router losses differ (a dense model has none)."""
    dense = json.loads((DENSE_DIR / "target" / "training_report.json").read_text())
    moe = json.loads((builtin.ASSETS_DIR / "target" / "training_report.json").read_text())
    for key in ("steps", "batch_size", "seq_len", "tokens_seen", "epochs", "optimizer"):
        assert dense[key] == moe[key], key
    assert dense["loss"]["aux_weight"] == dense["loss"]["z_weight"] == 0
    card = (DENSE_DIR / "MODEL_CARD.md").read_text()
    assert (f"{dense['steps']} steps of {dense['batch_size']} x {dense['seq_len']} tokens" in card
            and f"peak lr {dense['optimizer']['lr']}" in card and "no load-balancing or z-loss" in card)
    dense_distill = json.loads((DENSE_DIR / "draft" / "distill_report.json").read_text())
    moe_distill = json.loads((builtin.ASSETS_DIR / "draft" / "distill_report.json").read_text())
    for key in ("steps", "batch_size", "sequences", "tokens_seen", "temperature", "loss", "optimizer"):
        assert dense_distill[key] == moe_distill[key], key


def test_assets_stay_small():
    files = [p for p in builtin.ASSETS_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 60 * 2**20, f"jaxspec/assets take {total / 2**20:.1f} MiB"
    dense = sum(p.stat().st_size for p in files if DENSE_DIR in p.parents)
    assert dense > 0


def test_served_model_ids_name_the_family_and_role():
    from serving.build import _model_id

    assert _model_id("builtin") == "builtin-target" and _model_id("builtin", "draft") == "builtin-draft"
    assert _model_id("builtin-dense") == "builtin-dense-target"
    assert _model_id("builtin-dense", "draft") == "builtin-dense-draft"
    assert _model_id("tiny-moe") == "tiny-moe"
