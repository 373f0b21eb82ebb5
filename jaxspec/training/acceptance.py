"""Speculative-decoding figures of a target/draft pair, measured through the real engine.

Acceptance runs ``SpeculativeRunner`` (draft-model proposer, fixed k) under the
``Engine`` with greedy requests, so the numbers are exactly what serving sees:
``acceptance_rate`` = accepted / drafted tokens, ``mean_acceptance_length`` =
tokens emitted per verification step (accepted drafts + the target's own token).
Throughput compares plain and speculative decoding end to end at batch 1.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import numpy as np

from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.engine.slots import SlotTable
from jaxspec.models import Transformer
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import DraftModelProposer, SpeculativeRunner
from jaxspec.tokenizer import Tokenizer


def engine_max_len(prompts: Sequence[Sequence[int]], max_tokens: int, *models: Transformer,
                   max_len: int | None = None) -> int:
    """The cache length an engine needs for ``prompts`` (or ``max_len`` when given: callers pass
    one fixed length to every engine so their compiled steps are shared)."""
    need = max(len(p) for p in prompts) + max_tokens
    cap = min(m.cfg.max_seq_len for m in models)
    if need > cap:
        raise ValueError(f"prompt + {max_tokens} new tokens needs {need} positions; the models hold {cap}")
    if max_len is not None:
        if max_len < need:
            raise ValueError(f"max_len {max_len} < the {need} positions these prompts need")
        return min(max_len, cap)
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
    max_len: int | None = None,
) -> dict:
    """Greedy speculative decoding of every prompt; the engine's aggregate speculation counters."""
    max_len = engine_max_len(prompts, max_tokens, target, draft, max_len=max_len)
    engine = speculative_engine(target, draft, tokenizer, k, num_slots, max_len)
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
    """End-to-end greedy tokens/s at batch 1 (one slot; prefill included): plain, speculative with
    k fixed, and speculative with adaptive k (serving's default; ``adaptive_steps_per_k`` says which
    proposal lengths it chose, 0 being a plain decode step).

    Each engine first generates the same prompts twice untimed, so every shape the timed
    pass needs is compiled and the timed pass measures decoding only. (Twice: a fresh
    runner's cache starts uncommitted to a device and becomes committed after its first
    donated step, and jit compiles the prefill again for the committed layout.)"""
    max_len = engine_max_len(prompts, max_tokens, target, draft)
    plain = Engine(PlainRunner(ModelRunner(target, 1, max_len)), tokenizer)
    spec = speculative_engine(target, draft, tokenizer, k, 1, max_len)
    # Serving's default: k chosen per step from measured costs and acceptance (0 = plain decoding).
    auto = Engine(SpeculativeRunner(ModelRunner(target, 1, max_len), DraftModelProposer(draft),
                                    num_speculative_tokens="auto", k_max=2 * k), tokenizer)
    out = {"k": k, "prompts": len(prompts), "max_tokens": max_tokens}
    for name, engine in (("plain", plain), ("speculative", spec), ("adaptive", auto)):
        engine.runner.warmup()  # as serving does at start-up (adaptive k measures its costs here)
        for _ in range(2):
            _timed_generate(engine, prompts, max_tokens)  # compile (see above)
        stats = engine.spec_stats
        before = (stats.num_steps, stats.draft_time_s, stats.verify_time_s) if stats is not None else None
        steps_before = dict(getattr(engine.runner, "bucket_steps", {}))
        tokens, seconds = _timed_generate(engine, prompts, max_tokens)
        out[f"{name}_tokens"] = tokens
        out[f"{name}_tokens_per_s"] = tokens / seconds
        if name == "adaptive":  # decode steps of the timed pass per proposal length k chosen
            out["adaptive_steps_per_k"] = {int(kb): int(n - steps_before.get(kb, 0))
                                           for kb, n in sorted(engine.runner.bucket_steps.items())
                                           if n > steps_before.get(kb, 0)}
            continue
        if stats is not None:  # where a speculative step's time goes (the engine's own counters)
            steps = stats.num_steps - before[0]
            out["speculative_steps"] = steps
            out["draft_ms_per_step"] = 1000 * (stats.draft_time_s - before[1]) / max(steps, 1)
            out["verify_ms_per_step"] = 1000 * (stats.verify_time_s - before[2]) / max(steps, 1)
            out["step_ms"] = 1000 * seconds / max(steps, 1)
    out["speedup"] = out["speculative_tokens_per_s"] / out["plain_tokens_per_s"]
    out["adaptive_speedup"] = out["adaptive_tokens_per_s"] / out["plain_tokens_per_s"]
    return out


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def forward_costs(target: Transformer, draft: Transformer, prompts: Sequence[Sequence[int]], k: int = 4,
                  reps: int = 30) -> dict:
    """Where a speculative step's model time goes, at batch 1: median ms of one jitted forward of
    the target over 1 and over k+1 tokens and of the draft over 1 token (cache at position 64),
    and how many distinct experts per MoE layer the target routes k+1 consecutive held-out tokens
    to (after their prompt's context; 1 token uses ``num_experts_per_tok``)."""
    out: dict = {"k": k, "reps": reps}
    for name, model, sizes in (("target", target, (1, k + 1)), ("draft", draft, (1,))):
        runner = ModelRunner(model, 1, 64 + k + 1)
        fwd = jax.jit(runner.forward_fn(), donate_argnums=(3,))
        for t in sizes:
            tokens, start = np.full((1, t), 3, np.int32), np.array([64], np.int32)

            def step():
                out_ = fwd(runner.state, tokens, start, runner.cache)
                runner.cache = out_.cache
                return out_.logits

            step()  # compile
            out[f"{name}_ms_{t}"] = _median_ms(step, reps)
    cfg = target.cfg
    if cfg.is_moe:
        runner = ModelRunner(target, 1, max(len(p) for p in prompts) + 1)
        fwd = jax.jit(runner.forward_fn())
        moe = [i for i in range(cfg.num_layers) if cfg.layer_is_moe(i)]
        touched = []
        for p in prompts:
            if len(p) <= k + 1:
                continue
            context, block = list(p[: -(k + 1)]), np.asarray([p[-(k + 1):]], np.int32)
            runner.prefill(0, context, SlotTable(1))
            load = np.asarray(fwd(runner.state, block, np.array([len(context)], np.int32), runner.cache).expert_load)
            touched.append(float(np.mean((load[moe] > 0).sum(axis=1))))
        out["experts_per_layer"] = cfg.num_experts
        out["experts_touched_1"] = cfg.num_experts_per_tok
        out[f"experts_touched_{k + 1}"] = float(np.mean(touched)) if touched else None
    return out
