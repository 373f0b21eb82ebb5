"""The shipped built-in models (jaxspec/assets): they load, they are what the model card says,
the tokenizer round-trips held-out code, and speculative greedy output equals plain greedy output.

The figures the assets were accepted on (bits per byte vs xz, acceptance length, speed-up) are
measured by ``tools/eval_builtin.py`` and recorded in ``jaxspec/assets/eval.json``; here the
tests check that the shipped files still carry them and still reproduce the qualitative claims
(the draft agrees with the target; the target beats a uniform guess by a wide margin)."""

import json
import math

import numpy as np
import pytest

from jaxspec import builtin
from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.loading import DEFAULT_MODEL, default_draft, load_any
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner
from jaxspec.training.corpus import Document, is_heldout, read_corpus
from jaxspec.training.distill import corpus_prompts


@pytest.fixture(scope="module")
def target():
    return load_any(builtin.BUILTIN)


@pytest.fixture(scope="module")
def draft():
    return load_any(builtin.BUILTIN, role="draft")


@pytest.fixture(scope="module")
def heldout() -> list[Document]:
    # This interpreter's standard library, split by the fixed path-hash rule; the assets were
    # trained on Python 3.11's, so on another version a few "held-out" files may be new ones.
    _, held = read_corpus("stdlib").split()
    assert held and all(is_heldout(d.id) for d in held)
    return held


def test_assets_are_complete_and_small():
    assert builtin.available()
    files = [p for p in builtin.ASSETS_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < 60 * 2**20, f"assets take {total / 2**20:.1f} MiB"
    for name in ("MODEL_CARD.md", "eval.json", "tokenizer/tokenizer.model"):
        assert (builtin.ASSETS_DIR / name).is_file(), name


def test_shapes_match_the_issue(target, draft):
    tcfg, dcfg = target[0].cfg, draft[0].cfg
    assert tcfg.is_moe and tcfg.num_experts == 8 and tcfg.num_experts_per_tok == 2 and tcfg.num_layers >= 4
    assert not dcfg.is_moe and dcfg.vocab_size == tcfg.vocab_size
    ratio = tcfg.param_counts()["active"] / dcfg.param_counts()["total"]
    assert 7.5 <= ratio <= 10.5, ratio


def test_defaults_are_the_builtin_pair():
    assert DEFAULT_MODEL == builtin.BUILTIN
    assert default_draft(None, None, None) == builtin.BUILTIN
    assert default_draft("tiny-moe", None, None) is None
    assert default_draft(None, None, "none") is None


def test_recorded_figures(target):
    ev = json.loads((builtin.ASSETS_DIR / "eval.json").read_text())
    bpb = ev["bits_per_byte"]["bits_per_byte"]
    assert math.isfinite(bpb) and 0 < bpb < math.log2(target[0].cfg.vocab_size)
    assert ev["acceptance"]["mean_acceptance_length"] >= 1.0
    card = (builtin.ASSETS_DIR / "MODEL_CARD.md").read_text()
    assert f"{bpb:.3f}" in card or f"{bpb:.2f}" in card


def test_tokenizer_round_trips_heldout_code(target, heldout):
    tokenizer = target[1]
    for doc in heldout:
        assert tokenizer.decode(tokenizer.encode(doc.text)) == doc.text, doc.id


def test_target_and_draft_share_the_tokenizer(target, draft):
    text = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n"
    assert target[1].encode(text) == draft[1].encode(text)


@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy_on_heldout_prompts(target, draft, heldout):
    (model, tokenizer), (draft_model, _) = target, draft
    prompts = corpus_prompts(heldout, tokenizer, 6, 48, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = Engine(PlainRunner(ModelRunner(model, 3, 96)), tokenizer)
    spec = Engine(SpeculativeRunner(ModelRunner(model, 3, 96), DraftModelProposer(draft_model),
                                    num_speculative_tokens=4, k_max=4), tokenizer)
    want = [c.token_ids for c in plain.generate(prompts, params)]
    got = [c.token_ids for c in spec.generate(prompts, params)]
    assert got == want
    stats = spec.spec_stats
    # The shipped draft was distilled to agree with the target: far above a random draft's ~1.0.
    assert stats.mean_acceptance_length >= 2.0, stats
    # And the target writes code, not noise: the continuations decode to mostly printable text.
    text = "".join(tokenizer.decode(t) for t in want)
    assert np.mean([c.isprintable() or c in "\n\t" for c in text]) > 0.95


@pytest.mark.slow
def test_generate_cli_defaults_to_the_builtin_pair(capsys):
    from jaxspec import generate

    assert generate.main(["--max-tokens", "12", "--ignore-eos", "--num-speculative-tokens", "4", "--json",
                          "def fibonacci(n):\n"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] == 12
    assert out["spec"]["num_drafts"] > 0  # the built-in draft proposed
    assert generate.main(["--max-tokens", "12", "--ignore-eos", "--spec-method", "none", "--json",
                          "def fibonacci(n):\n"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["token_ids"] == out["token_ids"] and "spec" not in plain


def test_serve_defaults_to_the_builtin_pair():
    from jaxspec.serve import options_from_args, parse_args

    engine, _ = options_from_args(parse_args([]))
    assert (engine.model, engine.draft, engine.spec_method) == ("builtin", "builtin", "draft")
    engine, _ = options_from_args(parse_args(["--spec-method", "none"]))
    assert (engine.draft, engine.spec_method) == (None, "none")
