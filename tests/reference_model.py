"""An independent plain-jax.numpy transformer, written from the math (not from jaxspec.models).

It reads the parameters as a nested dict (``nnx.to_pure_dict``) and runs a whole
sequence at once with a dense causal mask, computing every expert for every token
and combining with the router's top-k weights. Used to check the NNX model.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, cfg):
    # x [T, N, Dh]; rotate-half convention.
    dh = x.shape[-1]
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh // 2) * 2.0 / dh))
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., : dh // 2], x[..., dh // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(x, wg, wu, wd):
    return (_silu(x @ wg) * (x @ wu)) @ wd


def reference_logits(params: dict, cfg, tokens: np.ndarray) -> np.ndarray:
    """tokens [T] -> logits [T, V] (float64 math)."""
    p = {k: v for k, v in params.items()}
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    x = np.asarray(p["embed"], np.float64)[tokens]
    for i in range(cfg.num_layers):
        lp = p["layers"][i]
        a = lp["attn"]
        h = _rms(x, np.asarray(lp["attn_norm"]["scale"]), cfg.rms_eps)
        q = np.einsum("td,dhk->thk", h, np.asarray(a["wq"], np.float64))
        k = np.einsum("td,dhk->thk", h, np.asarray(a["wk"], np.float64))
        v = np.einsum("td,dhk->thk", h, np.asarray(a["wv"], np.float64))
        if cfg.qkv_bias:
            q, k, v = q + np.asarray(a["bq"]), k + np.asarray(a["bk"]), v + np.asarray(a["bv"])
        if cfg.qk_norm:
            q = _rms(q, np.asarray(a["q_norm"]["scale"]), cfg.rms_eps)
            k = _rms(k, np.asarray(a["k_norm"]["scale"]), cfg.rms_eps)
        q, k = _rope(q, pos, cfg), _rope(k, pos, cfg)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(cfg.head_dim)
        mask = np.tril(np.ones((t, t), bool))
        if cfg.sliding_window:
            mask &= ~np.tril(np.ones((t, t), bool), -cfg.sliding_window)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v)
        x = x + np.einsum("thd,hdD->tD", o, np.asarray(a["wo"], np.float64))
        h = _rms(x, np.asarray(lp["mlp_norm"]["scale"]), cfg.rms_eps)
        if cfg.layer_is_moe(i):
            m = lp["moe"]
            logits = h @ np.asarray(m["router"], np.float64)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out = np.zeros_like(h)
            for n in range(t):
                top = np.argsort(-probs[n], kind="stable")[: cfg.num_experts_per_tok]
                w = probs[n, top]
                if cfg.router_renormalize:
                    w = w / w.sum()
                for e, we in zip(top, w):
                    out[n] += we * _swiglu(
                        h[n], np.asarray(m["w_gate"][e], np.float64), np.asarray(m["w_up"][e], np.float64),
                        np.asarray(m["w_down"][e], np.float64),
                    )
            if cfg.shared_expert_mlp_dim:
                se = m["shared_expert"]
                gate = 1.0 / (1.0 + np.exp(-(h @ np.asarray(m["shared_gate"], np.float64))))
                out += gate * _swiglu(h, *(np.asarray(se[k], np.float64) for k in ("w_gate", "w_up", "w_down")))
        else:
            mp = lp["mlp"]
            out = _swiglu(h, *(np.asarray(mp[k], np.float64) for k in ("w_gate", "w_up", "w_down")))
        x = x + out
    x = _rms(x, np.asarray(p["final_norm"]["scale"]), cfg.rms_eps)
    head = np.asarray(p["embed"], np.float64).T if cfg.tie_embeddings else np.asarray(p["lm_head"], np.float64)
    return x @ head
