"""Training EAGLE-3 heads (jaxspec.training.eagle3, tools/train_eagle3.py) with a tiny random target.

The unrolled training-time-test forward is checked against the head drafting the way the
proposer does (absorb the context, then feed its own outputs back through its cache), the loss
against a numpy computation of the target's restricted distribution one position ahead, the
draft vocabulary against hand-counted frequencies; the tool trains on a few files, lowers the
loss, resumes with the same trajectory, and exports a head that loads and drafts greedy output
identical to plain decoding.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspec.checkpoint import save_model
from jaxspec.checkpoint.eagle3_io import check_d2t, load_eagle3
from jaxspec.config import load_config
from jaxspec.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.models import KVCache, create_model
from jaxspec.models.eagle3 import Eagle3Config, create_head
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import ByteTokenizer
from jaxspec.training import eagle3 as E
from jaxspec.training.data import PackedWindows
from jaxspec.training.runs import read_metrics

REPO = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_head(seed=3, scale=10.0, nbr=False):
    """A head whose weights are large enough that every term of the attention matters."""
    cfg = Eagle3Config(name="t", hidden_size=32, target_hidden_size=16, vocab_size=50, draft_vocab_size=20,
                       num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, aux_layers=(1, 2, 3), max_seq_len=64,
                       norm_before_residual=nbr)
    head = create_head(cfg, seed, d2t=np.arange(20) * 2 - np.arange(20))  # draft id i -> target id 2i
    g, p, rest = nnx.split(head, nnx.Param, ...)
    return nnx.merge(g, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, p), rest)


# ------------------------------------------------------------------ vocabulary
def test_draft_vocab_from_frequencies():
    stream = np.array([5] * 7 + [1] * 4 + [9] * 4 + [3] * 2 + [0] * 1 + [8] * 1 + [2] * 3, np.int64)
    counts = E.token_counts(stream, 10)
    assert counts.tolist() == [1, 4, 3, 2, 0, 7, 0, 0, 1, 4]
    d2t, t2d = E.draft_vocab_mapping(counts, 4)
    ids = np.arange(4) + d2t  # target id = draft id + d2t[draft id]
    assert ids.tolist() == [1, 2, 5, 9]  # 5 (7), 1 and 9 (4 each), then 2 (3); draft ids in target-id order
    assert d2t.tolist() == [1, 1, 3, 6]
    assert t2d.tolist() == [i in (1, 2, 5, 9) for i in range(10)]
    # Ties go to the lower id: 0 and 8 both occur once.
    assert (np.arange(7) + E.draft_vocab_mapping(counts, 7)[0]).tolist() == [0, 1, 2, 3, 5, 8, 9]
    # Required ids (eos) are always in, displacing the least frequent.
    assert (np.arange(4) + E.draft_vocab_mapping(counts, 4, required=[7])[0]).tolist() == [1, 5, 7, 9]
    t2d_index = E.target_to_draft(d2t, 10)
    assert t2d_index.tolist() == [-1, 0, 1, -1, -1, 2, -1, -1, -1, 3]
    assert E.vocab_coverage(counts, d2t) == pytest.approx((4 + 3 + 7 + 4) / len(stream))
    cfg = Eagle3Config(name="v", hidden_size=8, target_hidden_size=8, vocab_size=10, draft_vocab_size=4, num_heads=2,
                       num_kv_heads=1, head_dim=4, mlp_dim=8, aux_layers=(1,))
    assert check_d2t(d2t, cfg).tolist() == [1, 2, 5, 9]  # what the checkpoint reader accepts
    with pytest.raises(ValueError):
        E.draft_vocab_mapping(counts, 11)


# ------------------------------------------------------------ the unrolled forward
@pytest.mark.parametrize("nbr", [False, True])
def test_ttt_steps_are_what_the_proposer_drafts(nbr):
    """Step j at position q == the head after absorbing positions 0..q-j with the target's features
    and then drafting j tokens feeding its own outputs back through its cache."""
    head = _small_head(nbr=nbr)
    cfg = head.cfg
    rng = np.random.default_rng(0)
    embed = jnp.asarray(rng.standard_normal((50, 32)), jnp.float32)
    b, n, steps = 2, 12, 4
    feats = jnp.asarray(rng.standard_normal((b, n, 48)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 50, (b, n)), jnp.int32)
    outs = E.ttt_forward(head, embed, feats, toks, steps)
    for length in (1, 6):  # context absorbed: positions 0..length-1
        cache = KVCache.create(cfg, b, 64)
        out, cache = head(toks[:, :length], feats[:, :length], jnp.zeros(b, jnp.int32), cache, None, embed)
        h = out[:, length - 1]
        np.testing.assert_allclose(outs[0][:, length - 1], h, rtol=1e-4, atol=1e-4)
        for j in range(1, steps):
            pos = length - 1 + j
            out, cache = head(toks[:, pos:pos + 1], h[:, None], jnp.full(b, pos, jnp.int32), cache, None, embed,
                              fused=True)
            h = out[:, 0]
            scale = float(jnp.max(jnp.abs(h)))
            np.testing.assert_allclose(outs[j][:, pos] / scale, h / scale, atol=1e-5, err_msg=f"step {j} at {pos}")


def test_loss_is_the_targets_restricted_distribution_one_position_ahead():
    """kl_0 == KL(p || q): p the target's softmax at q + 1 over the draft vocabulary, renormalised;
    q the head's at q (features at q, token x[q+1]); acc_0 compares with the target's full argmax."""
    head = _small_head(scale=3.0)
    rng = np.random.default_rng(1)
    embed = jnp.asarray(rng.standard_normal((50, 32)), jnp.float32)
    w_out = jnp.asarray(3 * rng.standard_normal((16, 50)), jnp.float32)
    b, t = 2, 9
    feats = jnp.asarray(rng.standard_normal((b, t, 48)), jnp.float32)
    hidden = jnp.asarray(rng.standard_normal((b, t, 16)), jnp.float32)
    toks = jnp.asarray(rng.integers(0, 50, (b, t)), jnp.int32)
    d2t = np.asarray(head.d2t[...])
    ids = np.arange(20) + d2t
    _, m = E.ttt_loss(head, embed, w_out, jnp.asarray(ids), jnp.asarray(E.target_to_draft(d2t, 50)), feats, hidden,
                      toks, E.Eagle3TrainConfig(ttt_steps=2))
    out, _ = head(toks[:, 1:], feats[:, :-1], jnp.zeros(b, jnp.int32), KVCache.create(head.cfg, b, t), None, embed)
    logq = np.asarray(jax.nn.log_softmax(head.logits(out), axis=-1), np.float64)
    z = np.asarray(hidden[:, 1:] @ w_out, np.float64)
    zd = z[..., ids]
    logp = zd - np.log(np.exp(zd - zd.max(-1, keepdims=True)).sum(-1, keepdims=True)) - zd.max(-1, keepdims=True)
    kl = (np.exp(logp) * (logp - logq)).sum(-1).mean()
    assert float(m["kl_0"]) == pytest.approx(kl, rel=1e-4)
    acc = (ids[logq.argmax(-1)] == z.argmax(-1)).mean()
    assert float(m["acc_0"]) == pytest.approx(acc)


# --------------------------------------------------------------------- the tool
_FILE = "def {name}(x):\n    total = 0\n    for i in range(x):\n        total += i * {k}\n    return total\n\n\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random MoE target saved with the byte tokenizer, and a corpus of a few files."""
    root = tmp_path_factory.mktemp("eagle3")
    cfg = load_config("tiny-moe").replace(name="tiny-moe-target")
    target = create_model(cfg, seed=0)
    # A random target's next-token distributions are nearly uniform (nothing to learn beyond
    # their entropy): a larger output projection makes them peaked.
    target.lm_head.set_value(target.lm_head[...] * 25)
    save_model(root / "target", target, TOK)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"m{i}.py").write_text("".join(_FILE.format(name=f"f{i}_{j}", k=j) for j in range(8)))
    return root, target


