"""The tools that build the built-in models, at tiny scale.

Covers the corpus split, tokenizer round trip, packed data order, the MoE
auxiliary losses and capacity, and each tool end to end: tools/build_assets.py
--scale tiny (tokenizer -> MoE target -> distilled draft -> eval + model card) and
its --family dense (a dense target and draft on that tokenizer), then kill-and-resume
runs of tools/train.py and tools/distill_draft.py that reuse its tokenizer and
target (same shapes, so the compiled steps are shared).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import random
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec.config import load_config
from jaxspec.loading import load_any
from jaxspec.models import KVCache
from jaxspec.models.moe import drop_over_capacity
from jaxspec.tokenizer import ByteTokenizer, load_tokenizer
from jaxspec.training.corpus import Document, is_heldout, read_corpus
from jaxspec.training.data import PackedWindows, encode_documents, eval_windows, token_byte_lengths
from jaxspec.training.losses import distill_divergences, load_balance_loss, router_z_loss
from jaxspec.training.runs import read_metrics
from jaxspec.training.state import new_model

REPO = Path(__file__).resolve().parent.parent

# Jitted once per shape: eager evaluation would compile every small op separately.
load_balance = jax.jit(load_balance_loss, static_argnums=(1,))
z_loss = jax.jit(router_z_loss)
divergences = jax.jit(distill_divergences)


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- corpus
_WORDS = ["value", "items", "result", "count", "name", "data", "index", "parser", "token", "buffer", "node"]


def _python_file(rng: random.Random, i: int) -> str:
    """Python-like source with the whitespace a code tokenizer must keep: indentation levels,
    blank lines, a trailing space, a tab, non-ASCII text and long digit runs."""
    w = lambda: rng.choice(_WORDS)  # noqa: E731
    funcs = []
    for j in range(rng.randint(2, 4)):
        funcs.append(textwrap.dedent(f'''\
            def {w()}_{j}({w()}, {w()}=None):
                """Return the {w()} of {w()} — café №{i}."""
                {w()} = []
                for {w()} in range({rng.randint(1, 99999)}):
                    if {w()} is not None:
                        {w()}.append({w()} + {j})
                    else:
                        continue
                return {w()} \n'''))
    return f"# module {i}\nimport os\n\n\n" + "\n\n".join(funcs) + "\n\tx = 1  # tab\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """~60 small files in nested folders, plus things the reader must skip."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(60):
        path = root / f"pkg{i % 3}" / f"mod_{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(_python_file(rng, i), encoding="utf-8")
    (root / "test").mkdir()
    (root / "test" / "test_skipped.py").write_text("assert False\n")
    (root / "pkg0" / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    (root / "pkg0" / "notes.txt").write_text("not matched by *.py\n")
    return root


def test_split_is_a_fixed_hash_of_the_relative_path(corpus_dir, tmp_path):
    corpus = read_corpus(corpus_dir)
    ids = [d.id for d in corpus.documents]
    assert len(ids) == 60 and ids == sorted(ids)
    assert not any(i.startswith("test/") or i.endswith(".txt") for i in ids)
    assert corpus.skipped_non_utf8 == ["pkg0/latin1.py"]
    train, held = corpus.split()
    expected = {i for i in ids if int(hashlib.sha256(i.encode()).hexdigest(), 16) % 20 == 0}
    assert {d.id for d in held} == expected and expected  # this corpus has held-out files
    assert len(train) + len(held) == 60
    # Deterministic and location-independent: a copy elsewhere, or the same texts as JSONL, split alike.
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in corpus.documents))
    for other in (read_corpus(corpus_dir), read_corpus(jsonl)):
        assert [d.id for d in other.split()[1]] == [d.id for d in held]
        assert [d.text for d in other.documents] == [d.text for d in corpus.documents]


def test_is_heldout_rate_is_about_one_in_twenty():
    rate = np.mean([is_heldout(f"lib/module_{i}.py") for i in range(4000)])
    assert 0.04 < rate < 0.06


