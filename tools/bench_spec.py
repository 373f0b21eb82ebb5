"""Speculative decoding throughput: plain vs fixed k vs adaptive, by batch size, in one run.

For each batch size B an engine with B slots generates B requests (random prompts,
greedy by default) with plain decoding, with every fixed k, and with adaptive k;
each configuration runs once untimed (compiling its shapes) and then timed.
Decode throughput counts the tokens generated after the step that admitted (and
prefilled) the batch, over the wall time of the remaining steps.

    python tools/bench_spec.py                                  # small-moe + small-draft
    python tools/bench_spec.py --draft-is-target-copy 0.1       # a noisy copy of the target as draft
    python tools/bench_spec.py --spec-method ngram --batch-sizes 1 4 --ks 2 4

Random weights make acceptance meaningless: an unrelated random draft (the
default small-draft) agrees with the target about as often as chance, so
speculation cannot pay and adaptive k should switch itself off; a noisy copy
accepts as often as its noise allows, and costs as much as the target. The
built-in trained target/draft pairs (a later issue) are the real benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jaxspec.engine import Engine, ModelRunner, PlainRunner
from jaxspec.loading import load_any
from jaxspec.sampling import SamplingParams
from jaxspec.speculative import SpeculativeRunner, make_proposer, perturbed_copy
from jaxspec.speculative.adaptive import expected_experts_touched


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small-moe", help="target: config name, orbax dir or HF folder")
    p.add_argument("--draft", default="small-draft", help="draft model (same vocabulary as the target)")
    p.add_argument("--draft-is-target-copy", type=float, default=None, metavar="NOISE",
                   help="use the target with every weight perturbed by NOISE * std as the draft")
    p.add_argument("--spec-method", default="draft", choices=["draft", "ngram"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--no-adaptive", action="store_true", help="skip the adaptive-k row")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--moe-backend", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def run_once(runner, tokenizer, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Generate every prompt at once; returns decode throughput and speculation counters."""
    engine = Engine(runner, tokenizer, max_waiting=len(prompts))
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # admits and prefills the whole batch (and decodes once)
    tokens_before = sum(len(live.tracker.token_ids) for live in engine.live.values())
    done_tokens = 0
    t = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done_tokens += out.num_generated_tokens
    elapsed = time.perf_counter() - t
    row = {"tokens": done_tokens - tokens_before, "seconds": elapsed,
           "tok_s": (done_tokens - tokens_before) / elapsed if elapsed else 0.0}
    stats = engine.spec_stats
    if stats is not None:
        steps = max(stats.num_steps, 1)
        row.update(acceptance=stats.acceptance_rate, mean_acc_len=stats.mean_acceptance_length,
                   draft_ms=1e3 * stats.draft_time_s / steps, verify_ms=1e3 * stats.verify_time_s / steps)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target, tokenizer = load_any(args.model)
    if args.draft_is_target_copy is not None:
        draft, draft_name = perturbed_copy(target, args.draft_is_target_copy, seed=args.seed + 1), \
            f"target copy (noise {args.draft_is_target_copy})"
    elif args.spec_method == "draft":
        draft, _ = load_any(args.draft, seed=args.seed + 1)
        draft_name = args.draft
    else:
        draft, draft_name = None, "n-gram lookup"
    cfg = target.cfg
    rng = np.random.default_rng(args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    max_len = args.prompt_len + args.max_tokens + 16
    k_max = max(args.ks)
    configs = [("plain", None)] + [("k", k) for k in args.ks] + ([] if args.no_adaptive else [("auto", "auto")])
    print(f"target {cfg.name} ({cfg.num_experts} experts, top-{cfg.num_experts_per_tok}), draft: {draft_name}, "
          f"prompt {args.prompt_len}, {args.max_tokens} new tokens, temperature {args.temperature}", flush=True)
    rows = []
    for batch in args.batch_sizes:
        prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
        base = None
        for name, k in configs:
            def make():
                tr = ModelRunner(target, batch, max_len, moe_backend=args.moe_backend)
                if k is None:
                    return PlainRunner(tr)
                return SpeculativeRunner(tr, make_proposer(args.spec_method, draft, args.moe_backend),
                                         num_speculative_tokens=k, k_max=k_max)
            run_once(make(), tokenizer, prompts, params)  # compile every shape this configuration uses
            runner = make()
            if k == "auto":
                runner.cost_model = runner.measure_costs(reps=3)
            row = {"batch": batch, "method": name if k is None else args.spec_method, "k": k or 0,
                   **run_once(runner, tokenizer, prompts, params)}
            base = row["tok_s"] if k is None else base
            row["speedup"] = row["tok_s"] / base
            if k == "auto":
                row["buckets"] = {int(kb): n for kb, n in sorted(runner.bucket_steps.items())}
            if cfg.is_moe and k is not None:
                kk = k if k != "auto" else k_max
                row["experts_touched"] = expected_experts_touched(batch * (kk + 1), cfg.num_experts,
                                                                  cfg.num_experts_per_tok)
            rows.append(row)
            print(_format(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _format(r: dict) -> str:
    spec = r.get("acceptance") is not None
    k = r["k"]
    cols = [f"B={r['batch']:<3d}", f"{r['method']:<6s}", f"k={str(k):<4s}", f"{r['tok_s']:8.1f} tok/s",
            f"x{r['speedup']:.2f}"]
    if spec:
        cols += [f"acc {r['acceptance']:.2f}", f"len {r['mean_acc_len']:.2f}",
                 f"draft {r['draft_ms']:6.1f} ms", f"verify {r['verify_ms']:6.1f} ms"]
    if "buckets" in r:
        cols.append(f"kb steps {r['buckets']}")
    return " | ".join(cols)


if __name__ == "__main__":
    sys.exit(main())