def _args(root: Path, run: str, *extra: str) -> list[str]:
    return ["--target", str(root / "target"), "--corpus", str(root / "corpus"), "--run-dir", str(root / run),
            "--steps", "12", "--batch-size", "4", "--seq-len", "48", "--ttt-steps", "3", "--draft-vocab", "96",
            "--lr", "3e-3", "--warmup", "2", "--log-every", "1", "--save-every", "4", "--eval-windows", "4",
            "--no-acceptance", *extra]


def _train_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r["event"] == "train"}


@pytest.mark.slow
def test_tool_lowers_the_loss_resumes_and_exports_a_greedy_exact_head(setup, capsys):
    root, target = setup
    train = tool("train_eagle3")
    assert train.main(_args(root, "full", "--out", str(root / "head"))) == 0
    full = _train_losses(root / "full")
    assert sorted(full) == list(range(1, 13))
    kl = _train_losses(root / "full", "kl_0")  # the loss less the target's entropy
    assert full[12] < full[1] and kl[12] < 0.7 * kl[1], (full, kl)

    # Killed after step 6 (its last checkpoint: step 4), then resumed: the same trajectory.
    assert train.main(_args(root, "resumed", "--stop-after", "6")) == 0
    assert train.main(_args(root, "resumed")) == 2  # checkpoints there and no --resume: refused
    assert train.main(_args(root, "resumed", "--resume")) == 0
    resumed = [r for r in read_metrics(root / "resumed") if r["event"] == "train"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    assert resumed[6]["data_position"] == 5 * 4
    after = {r["step"]: r["loss"] for r in resumed[6:]}
    for step, loss in after.items():
        assert loss == pytest.approx(full[step], rel=1e-5), step
    # A changed setting is refused rather than resumed.
    assert train.main(_args(root, "resumed", "--resume", "--ttt-steps", "2")) == 2

    # The export: speculators layout, loads, and drafting with it keeps greedy output exact.
    config = json.loads((root / "head" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    head = load_eagle3(root / "head", target=target.cfg)
    assert head.cfg.draft_vocab_size == 96 and head.cfg.aux_layers == E.default_head_layers(target.cfg.num_layers)
    report = json.loads((root / "head" / "train_report.json").read_text())
    assert report["after"]["heldout"]["eval_loss"] < report["before"]["heldout"]["eval_loss"]
    prompts = [TOK.encode(t, add_bos=True) for t in ("def f0_1(x):\n", "    total", "for i in", "return")]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = Engine(make_runner(target, num_slots=2, max_len=64), TOK).generate(prompts, params)
    for k in (1, 3):
        runner = make_runner(target, num_slots=2, max_len=64, spec_method="eagle3", draft=head,
                             num_speculative_tokens=k, k_max=k)
        engine = Engine(runner, TOK)
        spec = engine.generate(prompts, params)
        assert [c.token_ids for c in spec] == [c.token_ids for c in plain], k
        assert engine.spec_stats.num_drafts > 0

    # Fine-tuning that head on the target's own continuations beside the corpus windows.
    assert train.main(_args(root, "tuned", "--init", str(root / "head"), "--continuations", "6",
                            "--continuation-tokens", "16", "--prompt-tokens", "12", "--out", str(root / "tuned-head"))
                      ) == 0
    data = np.load(root / "tuned" / "data" / "continuations.npz")
    assert data["tokens"].shape == (6, 48) and (data["lengths"] - data["prompt_lengths"] > 0).all()
    tuned_log = [r for r in read_metrics(root / "tuned") if r["event"] == "eval"][-1]
    assert tuned_log["eval_kl_0"] < report["before"]["heldout"]["eval_kl_0"]
    tuned = load_eagle3(root / "tuned-head", target=target.cfg)
    np.testing.assert_array_equal(tuned.d2t[...], head.d2t[...])


@pytest.mark.slow
def test_feature_cache_holds_the_targets_forward_and_trains(setup, tmp_path):
    root, target = setup
    stream = np.asarray(TOK.encode((root / "corpus" / "m0.py").read_text() * 3, add_bos=True), np.int32)
    windows = PackedWindows(stream, 32, seed=0)
    aux = E.default_head_layers(target.cfg.num_layers)
    cache = E.FeatureCache.build(tmp_path / "cache", target, aux, windows, count=5, dtype="float32", batch_size=4)
    assert len(cache) == 5
    batch = cache.batch(0, 3, seed=0)
    feats, hidden = jax.jit(lambda x: E.target_forward(target, x, aux, None))(jnp.asarray(batch.tokens))
    np.testing.assert_allclose(batch.features, feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch.hidden, hidden, rtol=1e-5, atol=1e-5)
    assert E.FeatureCache.build(tmp_path / "cache", target, aux, windows, count=5, dtype="float32").meta == cache.meta

    train = tool("train_eagle3")
    assert train.main(_args(root, "cached", "--feature-cache", str(tmp_path / "fc"), "--cache-windows", "8")) == 0
    kl = _train_losses(root / "cached", "kl_0")
    assert kl[12] < 0.7 * kl[1], kl


# ------------------------------------------------------------------ the built-in head
def test_builtin_head_is_eagle3s_default_for_the_moe_target():
    from jaxspec import builtin
    from jaxspec.loading import default_draft

    assert (builtin.EAGLE3_DIR / "config.json").exists(), "the built-in EAGLE-3 head is missing from the assets"
    head_dir = str(builtin.EAGLE3_DIR)
    assert default_draft(None, None, "eagle3") == head_dir
    assert default_draft(builtin.BUILTIN, builtin.BUILTIN, "eagle3") == head_dir
    assert default_draft(builtin.BUILTIN, "/my/head", "eagle3") == "/my/head"
    assert default_draft(builtin.BUILTIN_DENSE, None, "eagle3") is None  # no head for the dense pair
    assert default_draft(builtin.BUILTIN, None, None) == builtin.BUILTIN  # the dense draft stays the default


@pytest.mark.slow
def test_builtin_head_drafts_greedy_output_identical_to_plain():
    from jaxspec import builtin
    from jaxspec.loading import load_any

    assert (builtin.EAGLE3_DIR / "config.json").exists(), "the built-in EAGLE-3 head is missing from the assets"
    target, tok = load_any(builtin.BUILTIN)
    head = load_eagle3(builtin.EAGLE3_DIR, target=target.cfg)
    prompts = [tok.encode(t, add_bos=True) for t in ("def fibonacci(n):\n", "import os\n\n\nclass ", "    for i in")]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    plain = Engine(make_runner(target, num_slots=2, max_len=64), tok).generate(prompts, params)
    engine = Engine(make_runner(target, num_slots=2, max_len=64, spec_method="eagle3", draft=head,
                                num_speculative_tokens=4, k_max=4), tok)
    spec = engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert engine.spec_stats.mean_acceptance_length > 2.0  # a trained head: most drafts are accepted