# ----------------------------------------------------------------------------- data
def test_packed_windows_are_an_epoch_permutation_continued_by_position():
    stream = np.arange(1001, dtype=np.int32)
    windows = PackedWindows(stream, seq_len=10, seed=3)
    assert windows.num_windows == 100
    whole = windows.batch(0, 250)  # 2.5 epochs
    parts = [windows.batch(p, n) for p, n in ((0, 7), (7, 93), (100, 150))]
    np.testing.assert_array_equal(whole.inputs, np.concatenate([p.inputs for p in parts]))
    for epoch in range(2):  # each epoch uses every window once
        starts = np.sort(whole.inputs[epoch * 100 : (epoch + 1) * 100, 0])
        np.testing.assert_array_equal(starts, np.arange(100) * 10)
    np.testing.assert_array_equal(whole.targets, whole.inputs + 1)
    assert not np.array_equal(whole.inputs[:100], whole.inputs[100:200])  # reshuffled per epoch


def test_eval_windows_predict_every_token_once_and_bytes_add_up():
    tok = ByteTokenizer()
    docs = [Document("a.py", "def f():\n    return 1\n"), Document("b.py", "x = 'é'\n")]
    stream = encode_documents(tok, docs)
    assert stream[0] == tok.bos_id and list(stream).count(tok.eos_ids[0]) == 2
    w = eval_windows(stream, seq_len=8)
    np.testing.assert_array_equal(w.targets[w.mask], stream[1:])
    assert token_byte_lengths(tok)[w.targets[w.mask]].sum() == sum(d.num_bytes for d in docs)


