"""Speculative figures of a drafter for a target, through the real engine: acceptance per position
for several k, and drafting cost per token. Works for an EAGLE-3 head ("eagle3") and a draft
model ("draft") alike, so the two are measured the same way.

Acceptance: greedy requests through ``Engine`` over ``make_runner(..., num_speculative_tokens=k)``,
k fixed; ``acceptance_per_position[i]`` = P(draft i accepted | drafted), ``mean_acceptance_length``
= tokens emitted per verification step.

Drafting cost: median wall time of one jitted proposal of k tokens at batch 1 (what the
proposer's ``measure`` times; after warm calls, every drafter and call timed in turns) divided
by k. An EAGLE-3 head also absorbs the verified positions after every step (one head forward
over k + 1 positions): ``absorb_ms`` times it, and
``ms_per_token_with_absorb`` adds it to the proposal's time per drafted token. In the runner's
fused step the round and the absorb run inside the verification's call: ``step_ms`` times the
two as one jitted call (what the head adds to a step, with one dispatch), ``ms_per_token_step``
per drafted token.
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
    return drafting_costs(target, {method: (method, draft)}, k, reps, max_len)[method]


def drafting_costs(target: Transformer, drafters: dict[str, tuple[str, object]], k: int = 4, reps: int = 50,
                   max_len: int = 256) -> dict[str, dict]:
    """``drafting_cost`` of every drafter ({name: (method, draft)}), all timed in turns (one rep of
    each, then the next), so a change in machine load falls on all of them alike."""
    timers: dict[tuple[str, str], object] = {}
    for name, (method, draft) in drafters.items():
        runner = make_runner(target, num_slots=1, max_len=max_len, spec_method=method, draft=draft,
                             num_speculative_tokens=k, k_max=k)
        prop = runner.proposer
        timers[name, "proposal"] = lambda prop=prop: prop._run_dummy(k, 1)
        if method == "eagle3":
            timers[name, "absorb"] = lambda prop=prop: (prop._dummy_absorb(1, k + 1), jax.block_until_ready(prop.last))
            timers[name, "step"] = _round_and_absorb(prop, k)
    for fn in timers.values():  # compile / warm
        fn()
        fn()
    times: dict = {key: [] for key in timers}
    for _ in range(reps):
        for key, fn in timers.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    ms = {key: 1000 * statistics.median(v) for key, v in times.items()}
    out = {}
    for name, (method, _) in drafters.items():
        total = ms[name, "proposal"]
        out[name] = {"method": method, "k": k, "reps": reps, "proposal_ms": total, "ms_per_token": total / k}
        if method == "eagle3":
            out[name].update(absorb_ms=ms[name, "absorb"], ms_per_token_with_absorb=(total + ms[name, "absorb"]) / k,
                             step_ms=ms[name, "step"], ms_per_token_step=ms[name, "step"] / k)
    return out


def _round_and_absorb(prop, k: int):
    """The head's round of k and its absorb of k + 1 positions as one jitted call over one padding
    row (every write dropped), at the longest span like ``measure``: the head's share of a fused
    step -> a function running it once."""
    import jax.numpy as jnp
    import numpy as np

    from jaxspec.sampling import BatchSampling

    kv_len = prop.kv_buckets[-1]
    round_, absorb = prop.round_fns(k, kv_len)

    def both(state, embed, cache, last, slot_ids, start, sampling, out_pos, tokens, feats):
        cache, drafts, q = round_(state, embed, cache, last, slot_ids, start, sampling, out_pos)
        cache, last = absorb(state, embed, cache, last, slot_ids, tokens, feats, start, jnp.ones_like(start))
        return cache, last, drafts, q

    fn = jax.jit(both, donate_argnums=(2, 3))
    sampling = BatchSampling(np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32),
                             np.zeros(1, np.float32), np.zeros((1, 2), np.uint32))
    feats = jax.device_put(jnp.zeros((1, k + 1, prop.cfg.feature_size), prop.feature_dtype), jax.devices()[0])
    pad, far = np.full(1, prop.num_slots, np.int32), np.full(1, prop.max_len, np.int32)
    tokens, zero = np.zeros((1, k + 1), np.int32), np.zeros(1, np.int32)

    def run():
        prop.cache, prop.last, drafts, _ = fn(prop.state, prop.embed, prop.cache, prop.last, pad, far, sampling, zero,
                                              tokens, feats)
        drafts.block_until_ready()

    return run


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
