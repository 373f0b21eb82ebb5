"""In-process A/B of a speculative engine against plain decoding over the same target runner.

Two server processes started minutes apart differ by up to ±30% on a shared 2-core machine, more
than the effects being measured. Here both engines live in one process and share one target
``ModelRunner`` (the same compiled steps, KV cache and MoE dispatch table); rounds alternate between
them, so drift hits both alike. Prints tokens/s per round and overall, the ratio, and whether the
greedy outputs matched.

    python tools/ab_engine.py --concurrency 1 4 --rounds 4 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def drive(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[float, int, dict]:
    """Run the prompts keeping ``concurrency`` in flight; (seconds, output tokens, id -> token ids)."""
    from jaxspec.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    pending = list(enumerate(prompts))
    outs: dict[int, list[int]] = {}
    ids: dict[str, int] = {}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and engine.num_running + engine.num_waiting < concurrency:
            i, p = pending.pop(0)
            ids[engine.add_request(p, params)] = i
        for out in engine.step():
            outs.setdefault(ids[out.request_id], []).extend(out.new_token_ids)
    seconds = time.perf_counter() - t0
    return seconds, sum(map(len, outs.values())), outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin")
    p.add_argument("--draft", default="builtin")
    p.add_argument("--k", default="auto", help="speculative tokens per step, or auto (adaptive up to --k-max)")
    p.add_argument("--k-max", type=int, default=4)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--moe-dispatch", default="measured")
    p.add_argument("--decode-steps", type=int, default=4, help="plain decode steps per call, as serve's default")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile each engine's timed rounds (cProfile) and print its N costliest functions "
                   "by own time (profiling slows both; the ratio is then not the served one)")
    args = p.parse_args(argv)

    from jaxspec import compilation_cache
    from jaxspec.bench.workloads import make_workload
    from jaxspec.engine.engine import Engine
    from jaxspec.engine.factory import make_runner
    from jaxspec.engine.runner import PlainRunner
    from jaxspec.loading import load_any

    compilation_cache.enable()  # as the server: compiled steps and the measured dispatch table are kept
    model, tok = load_any(args.model)
    draft = load_any(args.draft, role="draft")[0]
    k = args.k if args.k == "auto" else int(args.k)
    spec_runner = make_runner(model, num_slots=args.slots, spec_method="draft", draft=draft,
                              num_speculative_tokens=k, k_max=args.k_max, moe_dispatch=args.moe_dispatch,
                              decode_steps=args.decode_steps)
    spec_runner.warmup()
    plain_runner = PlainRunner(spec_runner.target)  # the same ModelRunner: same executables and cache
    engines = {"plain": Engine(plain_runner, tok, overlap=True), "spec": Engine(spec_runner, tok, overlap=True)}
    prompts = [list(r.prompt) for r in make_workload("code", tok, args.requests, args.max_tokens, args.seed,
                                                    warmup=0).requests]
    results = []
    profiles = {name: cProfile.Profile() for name in engines} if args.profile else {}
    for conc in args.concurrency:
        for engine in engines.values():  # one untimed pass each: first uses of batch buckets
            drive(engine, prompts[:max(conc, 2)], args.max_tokens, conc)
        totals = {name: [0.0, 0] for name in engines}
        steps_before = dict(spec_runner.bucket_steps)
        same = True
        for r in range(args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            outs = {}
            for name in order:
                if profiles:
                    profiles[name].enable()
                s, n, outs[name] = drive(engines[name], prompts, args.max_tokens, conc)
                if profiles:
                    profiles[name].disable()
                totals[name][0] += s
                totals[name][1] += n
                print(f"c{conc} round {r} {name:5s} {n / s:8.1f} tok/s", flush=True)
            same &= outs["plain"] == outs["spec"]
        rate = {name: n / s for name, (s, n) in totals.items()}
        steps = {kb: n - steps_before.get(kb, 0) for kb, n in sorted(spec_runner.bucket_steps.items())}
        row = {"concurrency": conc, "plain_tok_s": rate["plain"], "spec_tok_s": rate["spec"],
               "ratio": rate["spec"] / rate["plain"], "same_outputs": same,
               "spec_steps_per_kb": {kb: n for kb, n in steps.items() if n}}
        results.append(row)
    print("\n| conc | plain tok/s | spec tok/s | spec / plain | outputs equal | spec steps per k |")
    print("|---:|---:|---:|---:|:---:|---|")
    for row in results:
        per_kb = ", ".join(f"k{kb}: {n}" for kb, n in row["spec_steps_per_kb"].items())
        print(f"| {row['concurrency']} | {row['plain_tok_s']:.1f} | {row['spec_tok_s']:.1f} | "
              f"{row['ratio']:.3f}x | {'yes' if row['same_outputs'] else 'NO'} | {per_kb} |")
    for name, prof in profiles.items():
        print(f"\n{name}: the {args.profile} costliest functions by own time")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0 if all(r["same_outputs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
