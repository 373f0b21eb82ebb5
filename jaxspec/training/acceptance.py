"""Speculative-decoding figures of a target/draft pair, measured through the real engine.

Acceptance runs ``SpeculativeRunner`` (draft-model proposer, fixed k) under the
``Engine`` with greedy requests, so the numbers are exactly what serving sees:
``acceptance_rate`` = accepted / drafted tokens, ``mean_acceptance_length`` =
tokens emitted per verification step (accepted drafts + the target's own token).
Throughput compares plain and speculative decoding end to end at batch 1.
"""

from __future__ import annotations

import time
from typing import Sequence

from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.models import Transformer
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner
from jaxspec.tokenizer import Tokenizer


def _max_len(prompts: Sequence[Sequence[int]], max_tokens: int, *models: Transformer) -> int:
    need = max(len(p) for p in prompts) + max_tokens
    cap = min(m.cfg.max_seq_len for m in models)
    if need > cap:
        raise ValueError(f"prompt + {max_tokens} new tokens needs {need} positions; the models hold {cap}")
    return need


def speculative_engine(target: Transformer, draft: Transformer, tokenizer: Tokenizer, k: int, num_slots: int,
                       max_len: int) -> Engine:
    runner = SpeculativeRunner(ModelRunner(target, num_slots, max_len), DraftModelProposer(draft),
                               num_speculative_tokens=k, k_max=k)
    return Engine(runner, tokenizer)


def measure_acceptance(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    k: int = 4,
    max_tokens: int = 64,
    num_slots: int = 8,
) -> dict:
    """Greedy speculative decoding of every prompt; the engine's aggregate speculation counters."""
    max_len = _max_len(prompts, max_tokens, target, draft)
    engine = speculative_engine(target, draft, tokenizer, k, min(num_slots, len(prompts)), max_len)
    t = time.perf_counter()
    completions = engine.generate([list(p) for p in prompts], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    stats = engine.spec_stats
    return {
        "k": k,
        "prompts": len(prompts),
        "generated_tokens": sum(len(c.token_ids) for c in completions),
        "acceptance_rate": stats.acceptance_rate,
        "mean_acceptance_length": stats.mean_acceptance_length,
        "acceptance_per_position": stats.acceptance_per_position,
        "verify_steps": stats.num_drafts,
        "seconds": time.perf_counter() - t,
    }


def _timed_generate(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int) -> tuple[int, float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t = time.perf_counter()
    completions = engine.generate([list(p) for p in prompts], params)
    return sum(len(c.token_ids) for c in completions), time.perf_counter() - t


def decode_throughput(
    target: Transformer,
    draft: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    k: int = 4,
    max_tokens: int = 128,
) -> dict:
    """End-to-end greedy tokens/s at batch 1 (one slot; prefill included), plain vs speculative.

    Each engine first generates the same prompts once untimed, so every shape the timed
    pass needs is compiled and the timed pass measures decoding only."""
    max_len = _max_len(prompts, max_tokens, target, draft)
    plain = Engine(PlainRunner(ModelRunner(target, 1, max_len)), tokenizer)
    spec = speculative_engine(target, draft, tokenizer, k, 1, max_len)
    out = {"k": k, "prompts": len(prompts), "max_tokens": max_tokens}
    for name, engine in (("plain", plain), ("speculative", spec)):
        _timed_generate(engine, prompts, max_tokens)  # compile
        tokens, seconds = _timed_generate(engine, prompts, max_tokens)
        out[f"{name}_tokens"] = tokens
        out[f"{name}_tokens_per_s"] = tokens / seconds
    out["speedup"] = out["speculative_tokens_per_s"] / out["plain_tokens_per_s"]
    return out
