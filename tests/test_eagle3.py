"""EAGLE-3 heads: the forward against a numpy reference written here from the published
description, both checkpoint layouts (and refusals), the target's captured hidden states, greedy
output identical to plain decoding (dense and MoE targets, several k, several slots), and sampled
output following the target's distribution (chi-square), which an injected wrong q fails.

Random heads accept almost nothing, so the engine tests choose the head's draft vocabulary
(d2t) from tokens the target does produce: acceptance then happens often enough for accepted
runs, rejections and bonus tokens to all occur.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy import stats

import test_spec_sampling as tss
from helpers import CompileCounter
from jaxspec.checkpoint.eagle3_io import load_eagle3, save_eagle3
from jaxspec.config import ConfigError, load_config
from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.engine.factory import make_runner
from jaxspec.models import KVCache, create_model
from jaxspec.models.eagle3 import Eagle3Config, create_head, default_aux_layers
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import CostModel, SpeculativeRunner, make_proposer
from jaxspec.speculative.eagle3 import Eagle3Proposer
from jaxspec.speculative.proposer import Proposal
from jaxspec.tokenizer import ByteTokenizer

V, D, DT = 259, 64, 64  # target vocabulary, head width, target width (tiny-moe / tiny-dense)
H, KVH, DH, F = 4, 2, 16, 96
TOK = ByteTokenizer()


# ------------------------------------------------------------------ the numpy reference
def rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta):  # x [T, N, Dh], rotate-half
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
    ang = pos[:, None, None] * inv[None, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


class RefHead:
    """EAGLE-3 as published, over HF-layout tensors (Linear weights [out, in]), float64.
    ``step`` processes one position (its token, and target features or the previous output)."""

    def __init__(self, t: dict, prefix: str, embed, nbr: bool, theta=10000.0):
        self.t = {k: np.asarray(v, np.float64) for k, v in t.items() if k not in ("d2t", "t2d")}
        self.p, self.embed, self.nbr, self.theta = prefix, np.asarray(embed, np.float64), nbr, theta
        self.keys, self.values = [], []

    def w(self, name):
        return self.t[self.p + name]

    def step(self, token: int, pos: int, features=None, own=None):
        t = self.t
        fused = own if own is not None else features @ t["fc.weight"].T + t.get("fc.bias", 0.0)
        e = rms(self.embed[token], self.w("input_layernorm.weight"))
        h = rms(fused, self.w("hidden_norm.weight"))
        residual = h if self.nbr else fused
        x = np.concatenate([e, h])
        q = rope((self.w("self_attn.q_proj.weight") @ x).reshape(1, H, DH), np.array([pos]), self.theta)[0]
        k = rope((self.w("self_attn.k_proj.weight") @ x).reshape(1, KVH, DH), np.array([pos]), self.theta)[0]
        v = (self.w("self_attn.v_proj.weight") @ x).reshape(KVH, DH)
        self.keys.append(k)
        self.values.append(v)
        keys, values = np.stack(self.keys), np.stack(self.values)  # [P, KVH, DH]
        g = H // KVH
        att = np.zeros((H, DH))
        for head in range(H):
            s = keys[:, head // g] @ q[head] / np.sqrt(DH)
            p = np.exp(s - s.max())
            att[head] = (p / p.sum()) @ values[:, head // g]
        x = residual + self.w("self_attn.o_proj.weight") @ att.reshape(-1)
        n = rms(x, self.w("post_attention_layernorm.weight"))
        gate, up = self.w("mlp.gate_proj.weight") @ n, self.w("mlp.up_proj.weight") @ n
        out = x + self.w("mlp.down_proj.weight") @ (gate / (1 + np.exp(-gate)) * up)
        logits = t["lm_head.weight"] @ rms(out, t["norm.weight"])
        return out, logits


def random_tensors(prefix: str, draft_vocab: int, rng, *, own_embed=False, fc_bias=False, n_aux=3):
    def lin(o, i):
        return (rng.standard_normal((o, i)) * 0.15).astype(np.float32)

    t = {
        "fc.weight": lin(D, n_aux * DT),
        "norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        "lm_head.weight": lin(draft_vocab, D),
        prefix + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        prefix + "hidden_norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        prefix + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        prefix + "self_attn.q_proj.weight": lin(H * DH, 2 * D),
        prefix + "self_attn.k_proj.weight": lin(KVH * DH, 2 * D),
        prefix + "self_attn.v_proj.weight": lin(KVH * DH, 2 * D),
        prefix + "self_attn.o_proj.weight": lin(D, H * DH),
        prefix + "mlp.gate_proj.weight": lin(F, D),
        prefix + "mlp.up_proj.weight": lin(F, D),
        prefix + "mlp.down_proj.weight": lin(D, F),
    }
    ids = np.sort(rng.choice(V, draft_vocab, replace=False))
    t["d2t"] = (ids - np.arange(draft_vocab)).astype(np.int64)
    t2d = np.zeros(V, bool)
    t2d[ids] = True
    t["t2d"] = t2d
    if own_embed:
        t["embed_tokens.weight"] = (rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    if fc_bias:
        t["fc.bias"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
    return t


LAYER = {"hidden_size": D, "intermediate_size": F, "num_attention_heads": H, "num_key_value_heads": KVH,
         "head_dim": DH, "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": V,
         "max_position_embeddings": 256, "hidden_act": "silu", "tie_word_embeddings": False}


def write_eagle(path, t, draft_vocab, layer_outputs=None, extra=None):
    """The original EAGLE / SpecForge layout, written by hand."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    cfg = {**LAYER, "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "draft_vocab_size": draft_vocab,
           "target_hidden_size": DT, "torch_dtype": "float32", **(extra or {})}
    if layer_outputs is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": layer_outputs, "use_aux_hidden_state": True}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_speculators(path, t, draft_vocab, layer_ids, nbr, extra=None):
    """The vllm-project/speculators layout, written by hand."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.2.0",
           "transformer_layer_config": {**LAYER, "model_type": "llama"}, "draft_vocab_size": draft_vocab,
           "norm_before_residual": nbr, "target_hidden_size": DT, "eagle_aux_hidden_state_layer_ids": layer_ids,
           "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                  "verifier": {"name_or_path": "tiny-moe", "architectures": []}},
           "torch_dtype": "float32", **(extra or {})}
    if nbr is None:
        del cfg["norm_before_residual"]
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def implementation_outputs(head, embed, tokens, feats, feedback):
    """Our head over positions 0..T-1, then the feedback steps -> (logits [T + n, Vd], outs)."""
    t = len(tokens)
    cache = KVCache.create(head.cfg, 1, 64)
    out, cache = head(jnp.asarray([tokens]), jnp.asarray(feats[None]), jnp.zeros(1, jnp.int32), cache, embed=embed)
    logits, outs = [head.logits(out)[0]], [out[0]]
    h = out[0, -1]
    for i, tok in enumerate(feedback):
        o, cache = head(jnp.asarray([[tok]]), h[None, None], jnp.array([t + i]), cache, embed=embed, fused=True)
        h = o[0, 0]
        logits.append(head.logits(o)[0])
        outs.append(o[0])
    return np.concatenate([np.asarray(x) for x in logits]), np.concatenate([np.asarray(x) for x in outs])


def reference_outputs(ref: RefHead, tokens, feats, feedback):
    logits, outs = [], []
    for p, (tok, f) in enumerate(zip(tokens, feats)):
        o, lg = ref.step(tok, p, features=np.asarray(f, np.float64))
        logits.append(lg)
        outs.append(o)
    for i, tok in enumerate(feedback):
        o, lg = ref.step(tok, len(tokens) + i, own=outs[-1])
        logits.append(lg)
        outs.append(o)
    return np.stack(logits), np.stack(outs)


CASES = [  # (layout, own embeddings, fc bias, norm_before_residual)
    ("eagle", False, False, False),
    ("eagle", True, True, False),
    ("speculators", False, False, True),
    ("speculators", True, True, False),
]


@pytest.mark.parametrize("layout,own_embed,fc_bias,nbr", CASES)
def test_head_forward_matches_the_numpy_reference(tmp_path, layout, own_embed, fc_bias, nbr):
    rng = np.random.default_rng(CASES.index((layout, own_embed, fc_bias, nbr)))
    vd = 40
    prefix = "midlayer." if layout == "eagle" else "layers.0."
    t = random_tensors(prefix, vd, rng, own_embed=own_embed, fc_bias=fc_bias)
    target_cfg = load_config("tiny-moe").replace(num_layers=6, name="tiny-moe-6l")
    if layout == "eagle":
        path = write_eagle(tmp_path / "h", t, vd, layer_outputs=[1, 2, 4], extra={"bias": True} if fc_bias else None)
        expect_layers = (2, 3, 5)  # SGLang: the ids name layer outputs, i.e. the inputs of layer id + 1
    else:
        path = write_speculators(tmp_path / "h", t, vd, [1, 3, 6], nbr)
        expect_layers = (1, 3, 6)  # vLLM uses them as they are
    head = load_eagle3(path, target=target_cfg, dtype="float32")
    assert head.cfg.aux_layers == expect_layers
    assert head.cfg.own_embeddings == own_embed and head.cfg.fc_bias == fc_bias
    assert head.cfg.norm_before_residual == nbr
    target_embed = (rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    embed = t["embed_tokens.weight"] if own_embed else target_embed

    tokens = rng.integers(0, V, 7).tolist()
    feats = (rng.standard_normal((7, 3 * DT)) * 2).astype(np.float32)
    feedback = rng.integers(0, V, 3).tolist()
    got_logits, got_out = implementation_outputs(head, None if own_embed else jnp.asarray(target_embed), tokens, feats,
                                                 feedback)
    want_logits, want_out = reference_outputs(RefHead(t, prefix, embed, nbr), tokens, feats, feedback)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    # Draft ids map to target ids through d2t.
    ids = np.arange(vd) + t["d2t"]
    np.testing.assert_array_equal(np.asarray(head.target_ids()), ids)

    # Written back (speculators layout) and read again: the same head.
    again = load_eagle3(save_eagle3(tmp_path / "again", head, verifier="tiny-moe"), target=target_cfg)
    assert again.cfg == head.cfg.replace(name="again", speculative_tokens=again.cfg.speculative_tokens)
    got2, _ = implementation_outputs(again, None if own_embed else jnp.asarray(target_embed), tokens, feats, feedback)
    np.testing.assert_array_equal(got2, got_logits)


def test_default_layers_and_refusals(tmp_path):
    rng = np.random.default_rng(1)
    target_cfg = load_config("tiny-moe").replace(num_layers=8, name="tiny-moe-8l")
    t = random_tensors("midlayer.", 16, rng)
    head = load_eagle3(write_eagle(tmp_path / "a", t, 16), target=target_cfg)
    assert head.cfg.aux_layers == default_aux_layers(8) == (2, 4, 5)
    with pytest.raises(ConfigError, match="target's layer count"):
        load_eagle3(tmp_path / "a")  # no ids and no target
    with pytest.raises(ConfigError, match="fc_norm"):
        load_eagle3(write_eagle(tmp_path / "b", t, 16, extra={"fc_norm": True}), target=target_cfg)
    with pytest.raises(ConfigError, match="norm_output"):
        load_eagle3(write_eagle(tmp_path / "c", t, 16, extra={"norm_output": True}), target=target_cfg)
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        load_eagle3(write_eagle(tmp_path / "d", t, 16, extra={"tie_word_embeddings": True}), target=target_cfg)
    with pytest.raises(ConfigError, match="use_aux_hidden_state"):
        p = write_eagle(tmp_path / "e", t, 16, layer_outputs=[1, 2, 3])
        cfg = json.loads((p / "config.json").read_text())
        cfg["eagle_config"]["use_aux_hidden_state"] = False
        (p / "config.json").write_text(json.dumps(cfg))
        load_eagle3(p, target=target_cfg)
    s = random_tensors("layers.0.", 16, rng)
    with pytest.raises(ConfigError, match="norm_before_residual"):
        load_eagle3(write_speculators(tmp_path / "f", s, 16, [1, 2, 3], None), target=target_cfg)
    with pytest.raises(ConfigError, match="parallel_drafting"):
        load_eagle3(write_speculators(tmp_path / "g", s, 16, [1, 2, 3], False, extra={"parallel_drafting": True}),
                    target=target_cfg)
    with pytest.raises(Exception, match="mask_hidden"):
        load_eagle3(write_speculators(tmp_path / "h", {**s, "mask_hidden": np.zeros((1, 3 * DT), np.float32)}, 16,
                                      [1, 2, 3], False), target=target_cfg)
    with pytest.raises(ValueError, match="do not exist"):
        load_eagle3(write_speculators(tmp_path / "i", s, 16, [1, 2, 9], False), target=target_cfg)
    bad = {**s, "d2t": np.zeros(16, np.int64)}  # every draft id -> its own id: fine; t2d then disagrees
    with pytest.raises(Exception, match="t2d"):
        load_eagle3(write_speculators(tmp_path / "j", bad, 16, [1, 2, 3], False), target=target_cfg)


# --------------------------------------------------------------- the target's features
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_target_returns_layer_inputs_from_the_same_pass(name):
    cfg = load_config(name)
    model = create_model(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    cache = KVCache.create(cfg, 2, 16)
    plain = model(tokens, jnp.zeros(2, jnp.int32), cache)
    out = model(tokens, jnp.zeros(2, jnp.int32), cache, aux_layers=(0, 1, cfg.num_layers))
    assert plain.aux_hidden is None and out.aux_hidden.shape == (2, 6, 3 * cfg.d_model)
    np.testing.assert_array_equal(out.logits, plain.logits)  # the option changes nothing else
    aux = np.asarray(out.aux_hidden)
    np.testing.assert_allclose(aux[..., : cfg.d_model], np.asarray(model.embed[...])[np.asarray(tokens)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.final_norm(jnp.asarray(aux[..., -cfg.d_model:]))),
                               np.asarray(out.hidden), rtol=1e-5, atol=1e-5)
    # Decoding token by token returns the same features as the one-pass prefill.
    c = KVCache.create(cfg, 2, 16)
    for i in range(6):
        o = model(tokens[:, i : i + 1], jnp.full(2, i, jnp.int32), c, aux_layers=(0, 1, cfg.num_layers))
        c = o.cache
        np.testing.assert_allclose(np.asarray(o.aux_hidden[:, 0]), aux[:, i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model(tokens, jnp.zeros(2, jnp.int32), cache, aux_layers=(cfg.num_layers + 1,))


# -------------------------------------------------------------------- engine: greedy
SLOTS, MAX_LEN = 6, 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _prompts(n=6):
    rng = np.random.default_rng(3)
    return [rng.integers(3, V, int(m)).tolist() for m in rng.integers(3, 12, n)]


def _plain(model, prompts, params):
    return [o.token_ids for o in Engine(PlainRunner(ModelRunner(model, SLOTS, MAX_LEN)), TOK).generate(prompts, params)]


def head_for(target_cfg, produced: list[int], seed: int, tmp_path, layout: str):
    """A random head whose draft vocabulary is ``produced`` (tokens the target emits) plus a few
    others, written in ``layout`` and loaded back."""
    rng = np.random.default_rng(seed)
    others = [t for t in rng.permutation(V).tolist() if t not in produced][: max(0, 12 - len(produced))]
    ids = np.array(sorted(set(produced) | set(others)))
    vd = len(ids)
    prefix = "midlayer." if layout == "eagle" else "layers.0."
    t = random_tensors(prefix, vd, rng)
    t["d2t"] = (ids - np.arange(vd)).astype(np.int64)
    t2d = np.zeros(V, bool)
    t2d[ids] = True
    t["t2d"] = t2d
    L = target_cfg.num_layers
    if layout == "eagle":  # layer outputs 0..L-1 -> our ids 1..L
        path = write_eagle(tmp_path / f"head-{seed}", t, vd, layer_outputs=[-1, 0, L - 1])
    else:
        path = write_speculators(tmp_path / f"head-{seed}", t, vd, [0, 1, L], False)
    return load_eagle3(path, target=target_cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", [("tiny-moe", "speculators"), ("tiny-dense", "eagle")])
def test_greedy_output_equals_plain_decoding(tmp_path, name, layout):
    cfg = load_config(name)
    model = create_model(cfg, 0)
    prompts = _prompts()
    plain = _plain(model, prompts, [GREEDY] * len(prompts))
    produced = sorted({t for out in plain for t in out})
    head = head_for(cfg, produced, 5, tmp_path, layout)
    accepted = drafted = 0
    for k in (1, 2, 4):
        runner = make_runner(model, num_slots=SLOTS, max_len=MAX_LEN, spec_method="eagle3", draft=head,
                             num_speculative_tokens=k, k_max=4)
        engine = Engine(runner, TOK)
        out = [o.token_ids for o in engine.generate(prompts, [GREEDY] * len(prompts))]
        assert out == plain, f"k={k}"
        accepted += engine.spec_stats.num_accepted_tokens
        drafted += engine.spec_stats.num_draft_tokens
    assert 0 < accepted < drafted, (accepted, drafted)  # accepted runs and rejections both happened


@pytest.mark.slow
def test_greedy_with_adaptive_k_and_per_request_k(tmp_path):
    """Adaptive k (synthetic costs that make speculating worth it, so the policy's choices follow
    acceptance: k = 0 steps, whose features the head absorbs too, happen) and per-request k."""
    cfg = load_config("tiny-moe")
    model = create_model(cfg, 0)
    prompts = _prompts(5)
    plain = _plain(model, prompts, [GREEDY] * len(prompts))
    head = head_for(cfg, sorted({t for o in plain for t in o}), 6, tmp_path, "speculators")
    costs = CostModel({0: 0.0, 1: 1e-4, 2: 2e-4}, {0: 1e-2, 1: 1.02e-2, 2: 1.04e-2}, smoothing=0.0)
    runner = SpeculativeRunner(ModelRunner(model, 4, MAX_LEN), make_proposer("eagle3", head, target=model),
                               num_speculative_tokens="auto", k_max=2, cost_model=costs)
    engine = Engine(runner, TOK)
    runner.warmup()
    assert runner.fused_head
    counter = CompileCounter()
    # Fused, a k = 0 step is one call too (the target's step and the head's absorb of its features):
    # no separate plain decode step, and the head absorbs nothing outside the steps but prompts.
    plain_steps, absorbs = [], []
    runner.target.decode_rows = lambda *a, **kw: plain_steps.append(a)
    observe = runner.proposer.observe
    runner.proposer.observe = lambda rows, tokens, *a: (absorbs.append(np.shape(tokens)[1]), observe(rows, tokens, *a))
    ids = [engine.add_request(p, GREEDY, num_speculative_tokens=k) for p, k in zip(prompts, (None, 0, 1, 2, None))]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    assert [tokens[i] for i in ids] == plain
    assert {0, 1, 2} <= {kb for kb, n in runner.bucket_steps.items() if n}
    assert not plain_steps and absorbs and all(width > 2 for width in absorbs), (len(plain_steps), absorbs)
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"



@pytest.mark.slow
@pytest.mark.parametrize("fuse", [True, False])
def test_spans_follow_the_contexts_and_nothing_compiles_after_warmup(tmp_path, fuse):
    """Contexts crossing the first attention span (128): the head's rounds and absorbs attend over
    the span of the rows' real lengths (fused: the target's span; unfused: the head's own), every
    one compiled at warm-up, and the output stays plain greedy decoding."""
    cfg = load_config("tiny-moe")
    model = create_model(cfg, 0)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, V, 110).tolist(), rng.integers(3, V, 9).tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = [o.token_ids for o in Engine(PlainRunner(ModelRunner(model, 2, 256)), TOK).generate(prompts, params)]
    head = head_for(cfg, sorted({t for o in plain for t in o}), 9, tmp_path, "speculators")
    runner = SpeculativeRunner(ModelRunner(model, 2, 256), make_proposer("eagle3", head, target=model),
                               num_speculative_tokens=2, k_max=2, fuse=fuse)
    assert runner.fused_head == fuse
    spans = []
    if fuse:
        run = runner._run_fused_head
        runner._run_fused_head = lambda kb, kv_len, *a: (spans.append(kv_len), run(kb, kv_len, *a))[1]
    else:
        prop = runner.proposer
        draft = prop._draft
        prop._draft = lambda kb, kv_len: (spans.append(kv_len), draft(kb, kv_len))[1]
    engine = Engine(runner, TOK)
    runner.warmup()
    spans.clear()
    counter = CompileCounter()
    assert [o.token_ids for o in engine.generate(prompts, [params] * 2)] == plain
    assert counter.count == 0, f"{counter.count} compilation(s) after warm-up"
    assert {128, 256} <= set(spans), sorted(set(spans))
    assert engine.spec_stats.num_accepted_tokens > 0

# ------------------------------------------------------------------- engine: sampled
def _uniform_head(first_tokens: list[int], support: list[int]) -> tuple:
    """A head with a zero lm_head: its q is uniform over the draft vocabulary before filtering,
    so with top-k 3 it drafts uniformly among draft ids 0..2, mapped to ``first_tokens`` (the
    target's top-3 at the first generated position); the rest of ``support`` follows."""
    rest = [t for t in support if t not in first_tokens]
    ids = np.array(first_tokens + rest)
    cfg = Eagle3Config(name="uniform", hidden_size=D, target_hidden_size=DT, vocab_size=V, draft_vocab_size=len(ids),
                       num_heads=H, num_kv_heads=KVH, head_dim=DH, mlp_dim=F, aux_layers=(0, 1, 2), max_seq_len=256)
    head = create_head(cfg, 3, d2t=ids - np.arange(len(ids)))
    head.lm_head.set_value(jnp.zeros_like(head.lm_head[...]))
    return head, ids


def _sampled_sequences(head, num: int, wrong_q: bool) -> tuple[list[tuple[int, ...]], object]:
    proposer = Eagle3Proposer(head, tss.TARGET.embed[...])
    if wrong_q:  # the injected bug: q reported without the top-k filter the drafts were sampled under
        ids = jnp.asarray(np.asarray(head.target_ids()))
        real = proposer.propose

        def propose(ctx):
            p = real(ctx)
            q = jnp.zeros_like(p.probs).at[:, :, ids].set(1.0 / len(ids))
            return Proposal(p.tokens, q, p.num_draft)

        proposer.propose = propose
    # The injected q goes through ``propose``: that run takes the unfused path (the correct one runs
    # the head's round inside the verification step).
    runner = SpeculativeRunner(ModelRunner(tss.TARGET, tss.SLOTS, tss.MAX_LEN), proposer, num_speculative_tokens=2,
                               k_max=4, fuse=not wrong_q)
    assert runner.fused_head == (not wrong_q)
    engine = Engine(runner, TOK, max_waiting=num)
    params = [SamplingParams(**tss.SETTINGS, seed=50_000 + i, max_tokens=tss.N_TOKENS, ignore_eos=True)
              for i in range(num)]
    return [tuple(o.token_ids) for o in engine.generate([tss.PROMPT] * num, params)], engine.spec_stats


def _chi_square(seqs, exact) -> float:
    cells = sorted(exact, key=exact.get, reverse=True)
    counts = np.array([sum(1 for s in seqs if s == c) for c in cells], np.float64)
    expected = np.array([exact[c] for c in cells]) * len(seqs)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.slow
def test_sampled_output_follows_the_target_and_a_wrong_q_is_caught():
    exact = tss.exact_distribution(tss.TARGET, tss.PROMPT, tss.N_TOKENS, tss.SETTINGS)
    first = {}
    for seq, p in exact.items():
        first[seq[0]] = first.get(seq[0], 0.0) + p
    top3 = sorted(first, key=first.get, reverse=True)[:3]
    assert max(first.values()) < 0.9, "degenerate first-token distribution: the bug could not show"
    support = sorted({t for seq in exact for t in seq})
    head, _ = _uniform_head(top3, support)
    num = 1000

    seqs, agg = _sampled_sequences(head, num, wrong_q=False)
    assert all(s in exact for s in seqs), "a sequence the filtered target cannot produce"
    assert 0.05 < agg.acceptance_rate < 0.95 and agg.accepted_per_position[1] > 0
    p_ok = _chi_square(seqs, exact)
    assert p_ok > 1e-3, f"chi-square p = {p_ok:.2e} with the head's real q"

    bad, _ = _sampled_sequences(head, num, wrong_q=True)
    p_bad = _chi_square(bad, exact)
    assert p_bad < 1e-6, f"a wrong q went unnoticed (p = {p_bad:.2e})"


def test_serving_options_need_a_head_for_eagle3():
    from serving.build import EngineOptions

    with pytest.raises(ConfigError, match="eagle3"):
        EngineOptions(spec_method="eagle3").validate()
    EngineOptions(model="tiny-moe", spec_method="eagle3", draft="/some/head").validate()


@pytest.mark.slow
def test_generate_cli_with_an_eagle3_head(tmp_path, capsys):
    from jaxspec.generate import main

    cfg = load_config("tiny-moe")
    head = head_for(cfg, list(range(60, 80)), 7, tmp_path, "speculators")
    path = save_eagle3(tmp_path / "cli-head", head, verifier="tiny-moe")
    common = ["--model", "tiny-moe", "--max-tokens", "10", "--ignore-eos", "--json", "--max-len", "64"]
    assert main([*common, "--spec-method", "none", "hello"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--spec-method", "eagle3", "--draft", str(path), "--num-speculative-tokens", "2",
                 "hello"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and spec["spec"]["num_draft_tokens"] > 0
    assert main([*common, "--spec-method", "eagle3", "hello"]) == 2  # no head given
