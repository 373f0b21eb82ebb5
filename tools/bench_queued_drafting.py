"""Queued drafting steps, in process: plain decoding, fixed-k drafting with its steps queued behind
each other (the serving default), the same k waiting for every step, and adaptive k; the
configurations take turns round by round, so load on a shared machine moves them together.

    python tools/bench_queued_drafting.py                     # built-in pair, k = 2, 1/4/8 requests
    python tools/bench_queued_drafting.py --k 1 --concurrency 1 --rounds 5

Each round generates ``--requests`` requests (prompts of 100-190 random tokens, 64 greedy tokens),
``--concurrency`` at a time, per configuration. The table gives each configuration's best round in
tokens/s and its ratio to plain's best; every round follows it.
"""

from __future__ import annotations

import argparse
import random
import time

from jaxspec.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.loading import load_any
from jaxspec.sampling import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slots", type=int, default=8)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tok = load_any(args.model)
    draft = load_any(args.model, role="draft")[0]
    rng = random.Random(0)
    prompts = [[rng.randrange(4, tok.vocab_size) for _ in range(rng.randint(100, 190))] for _ in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)

    def engine(spec: str, k, queued: bool = True) -> Engine:
        runner = make_runner(model, num_slots=args.slots, spec_method=spec, draft=draft if spec == "draft" else None,
                             num_speculative_tokens=k, k_max=max(4, k if isinstance(k, int) else 0))
        if not queued:  # the engine then runs each drafting step at once and waits for it
            runner.__class__ = type("WaitingRunner", (type(runner),), {"queues_drafting": False})
        eng = Engine(runner, tok, overlap=True)
        runner.warmup()
        eng.generate(prompts[:4], params)
        return eng

    engines = {"plain": engine("none", 0), f"k={args.k} queued": engine("draft", args.k),
               f"k={args.k} waited": engine("draft", args.k, queued=False), "adaptive": engine("draft", "auto")}
    rates: dict[tuple[str, int], list[float]] = {(n, c): [] for n in engines for c in args.concurrency}
    for _ in range(args.rounds):
        for c in args.concurrency:
            for name, eng in engines.items():
                t = time.perf_counter()
                for i in range(0, len(prompts), c):
                    eng.generate(prompts[i:i + c], params)
                rates[(name, c)].append(len(prompts) * args.max_tokens / (time.perf_counter() - t))
    print("| requests at once | " + " | ".join(engines) + " |")
    print("|---:|" + "---:|" * len(engines))
    for c in args.concurrency:
        plain = max(rates[("plain", c)])
        print(f"| {c} | " + " | ".join(f"{max(rates[(n, c)]):.0f} ({max(rates[(n, c)]) / plain:.2f}x)" for n in engines)
              + " |")
    for (name, c), xs in rates.items():
        print(f"{name}, {c} at once: " + " / ".join(f"{x:.0f}" for x in xs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