# ----------------------------------------------------------------------------- aux losses
def test_load_balance_loss_is_minimal_for_uniform_routing():
    e, k, n = 8, 2, 512
    all_tokens = np.ones(n, bool)
    uniform = load_balance(np.zeros((n, e), np.float32), k, all_tokens)
    assert float(uniform) == pytest.approx(1.0, abs=1e-5)
    # Confident but balanced (token i prefers experts i and i+1 mod E): still 1.
    first, second = np.arange(n) % e, (np.arange(n) + 1) % e
    logits = np.zeros((n, e), np.float32)
    logits[np.arange(n), first] = logits[np.arange(n), second] = 20.0
    assert float(load_balance(logits, k, all_tokens)) == pytest.approx(1.0, abs=1e-3)
    # Everyone to experts 0 and 1 with certainty: f = P = 1/2 on two experts -> E/2.
    collapsed = np.zeros((n, e), np.float32)
    collapsed[:, :2] = 20.0
    assert float(load_balance(collapsed, k, all_tokens)) == pytest.approx(e / 2, rel=1e-3)
    skewed = np.random.default_rng(0).normal(size=(n, e)).astype(np.float32) + np.linspace(0, 3, e, dtype=np.float32)
    assert float(load_balance(skewed, k, all_tokens)) > 1.05
    # Its gradient pushes probability away from the overloaded experts.
    grad = np.asarray(jax.jit(jax.grad(lambda x: load_balance_loss(x, k)))(skewed))
    assert grad[:, -1].sum() > 0 > grad[:, 0].sum()
    # Masked tokens do not count.
    mixed = np.concatenate([np.zeros((n // 2, e), np.float32), collapsed[: n // 2]])
    assert float(load_balance(mixed, k, np.arange(n) < n // 2)) == pytest.approx(1.0, abs=1e-5)


def test_router_z_loss_is_mean_squared_logsumexp():
    assert float(z_loss(np.zeros((64, 8), np.float32))) == pytest.approx(math.log(8) ** 2, rel=1e-6)
    small = z_loss(np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32))
    assert float(z_loss(np.full((64, 8), 10.0, np.float32))) > float(small)


def test_distill_divergences_are_zero_for_equal_distributions():
    p = np.random.default_rng(2).normal(size=(2, 5, 11)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    same = divergences(p, p, mask)
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-6) and float(same["tv"]) == pytest.approx(0.0, abs=1e-6)
    assert float(same["agree"]) == 1.0
    other = divergences(p, -p, mask)
    assert float(other["kl"]) > 0 and 0 < float(other["tv"]) <= 1 and float(other["agree"]) == 0.0


def test_capacity_drops_later_choices_first():
    # 4 tokens, top-2, 2 experts, capacity factor 0.5 -> capacity ceil(0.5*4*2/2) = 2 per expert.
    ids = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    w = jnp.ones((4, 2))
    kept = np.asarray(drop_over_capacity(ids, w, 2, 0.5))
    # First choices queue first: expert 0 keeps tokens 0, 1 (token 2's first choice is dropped);
    # expert 1 keeps token 3's first choice and token 0's second choice.
    np.testing.assert_array_equal(kept, [[1, 1], [1, 0], [0, 0], [1, 0]])
    np.testing.assert_array_equal(np.asarray(drop_over_capacity(ids, w, 2, 2.0)), np.ones((4, 2)))


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_variants(graphdef, state, tokens):
    """Logits of the plain forward, with router stats sown, with ample and with starved capacity
    (one compilation for all four)."""
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape

    def fwd(m, **kw):
        cache = KVCache.create(m.cfg, b, t)
        # The dense dispatch backend: the cheapest to compile, and exact like every backend.
        return m(tokens, jnp.zeros((b,), jnp.int32), cache, moe_backend="dense", **kw).logits

    with_stats, inter = nnx.capture(lambda m: fwd(m, router_stats=True), nnx.Intermediate)(model)
    ample = fwd(model, capacity_factor=float(model.cfg.num_experts))
    return fwd(model), with_stats, jax.tree.leaves(inter), ample, fwd(model, capacity_factor=0.1)


def test_router_stats_and_capacity_leave_inference_forward_alone():
    cfg = load_config("tiny-moe")
    graphdef, state = nnx.split(new_model(cfg, seed=1))
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    plain, with_stats, router, ample, starved = jax.device_get(_forward_variants(graphdef, state, tokens))
    assert len(router) == cfg.num_layers and router[0].shape == (16, cfg.num_experts)
    np.testing.assert_array_equal(with_stats, plain)
    np.testing.assert_allclose(ample, plain, rtol=1e-6, atol=1e-6)
    assert not np.allclose(starved, plain)


# ----------------------------------------------------------------------------- tokenizer
def _heldout_name(prefix: str) -> str:
    return next(f"{prefix}_{i}.py" for i in range(10_000) if is_heldout(f"{prefix}_{i}.py"))


def test_tokenizer_round_trip_and_failure_exit_code(corpus_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert tool("train_tokenizer").main(["--corpus", str(corpus_dir), "--out", str(out), "--vocab-size", "400"]) == 0
    report = json.loads((out / "tokenizer_report.json").read_text())
    assert report["roundtrip_failures"] == [] and report["roundtrip_checked"] == "heldout"
    tok = load_tokenizer(out)
    assert (tok.bos_id, tok.eos_ids, tok.sp.pad_id()) == (1, (2,), 0)
    _, held = read_corpus(corpus_dir).split()
    for d in held:
        assert tok.decode(tok.encode(d.text, add_bos=False)) == d.text
    pieces = {tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
    assert "\u2581" * 4 in pieces  # indentation is learned as whitespace-only pieces
    # sentencepiece cannot represent its own space symbol U+2581: a held-out file holding it must fail.
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(20):
        (bad / f"ok_{i}.py").write_text(_python_file(random.Random(i), i))
    (bad / _heldout_name("odd")).write_text("x = '\u2581'\n")
    assert tool("train_tokenizer").main(["--corpus", str(bad), "--out", str(tmp_path / "t2"), "--vocab-size", "400"]) == 1
    assert "round trip FAILED on 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tools end to end
@pytest.fixture(scope="module")
def built(corpus_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("build")
    out, work = root / "assets", root / "work"
    argv = ["--scale", "tiny", "--out", str(out), "--work", str(work), "--corpus", str(corpus_dir)]
    assert tool("build_assets").main(argv) == 0
    return {"out": out, "work": work, "argv": argv}


@pytest.mark.slow
def test_build_assets_tiny_writes_every_asset(built):
    out, work = built["out"], built["work"]
    target, tokenizer = load_any(str(out / "target"))
    draft, draft_tok = load_any(str(out / "draft"))
    assert target.cfg.is_moe and not draft.cfg.is_moe
    assert target.cfg.vocab_size == draft.cfg.vocab_size == tokenizer.vocab_size
    assert (target.cfg.bos_id, target.cfg.eos_ids, target.cfg.pad_id) == (1, (2,), 0)
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == (out / "target" / "tokenizer.model").read_bytes()
    # Training lowered the loss; distillation brought the draft closer to the target.
    train_log = [r for r in read_metrics(work / "target") if r["event"] == "train"]
    assert train_log[-1]["ce"] < train_log[0]["ce"] - 0.1
    distill = json.loads((out / "draft" / "distill_report.json").read_text())
    assert distill["after"]["divergences"]["eval_kl"] < distill["before"]["divergences"]["eval_kl"]
    for when in ("before", "after"):
        acc = distill[when]["acceptance"]
        assert 0.0 <= acc["acceptance_rate"] <= 1.0 and 1.0 <= acc["mean_acceptance_length"] <= acc["k"] + 1
    ev = json.loads((out / "eval.json").read_text())
    assert 0 < ev["bits_per_byte"]["bits_per_byte"] < 16 and 0 < ev["xz"]["xz_per_file_bpb"] < 8
    assert len(ev["bits_per_byte"]["expert_balance_per_layer"]) == target.cfg.num_layers
    assert all(b >= 1.0 for b in ev["bits_per_byte"]["expert_balance_per_layer"])
    assert ev["throughput"]["plain_tokens_per_s"] > 0 and ev["throughput"]["speculative_tokens_per_s"] > 0
    speed, costs = ev["throughput"], ev["forward_costs"]
    assert speed["adaptive_tokens_per_s"] > 0 and sum(speed["adaptive_steps_per_k"].values()) > 0
    k = costs["k"]
    assert costs["target_ms_1"] > 0 and costs[f"target_ms_{k + 1}"] > 0 and costs["draft_ms_1"] > 0
    assert target.cfg.num_experts_per_tok <= costs[f"experts_touched_{k + 1}"] <= target.cfg.num_experts
    card = (out / "MODEL_CARD.md").read_text()
    assert "Where the time goes" in card and f"{costs['target_ms_1']:.2f} ms for 1 token" in card
    assert "adaptive k (serving's default)" in card
    assert f"| target bits per byte | {ev['bits_per_byte']['bits_per_byte']:.3f} |" in card
    assert f"{ev['acceptance']['mean_acceptance_length']:.3f}" in card and "python tools/build_assets.py" in card
    # Running the command again skips every finished stage and only re-evaluates.
    assert tool("build_assets").main(built["argv"]) == 0


@pytest.mark.slow
def test_build_assets_dense_family_reuses_the_tokenizer(built, tmp_path):
    """--family dense: a dense target (+ distilled draft) on the tokenizer it is given, which it
    neither retrains nor copies into OUT; no router losses; a card without expert figures."""
    tok = built["out"] / "tokenizer"
    tok_bytes = (tok / "tokenizer.model").read_bytes()
    out, work = tmp_path / "dense", tmp_path / "work"
    argv = ["--family", "dense", "--scale", "tiny", "--tokenizer", str(tok), "--out", str(out), "--work", str(work),
            "--corpus", str(built["argv"][-1])]
    assert tool("build_assets").main(argv) == 0
    assert not (out / "tokenizer").exists() and (tok / "tokenizer.model").read_bytes() == tok_bytes
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "draft", "eval.json", "target"]
    target, tokenizer = load_any(str(out / "target"))
    draft, _ = load_any(str(out / "draft"))
    assert not target.cfg.is_moe and not draft.cfg.is_moe
    assert target.cfg.name == tool("build_assets").FAMILIES["dense"]["tiny"]["target_config"]
    assert target.cfg.vocab_size == draft.cfg.vocab_size == tokenizer.vocab_size == load_tokenizer(tok).vocab_size
    assert (out / "target" / "tokenizer.model").read_bytes() == tok_bytes
    report = json.loads((out / "target" / "training_report.json").read_text())
    assert report["loss"]["aux_weight"] == 0 and report["loss"]["z_weight"] == 0
    assert report["steps"] == _tiny()["target_steps"] and report["seq_len"] == _tiny()["seq_len"]
    train_log = [r for r in read_metrics(work / "target") if r["event"] == "train"]
    assert train_log[-1]["ce"] < train_log[0]["ce"] - 0.1
    assert all(r["load_balance"] == 0 and r["z_loss"] == 0 for r in train_log)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["bits_per_byte"]["expert_balance_per_layer"] == []
    assert ev["acceptance"]["mean_acceptance_length"] >= 1.0 and ev["throughput"]["speculative_tokens_per_s"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Target (dense)" in card and "## Target (MoE)" not in card
    assert "expert load" not in card and "load-balancing loss weight" not in card
    assert f"| target bits per byte | {ev['bits_per_byte']['bits_per_byte']:.3f} |" in card
    assert "--family dense" in card and "--model builtin-dense" in card
    # --tokenizer belongs to the dense family; the moe family trains its own.
    with pytest.raises(SystemExit):
        tool("build_assets").main(["--tokenizer", str(tok), "--out", str(tmp_path / "x"), "--scale", "tiny"])


def _tiny() -> dict:
    """The tiny build plan: the resume tests use its shapes and settings, so every step they run
    was already compiled by the ``built`` fixture in this process."""
    return tool("build_assets").SCALES["tiny"]


def _train_argv(built, run_dir: Path, *extra: str) -> list[str]:
    t = _tiny()
    return ["--config", str(t["target_config"]), "--tokenizer", str(built["out"] / "tokenizer"),
            "--corpus", str(built["argv"][-1]), "--run-dir", str(run_dir), "--steps", str(t["target_steps"]),
            "--batch-size", str(t["target_batch"]), "--seq-len", str(t["seq_len"]), "--lr", str(t["target_lr"]),
            "--save-every", "4", "--log-every", "1", "--eval-every", "0", *extra]


@pytest.mark.slow
def test_train_resumes_where_a_killed_run_stopped(built, tmp_path, capsys):
    train, steps, batch = tool("train"), int(_tiny()["target_steps"]), int(_tiny()["target_batch"])
    assert train.main(_train_argv(built, tmp_path / "whole")) == 0
    killed = tmp_path / "killed"
    assert train.main(_train_argv(built, killed, "--stop-after", "10")) == 0  # last checkpoint: step 8
    assert not (killed / "training_report.json").exists()
    assert train.main(_train_argv(built, killed, "--out", str(tmp_path / "model"))) == 0
    assert "resuming" in capsys.readouterr().out
    whole = {r["step"]: r for r in read_metrics(tmp_path / "whole") if r["event"] == "train"}
    log = [r for r in read_metrics(killed) if r["event"] == "train"]
    assert [r["step"] for r in log] == [*range(1, 11), *range(9, steps + 1)]  # resumed after step 8
    for r in log:
        assert r["data_position"] == batch * r["step"]  # the data position continued with the step counter
        # Same windows, same state: the resumed run retraces the uninterrupted one.
        assert r["loss"] == pytest.approx(whole[r["step"]]["loss"], rel=1e-5)
    assert whole[steps]["ce"] < whole[1]["ce"] - 0.3
    model, _ = load_any(str(tmp_path / "model"))
    assert model.cfg.name == _tiny()["target_config"]
    # A different run configuration refuses to resume from this directory.
    assert train.main(_train_argv(built, killed, "--seed", "1")) == 2


@pytest.mark.slow
def test_distill_resumes_and_keeps_its_generated_data(built, tmp_path):
    t = _tiny()
    distill, steps, batch = tool("distill_draft"), int(t["distill_steps"]), int(t["distill_batch"])
    run = tmp_path / "run"
    argv = ["--target", str(built["out"] / "target"), "--draft", str(t["draft_config"]),
            "--corpus", str(built["argv"][-1]), "--run-dir", str(run), "--steps", str(steps),
            "--batch-size", str(batch), "--lr", str(t["distill_lr"]), "--num-prompts", str(t["num_prompts"]),
            "--prompt-tokens", str(t["prompt_tokens"]), "--new-tokens", str(t["new_tokens"]),
            "--eval-prompts", str(t["distill_eval_prompts"]), "--eval-new-tokens", str(t["new_tokens"]),
            "--save-every", "2", "--log-every", "1", "--no-acceptance"]
    assert distill.main([*argv, "--stop-after", "5"]) == 0  # last checkpoint: step 4
    data = (run / "data" / "distill_train.npz").read_bytes()
    assert distill.main([*argv, "--out", str(tmp_path / "draft")]) == 0
    assert (run / "data" / "distill_train.npz").read_bytes() == data  # not regenerated on resume
    log = [r for r in read_metrics(run) if r["event"] == "train"]
    assert [r["step"] for r in log] == [*range(1, 6), *range(5, steps + 1)]
    assert [r["data_position"] for r in log] == [batch * r["step"] for r in log]
    assert log[-1]["kl"] < log[0]["kl"]
    report = json.loads((tmp_path / "draft" / "distill_report.json").read_text())
    assert report["after"]["divergences"]["eval_kl"] < report["before"]["divergences"]["eval_kl"]
    assert "acceptance" not in report["after"]
