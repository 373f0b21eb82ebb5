"""Speculative figures of a drafter for a target, through the real engine: acceptance per position
for several k, and drafting cost per token. Works for an EAGLE-3 head ("eagle3") and a draft
model ("draft") alike, so the two are measured the same way.

Acceptance: greedy requests through ``Engine`` over ``make_runner(..., num_speculative_tokens=k)``,
k fixed; ``acceptance_per_position[i]`` = P(draft i accepted | drafted), ``mean_acceptance_length``
= tokens emitted per verification step.

Drafting cost: the proposer's own ``measure`` (median wall time of one jitted proposal of k
tokens at batch 1, after a warm call) divided by k. An EAGLE-3 head also absorbs the verified
positions after every step (one head forward over k + 1 positions): ``absorb_ms`` times it, and
``ms_per_token_with_absorb`` adds it to the proposal's time per drafted token.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax

from jaxspec.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.models import Transformer
from jaxspec.sampling import SamplingParams
from jaxspec.tokenizer import Tokenizer


def acceptance_sweep(target: Transformer, method: str, draft, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 2, 3, 4, 5, 6), max_tokens: int = 128, num_slots: int = 8,
                     max_len: int | None = None) -> dict[int, dict]:
    """Greedy speculative decoding of every prompt at each k -> {k: figures}."""
    need = max(len(p) for p in prompts) + max_tokens
    max_len = max(max_len or need, need)
    out = {}
    for k in ks:
        runner = make_runner(target, num_slots=num_slots, max_len=max_len, spec_method=method, draft=draft,
                             num_speculative_tokens=k, k_max=k)
        engine = Engine(runner, tokenizer)
        t = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        completions = engine.generate([list(p) for p in prompts], params)
        stats = engine.spec_stats
        out[k] = {
            "k": k, "prompts": len(prompts), "generated_tokens": sum(len(c.token_ids) for c in completions),
            "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length,
            "acceptance_per_position": stats.acceptance_per_position, "verify_steps": stats.num_drafts,
            "seconds": time.perf_counter() - t,
        }
    return out


def drafting_cost(target: Transformer, method: str, draft, k: int = 4, reps: int = 50, max_len: int = 256) -> dict:
    """Milliseconds per drafted token at batch 1 (see the module docstring)."""
    runner = make_runner(target, num_slots=1, max_len=max_len, spec_method=method, draft=draft,
                         num_speculative_tokens=k, k_max=k)
    prop = runner.proposer
    total = prop.measure(k, reps, rows=1)
    out = {"method": method, "k": k, "reps": reps, "proposal_ms": 1000 * total, "ms_per_token": 1000 * total / k}
    if method == "eagle3":
        absorb = _absorb_ms(prop, k + 1, reps)
        out["absorb_ms"] = absorb
        out["ms_per_token_with_absorb"] = (1000 * total + absorb) / k
    return out


def _absorb_ms(prop, width: int, reps: int) -> float:
    prop._dummy_absorb(1, width)  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        prop._dummy_absorb(1, width)
        jax.block_until_ready(prop.last)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def format_table(rows: dict[str, dict[int, dict]]) -> str:
    """Markdown table: per drafter and k, mean acceptance length and acceptance per position."""
    lines = ["| drafter | k | mean acceptance length | acceptance rate | acceptance per position |",
             "|---|---|---|---|---|"]
    for name, sweep in rows.items():
        for k, r in sorted(sweep.items()):
            per = ", ".join(f"{a:.2f}" for a in r["acceptance_per_position"])
            lines.append(f"| {name} | {k} | {r['mean_acceptance_length']:.2f} | {r['acceptance_rate']:.3f} | {per} |")
    return "\n".join(lines)



def batch1_throughput(target: Transformer, drafters: dict[str, tuple[str, object]], tokenizer: Tokenizer,
                      prompts: Sequence[Sequence[int]], k: int = 4, max_tokens: int = 128) -> dict[str, dict]:
    """End-to-end greedy tokens/s at batch 1 (one slot, prefill included, k fixed) of plain decoding
    and of each drafter ({name: (method, draft)}), every engine compiled by two untimed passes first
    (as ``jaxspec.training.acceptance.decode_throughput`` does), then timed in turns so a change
    in machine load falls on all of them alike."""
    max_len = max(len(p) for p in prompts) + max_tokens
    engines = {"plain": Engine(make_runner(target, num_slots=1, max_len=max_len), tokenizer)}
    for name, (method, draft) in drafters.items():
        engines[name] = Engine(make_runner(target, num_slots=1, max_len=max_len, spec_method=method, draft=draft,
                                           num_speculative_tokens=k, k_max=k), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    for engine in engines.values():
        for _ in range(2):
            engine.generate([list(p) for p in prompts], params)
    seconds = {name: [] for name in engines}
    tokens = {}
    for _ in range(3):
        for name, engine in engines.items():
            t = time.perf_counter()
            out = engine.generate([list(p) for p in prompts], params)
            seconds[name].append(time.perf_counter() - t)
            tokens[name] = sum(len(c.token_ids) for c in out)
    result = {name: {"tokens": tokens[name], "tokens_per_s": tokens[name] / statistics.median(s)}
              for name, s in seconds.items()}
    for name in drafters:
        result[name]["speedup"] = result[name]["tokens_per_s"] / result["plain"]["tokens_per_s"]
    return result
