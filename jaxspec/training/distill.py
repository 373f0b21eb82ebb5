"""Draft distillation: prompts, target continuations, and the jitted distillation step.

Data: prompts (from a file or cut from corpus documents at line starts) are
continued by the target through the engine — a ``sampled_fraction`` of them
sampled at ``temperature``, the rest greedy, so the draft sees both the target's
typical and its most likely text. Each example is prompt + continuation,
right-padded to a fixed length with a mask.

Loss: at every real position the target's full next-token distribution p
(computed in the same jitted step, no gradient) against the draft's q:
forward KL, total variation, or their sum (``jaxspec.training.losses``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.models import Transformer
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import Tokenizer
from jaxspec.training.acceptance import engine_max_len
from jaxspec.training.corpus import Document
from jaxspec.training.data import Batch, epoch_order
from jaxspec.training.lm import LMLossConfig, forward_train
from jaxspec.training.losses import distill_divergences, distill_objective
from jaxspec.training.state import OptimConfig, TrainState, make_optimizer


# ------------------------------------------------------------------------- prompts
def corpus_prompts(
    documents: Sequence[Document], tokenizer: Tokenizer, count: int, prompt_tokens: int, seed: int
) -> list[list[int]]:
    """``count`` prompts of up to ``prompt_tokens`` tokens (bos included), each starting at a
    random line of a random document (documents drawn in proportion to their length)."""
    docs = [d for d in documents if d.text.strip()]
    if not docs:
        raise ValueError("no non-empty documents to cut prompts from")
    rng = random.Random(seed)
    weights = [len(d.text) for d in docs]
    prompts = []
    # ~4 characters per token is generous for code; the encode is truncated to prompt_tokens anyway.
    span = 8 * prompt_tokens
    while len(prompts) < count:
        doc = rng.choices(docs, weights)[0]
        line_starts = [0] + [i + 1 for i, ch in enumerate(doc.text) if ch == "\n" and i + 1 < len(doc.text)]
        start = rng.choice(line_starts)
        ids = tokenizer.encode(doc.text[start : start + span], add_bos=True)[:prompt_tokens]
        if len(ids) >= 2:
            prompts.append(ids)
    return prompts


def file_prompts(path: str | os.PathLike, tokenizer: Tokenizer, prompt_tokens: int) -> list[list[int]]:
    """Prompts from a text file (one per line; ``\\n`` escapes allowed) or a JSONL file with a
    "prompt" or "text" field."""
    p = Path(path)
    texts = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            obj = json.loads(line)
            texts.append(obj.get("prompt", obj.get("text")))
        else:
            texts.append(line.replace("\\n", "\n"))
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError(f"{p}: expected non-empty prompts (text lines, or JSONL with 'prompt'/'text')")
    return [tokenizer.encode(t, add_bos=True)[:prompt_tokens] for t in texts]


# --------------------------------------------------------------------------- data
class DistillData(NamedTuple):
    tokens: np.ndarray  # [N, T] int32, right-padded
    lengths: np.ndarray  # [N] real tokens per row
    prompt_lengths: np.ndarray  # [N] tokens of each row that are the prompt
    sampled: np.ndarray  # [N] bool: continuation sampled (else greedy)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **self._asdict())

    @classmethod
    def load(cls, path: Path) -> "DistillData":
        with np.load(path) as z:
            return cls(*(z[f] for f in cls._fields))

    def prompts(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.prompt_lengths)]

    def digest(self) -> str:
        """Identifies the generated data (a resumed run must train on the same sequences)."""
        return hashlib.sha256(self.tokens.tobytes() + self.lengths.tobytes()).hexdigest()[:16]

    def batch(self, position: int, batch_size: int, seed: int) -> Batch:
        idx = epoch_order(len(self.lengths), position, batch_size, seed)
        tokens = self.tokens[idx]
        mask = np.arange(tokens.shape[1])[None, :] < self.lengths[idx][:, None]
        return Batch(tokens, tokens, mask)  # targets unused: the target model supplies the distributions


def generate_continuations(
    target: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    sampled_fraction: float = 0.5,
    temperature: float = 1.0,
    seed: int = 0,
    num_slots: int = 8,
    pad_id: int = 0,
    max_len: int | None = None,
) -> DistillData:
    """Continue every prompt with the target (continuous batching over ``num_slots``; rows
    padded to ``max_len``, by default the longest prompt + ``new_tokens``)."""
    max_len = engine_max_len(prompts, new_tokens, target, max_len=max_len)
    engine = Engine(PlainRunner(ModelRunner(target, num_slots, max_len)), tokenizer)
    rng = random.Random(seed)
    sampled = np.array([rng.random() < sampled_fraction for _ in prompts], bool)
    params = [
        SamplingParams(temperature=temperature, seed=seed * 1_000_003 + i, max_tokens=new_tokens) if s
        else SamplingParams(temperature=0.0, max_tokens=new_tokens)
        for i, s in enumerate(sampled)
    ]
    completions = engine.generate([list(p) for p in prompts], params)
    tokens = np.full((len(prompts), max_len), pad_id, np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c.token_ids)
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
    prompt_lengths = np.array([len(p) for p in prompts], np.int32)
    return DistillData(tokens, lengths, prompt_lengths, sampled)


# --------------------------------------------------------------------------- step
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(6,))
def distill_step(target_graphdef, draft_graphdef, optim: OptimConfig, loss_kind: str, moe_backend: str | None,
                 target_params, state: TrainState, batch: Batch):
    lc = LMLossConfig(moe_backend=moe_backend)
    target_out, _ = forward_train(nnx.merge(target_graphdef, target_params), batch.inputs, lc, False)
    p_logits = jax.lax.stop_gradient(target_out.logits)

    def loss_fn(params):
        q_out, _ = forward_train(nnx.merge(draft_graphdef, params), batch.inputs, lc, False)
        div = distill_divergences(p_logits, q_out.logits, batch.mask)
        return distill_objective(div, loss_kind), div

    (loss, div), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(optim).update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = {"loss": loss, **div, "lr": optim.schedule()(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eval_divergences(target_graphdef, draft_graphdef, moe_backend, target_params, draft_params, batch: Batch):
    lc = LMLossConfig(moe_backend=moe_backend)
    p, _ = forward_train(nnx.merge(target_graphdef, target_params), batch.inputs, lc, False)
    q, _ = forward_train(nnx.merge(draft_graphdef, draft_params), batch.inputs, lc, False)
    return distill_divergences(p.logits, q.logits, batch.mask)


def evaluate_divergences(target_graphdef, draft_graphdef, moe_backend, target_params, draft_params,
                         data: DistillData, batch_size: int) -> dict[str, float]:
    """KL / TV / argmax agreement of the draft on held-out sequences (mask-weighted means)."""
    totals: dict[str, float] = {}
    weight = 0.0
    n = len(data.lengths)
    for i in range(0, n, batch_size):
        idx = np.arange(i, i + batch_size) % n  # wrap to a full batch (one compile); weights fix the repeats
        real = np.arange(i, i + batch_size) < n
        tokens = data.tokens[idx]
        mask = (np.arange(tokens.shape[1])[None, :] < data.lengths[idx][:, None]) & real[:, None]
        w = float(mask.sum())
        div = jax.device_get(_eval_divergences(target_graphdef, draft_graphdef, moe_backend, target_params,
                                               draft_params, Batch(tokens, tokens, mask)))
        for k, v in div.items():
            totals[k] = totals.get(k, 0.0) + float(v) * w
        weight += w
    return {f"eval_{k}": v / weight for k, v in totals.items()}
