"""Training an EAGLE-3 head (``jaxspec.models.eagle3``) for any ``Transformer`` target, dense or MoE.

Data: fixed windows of T corpus tokens (``PackedWindows``). The target runs its ordinary forward
over a window with ``aux_layers=head_cfg.aux_layers`` and returns, in that one pass, the features
the head reads and its final hidden states; its next-token logits are ``hidden @ W_out`` (the
target's own output projection). Both either come from the target inside the jitted step (on the
fly) or from a ``FeatureCache`` on disk written once by the same forward.

Positions (the head's convention, which the proposer drafts by): head position q reads the
target's features at q and the token x[q+1] and predicts x[q+2], so its training target is the
target's distribution at q + 1. From a window x[0..T-1] that gives N = T - 1 positions.

Training-time test (EAGLE-3, arXiv 2503.01840, section 3): the head is unrolled ``ttt_steps``
times. Step 0 is the ordinary forward over the target's features. Step j >= 1 at position q is
what the j-th drafted token sees: its hidden input is the head's own step j-1 output at q - 1
(in place of ``fc(features)``), its token is still x[q+1], and it attends, for each earlier key
position r, to the keys the proposer's cache holds at that moment: step max(0, j - (q - r)) —
the real (step 0) keys of the absorbed context and, on the last j diagonals, the keys the
drafting steps themselves wrote. Step j is defined for q >= j.

Loss: cross entropy of the head's draft-vocabulary distribution against the target's softmax
restricted (renormalised) to the draft vocabulary, per step, weighted ``step_decay ** j``: the
head learns to agree with the target, not with the corpus. Metrics per step: ``acc_j``, the
share of positions where the head's argmax is the target's argmax (the greedy acceptance of a
draft whose earlier drafts were right).

Draft vocabulary: the ``draft_vocab`` most frequent target ids of the training split
(``draft_vocab_mapping``), as the formats define it: ``d2t[i] = target_id(i) - i`` with draft ids
in increasing target-id order, ``t2d`` the boolean mask of chosen target ids.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.config import ModelConfig
from jaxspec.models import KVCache, Transformer
from jaxspec.models.eagle3 import Eagle3Config, Eagle3Head, create_head, default_aux_layers
from jaxspec.models.layers import apply_rope, rope_inv_frequencies
from jaxspec.training.data import PackedWindows, epoch_order
from jaxspec.training.state import OptimConfig, TrainState, commit, make_optimizer

_MASK = -1e30


# --------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class Eagle3TrainConfig:
    """What the step computes (static in the jitted steps)."""

    ttt_steps: int = 6  # unrolled drafting steps trained per position (the k the head is good for)
    step_decay: float = 0.8  # loss weight of step j: step_decay ** j (the paper's SpecForge default)
    moe_backend: str | None = None  # the target's expert dispatch (None: its config's)

    def __post_init__(self) -> None:
        if self.ttt_steps < 1:
            raise ValueError(f"ttt_steps must be >= 1, got {self.ttt_steps}")

    def weights(self) -> np.ndarray:
        return np.array([self.step_decay ** j for j in range(self.ttt_steps)], np.float32)


def default_head_layers(target_layers: int) -> tuple[int, ...]:
    """Low, middle and high target features. The published default (2, L // 2, L - 3) repeats or
    misorders layers for L < 6 (L = 4 gives (2, 2, 1)): a shallow target takes (1, L // 2, L), its
    last layer's output included."""
    if target_layers >= 6:
        return default_aux_layers(target_layers)
    return tuple(sorted({1, target_layers // 2, target_layers}))


def head_config_for(target: ModelConfig, draft_vocab: int, *, aux_layers: Sequence[int] | None = None,
                    mlp_dim: int | None = None, name: str = "eagle3-head", speculative_tokens: int | None = None,
                    norm_before_residual: bool = False) -> Eagle3Config:
    """A head shaped like one of the target's layers (so it shares the target's embeddings)."""
    return Eagle3Config(
        name=name, hidden_size=target.d_model, target_hidden_size=target.d_model, vocab_size=target.vocab_size,
        draft_vocab_size=draft_vocab, num_heads=target.num_heads, num_kv_heads=target.num_kv_heads,
        head_dim=target.head_dim, mlp_dim=mlp_dim or target.mlp_dim,
        aux_layers=tuple(aux_layers) if aux_layers else default_head_layers(target.num_layers),
        norm_before_residual=norm_before_residual, rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
        rms_eps=target.rms_eps, max_seq_len=target.max_seq_len, speculative_tokens=speculative_tokens,
        dtype=target.dtype,
    )


# ------------------------------------------------------------------ draft vocabulary
def token_counts(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Occurrences of every target id in a token stream -> [V] int64."""
    return np.bincount(np.asarray(stream, np.int64), minlength=vocab_size)[:vocab_size]


def draft_vocab_mapping(counts: np.ndarray, draft_vocab: int, required: Sequence[int] = ()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The ``draft_vocab`` most frequent ids (ties: the lower id; ``required`` ids always in) ->
    (d2t [draft_vocab] int64: target id = draft id + d2t[draft id], t2d [V] bool)."""
    counts = np.asarray(counts, np.int64)
    vocab = counts.shape[0]
    if not 0 < draft_vocab <= vocab:
        raise ValueError(f"draft vocabulary {draft_vocab} must be in 1..{vocab}")
    required = sorted({int(i) for i in required})
    if len(required) > draft_vocab:
        raise ValueError(f"{len(required)} required ids do not fit a draft vocabulary of {draft_vocab}")
    order = np.lexsort((np.arange(vocab), -counts))  # by count descending, then id ascending
    rest = [int(i) for i in order if i not in set(required)]
    chosen = np.sort(np.array(required + rest[: draft_vocab - len(required)], np.int64))
    t2d = np.zeros(vocab, bool)
    t2d[chosen] = True
    return chosen - np.arange(draft_vocab), t2d


def target_to_draft(d2t: np.ndarray, vocab_size: int) -> np.ndarray:
    """[V] int32: the draft id of every target id, -1 where it has none."""
    ids = np.arange(len(d2t)) + np.asarray(d2t)
    out = np.full(vocab_size, -1, np.int32)
    out[ids] = np.arange(len(d2t), dtype=np.int32)
    return out


def vocab_coverage(counts: np.ndarray, d2t: np.ndarray) -> float:
    """Share of the counted tokens that the draft vocabulary holds."""
    ids = np.arange(len(d2t)) + np.asarray(d2t)
    return float(np.asarray(counts)[ids].sum() / max(np.asarray(counts).sum(), 1))


# ------------------------------------------------------------------- target features
class TargetBatch(NamedTuple):
    tokens: np.ndarray  # [B, T] int32 windows
    features: np.ndarray | None = None  # [B, T, F] cached aux features (None: computed in the step)
    hidden: np.ndarray | None = None  # [B, T, D] cached final hidden states (after the final norm)
    mask: np.ndarray | None = None  # [B, T] bool real tokens, a prefix of each row (None: all)


def target_forward(target: Transformer, tokens: jax.Array, aux_layers: tuple[int, ...], moe_backend: str | None
                   ) -> tuple[jax.Array, jax.Array]:
    """One forward over fresh windows -> (aux features [B, T, F], final hidden [B, T, D])."""
    b, t = tokens.shape
    out = target(tokens, jnp.zeros((b,), jnp.int32), KVCache.create(target.cfg, b, t), moe_backend=moe_backend,
                 aux_layers=aux_layers)
    return out.aux_hidden, out.hidden


def output_matrix(target: Transformer) -> jax.Array:
    """The target's hidden -> logits projection [D, V]."""
    return target.embed[...].T if target.cfg.tie_embeddings else target.lm_head[...]


# ------------------------------------------------------------------ the unrolled head
def _shift(x: jax.Array, d: int) -> jax.Array:
    """x[:, q - d] at row q (zeros for q < d), along axis 1."""
    if d == 0:
        return x
    pad = jnp.zeros(x.shape[:1] + (d,) + x.shape[2:], x.dtype)
    return jnp.concatenate([pad, x[:, :-d]], axis=1)


def _ttt_attention(q: jax.Array, ks: list[jax.Array], vs: list[jax.Array]) -> jax.Array:
    """Step j = len(ks) - 1 queries [B, N, H, Dh] over step 0's keys (distance q - r >= j, causal)
    and the diagonals d = 0..j-1 holding step j - d's keys -> [B, N, H, Dh]."""
    b, n, h, dh = q.shape
    j = len(ks) - 1
    kvh = ks[0].shape[2]
    qg = q.reshape(b, n, kvh, h // kvh, dh).astype(jnp.float32) / math.sqrt(dh)
    dist = jnp.arange(n)[:, None] - jnp.arange(n)[None, :]  # [N, N] q - r
    s0 = jnp.einsum("bqkgd,brkd->bkgqr", qg, ks[0].astype(jnp.float32))
    s0 = jnp.where(dist >= j, s0, _MASK)  # [B, KV, G, N, N]
    diag_k = [_shift(ks[j - d], d).astype(jnp.float32) for d in range(j)]  # key at q - d, from step j - d
    diag_v = [_shift(vs[j - d], d).astype(jnp.float32) for d in range(j)]
    scores = s0
    if j:
        sd = jnp.stack([jnp.einsum("bqkgd,bqkd->bkgq", qg, k) for k in diag_k], axis=-1)  # [B, KV, G, N, j]
        scores = jnp.concatenate([s0, sd], axis=-1)
    p = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqr,brkd->bqkgd", p[..., :n], vs[0].astype(jnp.float32))
    for d in range(j):
        out = out + jnp.einsum("bkgq,bqkd->bqkgd", p[..., n + d], diag_v[d])
    return out.reshape(b, n, h, dh).astype(q.dtype)


def ttt_forward(head: Eagle3Head, embed: jax.Array | None, features: jax.Array, tokens: jax.Array, steps: int
                ) -> list[jax.Array]:
    """Head outputs (before the final norm) of every unrolled step -> ``steps`` x [B, N, D].

    features [B, N, F]: the target's at positions 0..N-1; tokens [B, N]: x[q + 1] at position q."""
    cfg = head.cfg
    dt = jnp.dtype(cfg.dtype)
    b, n = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (b, n))
    inv_freq = rope_inv_frequencies(cfg)
    table = head.embed[...] if cfg.own_embeddings else embed
    e = head.input_norm(jnp.take(table, tokens, axis=0).astype(dt))  # [B, N, D], the same at every step
    attn = head.attn
    h = head.fuse(features)  # [B, N, D]
    ks, vs, outs = [], [], []
    for j in range(steps):
        if j:
            h = _shift(outs[-1], 1)  # step j at q reads step j-1's output at q - 1
        h_in = head.hidden_norm(h)
        residual = h_in if cfg.norm_before_residual else h
        x = jnp.concatenate([e, h_in], axis=-1)  # [B, N, 2D]
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, attn.wq[...]), positions, inv_freq)
        ks.append(apply_rope(jnp.einsum("btd,dhk->bthk", x, attn.wk[...]), positions, inv_freq))
        vs.append(jnp.einsum("btd,dhk->bthk", x, attn.wv[...]))
        y = residual + jnp.einsum("bthk,hkd->btd", _ttt_attention(q, ks, vs), attn.wo[...])
        outs.append(y + head.mlp(head.mlp_norm(y)))
    return outs


def ttt_loss(head: Eagle3Head, embed: jax.Array | None, w_out: jax.Array, draft_ids: jax.Array,
             t2d_index: jax.Array, features: jax.Array, hidden: jax.Array, tokens: jax.Array,
             tcfg: Eagle3TrainConfig, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Windows' tokens [B, T], target features [B, T, F], final hidden [B, T, D] and real-token mask
    [B, T] (a prefix per row; None: all real) -> (loss, metrics)."""
    feats, nxt = features[:, :-1], tokens[:, 1:]  # position q: features at q, token x[q+1]
    z = jnp.einsum("btd,dv->btv", hidden[:, 1:], w_out, preferred_element_type=jnp.float32)  # [B, N, V] at q + 1
    z = jax.lax.stop_gradient(z)
    logp = jax.nn.log_softmax(jnp.take(z, draft_ids, axis=-1), axis=-1)  # [B, N, Vd] target, restricted
    p = jnp.exp(logp)
    top = jnp.take(t2d_index, jnp.argmax(z, axis=-1))  # [B, N] draft id of the target's argmax (-1: none)
    n = nxt.shape[1]
    # Position q counts while x[q+1] is real (its target distribution is then the target's at a real token).
    real = jnp.ones(nxt.shape, bool) if mask is None else jnp.asarray(mask, bool)[:, 1:]
    outs = ttt_forward(head, embed, feats, nxt, tcfg.ttt_steps)
    weights = tcfg.weights()
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for j, out in enumerate(outs):
        logq = jax.nn.log_softmax(head.logits(out), axis=-1)
        valid = ((jnp.arange(n) >= j)[None, :] & real).astype(jnp.float32)
        denom = jnp.maximum(valid.sum(), 1.0)
        ce = -jnp.sum(jnp.sum(p * logq, axis=-1) * valid) / denom
        ent = -jnp.sum(jnp.sum(p * logp, axis=-1) * valid) / denom
        acc = jnp.sum((jnp.argmax(logq, axis=-1) == top) * valid) / denom
        total = total + weights[j] * ce
        metrics[f"kl_{j}"] = ce - ent
        metrics[f"acc_{j}"] = acc
    loss = total / float(weights.sum())
    metrics["loss"] = loss
    return loss, metrics


# ------------------------------------------------------------------------ the steps
class Frozen(NamedTuple):
    """What a jitted step reads but does not train (a pytree argument, not static)."""

    target_params: Any  # the target's state
    head_buffers: Any  # the head's non-trainable state (d2t)
    draft_ids: jax.Array  # [Vd] target id of each draft id
    t2d_index: jax.Array  # [V] draft id of each target id, -1 where none


def split_head(head: Eagle3Head) -> tuple[Any, dict, Any]:
    """-> (graphdef, float32 trainable parameters as a pure dict, buffers)."""
    graphdef, params, buffers = nnx.split(head, nnx.Param, ...)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nnx.to_pure_dict(params))
    return graphdef, params, buffers


def merge_head(graphdef, params: dict, buffers) -> Eagle3Head:
    """A head over a committed copy of trained ``params`` in the head's dtype (export, the engine)."""
    head = nnx.merge(graphdef, nnx.State(params), buffers)
    dtype = jnp.dtype(head.cfg.dtype)
    g, p, rest = nnx.split(head, nnx.Param, ...)
    return nnx.merge(g, commit(jax.tree.map(lambda x: x.astype(dtype), p)), commit(rest))


def init_head_state(head: Eagle3Head, optim: OptimConfig) -> tuple[Any, Any, TrainState]:
    """-> (graphdef, buffers, train state of the head's parameters)."""
    graphdef, params, buffers = split_head(head)
    return graphdef, commit(buffers), commit(TrainState(jnp.zeros((), jnp.int32), params,
                                                        make_optimizer(optim).init(params)))


def frozen_inputs(target: Transformer, buffers, d2t: np.ndarray) -> tuple[Any, Frozen]:
    """-> (the target's graphdef, the frozen step inputs)."""
    graphdef, state = nnx.split(target)
    ids = np.arange(len(d2t)) + np.asarray(d2t)
    vocab = target.cfg.vocab_size
    return graphdef, commit(Frozen(state, buffers, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(target_to_draft(d2t, vocab))))


def _batch_loss(target_graphdef, head_graphdef, tcfg: Eagle3TrainConfig, frozen: Frozen, head_params,
                batch: TargetBatch):
    target = nnx.merge(target_graphdef, frozen.target_params)
    head = nnx.merge(head_graphdef, nnx.State(head_params), frozen.head_buffers)
    tokens = jnp.asarray(batch.tokens, jnp.int32)
    if batch.features is None:
        features, hidden = target_forward(target, tokens, head.cfg.aux_layers, tcfg.moe_backend)
    else:
        features, hidden = batch.features, batch.hidden
    features, hidden = jax.lax.stop_gradient(features), jax.lax.stop_gradient(hidden)
    embed = None if head.cfg.own_embeddings else jax.lax.stop_gradient(target.embed[...])
    return ttt_loss(head, embed, jax.lax.stop_gradient(output_matrix(target)), frozen.draft_ids, frozen.t2d_index,
                    features.astype(jnp.float32), hidden.astype(jnp.float32), tokens, tcfg, batch.mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def train_step(target_graphdef, head_graphdef, tcfg: Eagle3TrainConfig, optim: OptimConfig, frozen: Frozen,
               state: TrainState, batch: TargetBatch):
    """One AdamW step of the head; the target is frozen (no gradient reaches it)."""
    loss_fn = functools.partial(_batch_loss, target_graphdef, head_graphdef, tcfg, frozen)
    (_, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, batch), has_aux=True)(state.params)
    updates, opt_state = make_optimizer(optim).update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    metrics["lr"] = optim.schedule()(state.step)
    return TrainState(state.step + 1, params, opt_state), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_step(target_graphdef, head_graphdef, tcfg: Eagle3TrainConfig, frozen: Frozen, head_params,
               batch: TargetBatch):
    return _batch_loss(target_graphdef, head_graphdef, tcfg, frozen, head_params, batch)[1]


def evaluate(target_graphdef, head_graphdef, tcfg: Eagle3TrainConfig, frozen: Frozen, head_params,
             windows: np.ndarray, batch_size: int) -> dict[str, float]:
    """Per-step KL and argmax agreement on held-out windows [N, T] (full batches, wrapped)."""
    n = len(windows)
    sums: dict[str, float] = {}
    batches = 0
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n
        m = jax.device_get(_eval_step(target_graphdef, head_graphdef, tcfg, frozen, head_params,
                                      TargetBatch(windows[idx])))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        batches += 1
    return {f"eval_{k}": v / batches for k, v in sums.items()}


def heldout_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """Up to ``count`` evenly spaced non-overlapping windows [count, seq_len] of a held-out stream."""
    total = len(stream) // seq_len
    if total < 1:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one window of {seq_len}")
    picks = np.unique(np.linspace(0, total - 1, min(count, total)).astype(np.int64))
    return np.stack([stream[i * seq_len:(i + 1) * seq_len] for i in picks]).astype(np.int32)


# ---------------------------------------------------------------------- feature cache
class FeatureCache:
    """The target's features and final hidden states for a fixed set of training windows, on disk.

    ``DIR/tokens.npy`` [N, T] int32, ``features.npy`` [N, T, F], ``hidden.npy`` [N, T, D] (float16 or
    float32, memory-mapped), ``meta.json`` written last (a folder without it is rebuilt). The
    windows are the first N of the training windows' seeded order; batches draw from them in their
    own seeded epoch order, so a resumed run sees the same batches."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.tokens = np.load(self.dir / "tokens.npy", mmap_mode="r")
        self.features = np.load(self.dir / "features.npy", mmap_mode="r")
        self.hidden = np.load(self.dir / "hidden.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def key(target: Transformer, aux_layers: tuple[int, ...], windows: PackedWindows, count: int, dtype: str) -> dict:
        h = hashlib.sha256(windows.stream.tobytes())
        # A sample of every weight (its first rows): identifies the target without hashing all of it.
        for leaf in jax.tree.leaves(nnx.state(target, nnx.Param)):
            h.update(np.asarray(leaf[:2] if np.ndim(leaf) else leaf).tobytes())
        return {"target": target.cfg.to_dict(), "aux_layers": list(aux_layers), "seq_len": windows.seq_len,
                "seed": windows.seed, "windows": count, "dtype": dtype, "fingerprint": h.hexdigest()[:16]}

    @classmethod
    def build(cls, directory: str | os.PathLike, target: Transformer, aux_layers: tuple[int, ...],
              windows: PackedWindows, count: int | None = None, dtype: str = "float16", batch_size: int = 8,
              moe_backend: str | None = None, progress=None) -> "FeatureCache":
        """Open the cache in ``directory``, (re)computing it unless it holds exactly these windows."""
        d = Path(directory)
        count = min(count or windows.num_windows, windows.num_windows)
        key = cls.key(target, aux_layers, windows, count, dtype)
        if (d / "meta.json").exists() and json.loads((d / "meta.json").read_text()) == key:
            return cls(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / "meta.json").unlink(missing_ok=True)
        t, dm = windows.seq_len, target.cfg.d_model
        f = len(aux_layers) * dm
        tokens = np.lib.format.open_memmap(d / "tokens.npy", "w+", np.int32, (count, t))
        feats = np.lib.format.open_memmap(d / "features.npy", "w+", np.dtype(dtype), (count, t, f))
        hidden = np.lib.format.open_memmap(d / "hidden.npy", "w+", np.dtype(dtype), (count, t, dm))
        graphdef, params = nnx.split(target)
        fwd = jax.jit(lambda p, x: target_forward(nnx.merge(graphdef, p), x, tuple(aux_layers), moe_backend))
        for i in range(0, count, batch_size):
            rows = min(batch_size, count - i)
            x = windows.batch(i, batch_size).inputs  # full batches: one compile; extra rows dropped
            a, h = jax.device_get(fwd(params, x))
            tokens[i:i + rows], feats[i:i + rows], hidden[i:i + rows] = x[:rows], a[:rows], h[:rows]
            if progress is not None:
                progress(rows)
        for m in (tokens, feats, hidden):
            m.flush()
        del tokens, feats, hidden
        (d / "meta.json").write_text(json.dumps(key))
        return cls(d)

    def batch(self, position: int, batch_size: int, seed: int) -> TargetBatch:
        idx = epoch_order(len(self), position, batch_size, seed)
        return TargetBatch(np.asarray(self.tokens[idx]), np.asarray(self.features[idx]), np.asarray(self.hidden[idx]))


def new_head(target: Transformer, head_cfg: Eagle3Config, d2t: np.ndarray, seed: int = 0) -> Eagle3Head:
    """A fresh head for ``target`` with the chosen draft vocabulary."""
    from jaxspec.checkpoint.eagle3_io import check_head_for_target

    check_head_for_target(head_cfg, target.cfg)
    return create_head(head_cfg, seed, d2t)
