"""In-process A/B of plain decoding with the dense projections on XLA against the C++ products
(matmul backend "xla" against "cpu"; ``jaxspec.models.dense_cpu``).

Two target runners of the same weights, one per backend, each behind its own engine in this one
process; rounds alternate between them, so the machine's drift hits both alike (``ab_engine.py``
explains why two servers will not do on a shared machine). Prints tokens/s per round and overall,
the ratio, and whether the greedy outputs matched.

    python tools/ab_matmul.py --model builtin --concurrency 1 8 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab_engine import drive  # noqa: E402

BACKENDS = ("xla", "cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="a built-in name, config name or checkpoint")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--moe-dispatch", default="measured")
    p.add_argument("--decode-steps", type=int, default=4, help="plain decode steps per call, as serve's default")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from jaxspec import compilation_cache
    from jaxspec.bench.workloads import make_workload
    from jaxspec.engine.engine import Engine
    from jaxspec.engine.factory import make_runner
    from jaxspec.loading import load_any

    compilation_cache.enable()
    model, tok = load_any(args.model)
    engines = {}
    for backend in BACKENDS:
        runner = make_runner(model, num_slots=args.slots, moe_dispatch=args.moe_dispatch,
                             decode_steps=args.decode_steps, matmul=backend)
        runner.warmup()
        engines[backend] = Engine(runner, tok, overlap=True)
    prompts = [list(r.prompt) for r in make_workload("code", tok, args.requests, args.max_tokens, args.seed,
                                                    warmup=0).requests]
    results = []
    for conc in args.concurrency:
        for engine in engines.values():  # one untimed pass each: first uses of batch buckets
            drive(engine, prompts[:max(conc, 2)], args.max_tokens, conc)
        totals = {name: [0.0, 0] for name in engines}
        same = True
        for r in range(args.rounds):
            outs = {}
            for name in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                s, n, outs[name] = drive(engines[name], prompts, args.max_tokens, conc)
                totals[name][0] += s
                totals[name][1] += n
                print(f"c{conc} round {r} {name} {n / s:8.1f} tok/s", flush=True)
            same &= outs["xla"] == outs["cpu"]
        rate = {name: n / s for name, (s, n) in totals.items()}
        results.append({"concurrency": conc, "xla_tok_s": rate["xla"], "cpu_tok_s": rate["cpu"],
                        "ratio": rate["cpu"] / rate["xla"], "same_outputs": same})
    print("\n| conc | matmul xla tok/s | matmul cpu tok/s | cpu / xla | outputs equal |")
    print("|---:|---:|---:|---:|:---:|")
    for row in results:
        print(f"| {row['concurrency']} | {row['xla_tok_s']:.1f} | {row['cpu_tok_s']:.1f} | {row['ratio']:.3f}x | "
              f"{'yes' if row['same_outputs'] else 'no (rounding: greedy ties may differ)'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
