"""In-process A/B of plain decoding with the dense projections on XLA against the C++ products
(matmul backend "xla" against "cpu"; ``jaxspec.models.dense_cpu``).

Two target runners of the same weights, one per backend, each behind its own engine in this one
process; rounds alternate between them, so the machine's drift hits both alike (``ab_engine.py``
explains why two servers will not do on a shared machine). Prints tokens/s per round and overall,
the ratio, and whether the greedy outputs matched.

    python tools/ab_matmul.py --model builtin --concurrency 1 8 --rounds 4

``--forwards builtin mixtral dense`` instead times single jitted forwards of those models
(``tools/roofline.py``'s, B rows x T tokens ending at --context, 256, cached positions), the two backends' calls
alternating, and prints each one's median and the median of the paired ratios.
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


def forwards(models: list[str], shapes: list[tuple[int, int]], reps: int, context: int = 256,
             max_len: int = 512) -> list[dict]:
    """Per (model, B, T): median ms of the forward with each backend and the median of the paired
    cpu / xla ratios. Every rep runs every shape with both backends (the order alternating), so the
    machine's drift hits shapes and backends alike."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import roofline
    from jaxspec.engine.cpu_backends import auto_attention
    from jaxspec.models.kv_cache import KVCache

    rows = []
    for name in models:
        model = roofline.build_model(name, max_len)
        cfg = model.cfg
        attention = auto_attention(cfg)
        moe, state = roofline.dispatch_for(model, "measured", max(b for b, _ in shapes), max(t for _, t in shapes),
                                           max_len, (attention, "xla"))
        if not cfg.is_moe:
            state = nnx.split(model)[1]
        graphdef = nnx.graphdef(model)
        cases = {}
        for b, t in shapes:
            for mm in BACKENDS:
                tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (b, t)), jnp.int32)
                cases[(b, t, mm)] = [roofline._forward_for(graphdef, context, moe, (attention, mm)),
                                     KVCache.create(cfg, b, max_len), tokens, jnp.full((b,), context - t, jnp.int32), []]
        for i in range(reps + 2):  # compile, then one warm call each
            for b, t in shapes:
                for mm in (BACKENDS if i % 2 == 0 else BACKENDS[::-1]):
                    case = cases[(b, t, mm)]
                    t0 = time.perf_counter()
                    logits, case[1], _ = case[0](state, case[1], case[2], case[3])
                    jax.block_until_ready((logits, case[1]))
                    if i >= 2:
                        case[4].append(time.perf_counter() - t0)
        for b, t in shapes:
            xs, cs = cases[(b, t, "xla")][4], cases[(b, t, "cpu")][4]
            rows.append({"model": name, "B": b, "T": t, "xla_ms": 1e3 * statistics.median(xs),
                         "cpu_ms": 1e3 * statistics.median(cs),
                         "ratio": statistics.median(c / x for x, c in zip(xs, cs))})
    one = {(r["model"], r["B"]): r for r in rows if r["T"] == 1}
    print("\n| model | B | T | matmul xla ms | matmul cpu ms | paired cpu / xla | t(T)/t(1) xla | t(T)/t(1) cpu |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = one.get((r["model"], r["B"]))
        per = (f"{r['xla_ms'] / base['xla_ms']:.2f} | {r['cpu_ms'] / base['cpu_ms']:.2f}"
               if base is not None and r["T"] > 1 else "- | -")
        print(f"| {r['model']} | {r['B']} | {r['T']} | {r['xla_ms']:.3f} | {r['cpu_ms']:.3f} | {r['ratio']:.2f} | {per} |")
    return rows


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
    p.add_argument("--forwards", nargs="+", default=None, metavar="MODEL",
                   help="time single forwards of these tools/roofline.py models instead (builtin, mixtral, dense, ...)")
    p.add_argument("--shapes", nargs="+", default=["1x1", "1x5", "8x1", "8x5"], help="with --forwards: BxT")
    p.add_argument("--reps", type=int, default=40, help="with --forwards: timed calls per backend")
    p.add_argument("--context", type=int, default=256, help="with --forwards: positions attended after the step")
    p.add_argument("--max-len", type=int, default=512, help="with --forwards: cache length per row")
    args = p.parse_args(argv)
    if args.forwards:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        rows = forwards(args.forwards, shapes, args.reps, args.context, args.max_len)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "forwards": rows}, f, indent=1)
        return 0

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
