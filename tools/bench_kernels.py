"""Benchmark the Pallas kernels against their XLA equivalents.

Grouped matmul (one expert projection, x @ W_e per routed row) on Mixtral-8x7B and
Qwen3-30B-A3B shaped decode / prefill problems:

  pallas      pallas_kernels.gmm.gmm (Mosaic on TPU, Triton on GPU)
  ragged_dot  jax.lax.ragged_dot (XLA's grouped matmul)
  dense       every expert multiplies every row, rows then masked (moe_dispatch "dense");
              skipped when its [E, m, n] intermediate would not fit --max-dense-gib

and the verification kernels: rejection_sample (fused) vs its jax.numpy reference,
verify_attention vs jaxspec.models.layers.cached_attention.

Each entry is the median of --iters timed runs after warm-up, with the useful
GFLOP/s (2*m*k*n for the grouped matmul: rows x their one expert) and the achieved
bandwidth over the bytes the operation must move (the routed experts' weights,
activations in and out; for verification the probability / noise / cache reads).

Meant for a TPU or GPU host. On a CPU no kernel can be compiled: the XLA paths
run at the given sizes and the Pallas kernels only with --interpret (the Pallas
interpreter, milliseconds per grid step: shrink the problems with --scale). CPU
numbers say nothing about kernel performance.

    python tools/bench_kernels.py                                    # accelerator: full sizes
    python tools/bench_kernels.py --scale 16 --interpret --iters 3  # CPU smoke run
    python tools/bench_kernels.py --only gmm --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxspec.models.layers import cached_attention  # noqa: E402
from pallas_kernels._common import default_interpret  # noqa: E402
from pallas_kernels.gmm import gmm  # noqa: E402
from pallas_kernels.rejection_sampling import rejection_sample  # noqa: E402
from pallas_kernels.rejection_sampling_reference import rejection_sample as rejection_reference  # noqa: E402
from pallas_kernels.verify_attention import verify_attention  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GmmProblem:
    name: str
    tokens: int
    top_k: int
    experts: int
    d_model: int
    ffn: int  # expert intermediate size: the gate/up projection is [d_model -> ffn]

    def scaled(self, s: int) -> "GmmProblem":
        # Shrink rows and widths, keep the expert count and routing (the part that makes it grouped).
        return dataclasses.replace(
            self, tokens=max(1, self.tokens // s), d_model=max(128, self.d_model // s), ffn=max(128, self.ffn // s)
        )


GMM_PROBLEMS = [
    GmmProblem("mixtral-8x7b decode (64 tok)", 64, 2, 8, 4096, 14336),
    GmmProblem("mixtral-8x7b prefill (4096 tok)", 4096, 2, 8, 4096, 14336),
    GmmProblem("qwen3-30b-a3b decode (64 tok)", 64, 8, 128, 2048, 768),
    GmmProblem("qwen3-30b-a3b prefill (4096 tok)", 4096, 8, 128, 2048, 768),
]


@dataclasses.dataclass
class Result:
    group: str
    problem: str
    impl: str
    ms: float | None
    gflops: float | None  # useful GFLOP/s
    gbps: float | None
    note: str = ""


def timed(fn: Callable, args, iters: int) -> float:
    """Median wall time in ms of a jitted call (compile + warm-up excluded)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def routed_group_sizes(rng: np.random.Generator, tokens: int, top_k: int, experts: int) -> np.ndarray:
    """Expert loads of a realistic (skewed, Zipf-like) router: some experts busy, some idle."""
    popularity = 1.0 / np.arange(1, experts + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    sizes = np.zeros(experts, np.int64)
    for _ in range(tokens):
        sizes[rng.choice(experts, size=top_k, replace=False, p=popularity)] += 1
    return sizes.astype(np.int32)


def bench_gmm(args, rng) -> list[Result]:
    out = []
    dtype = jnp.dtype(args.dtype)
    for problem in GMM_PROBLEMS:
        p = problem.scaled(args.scale) if args.scale > 1 else problem
        m, k, n, e = p.tokens * p.top_k, p.d_model, p.ffn, p.experts
        sizes = jnp.asarray(routed_group_sizes(rng, p.tokens, p.top_k, e))
        lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
        rhs = jnp.asarray(rng.standard_normal((e, k, n)) * 0.02, dtype)
        used = int(np.count_nonzero(np.asarray(sizes)))
        nbytes = (m * k + used * k * n + m * n) * dtype.itemsize
        flops = 2 * m * k * n
        label = f"{p.name} m={m} k={k} n={n} E={e}" + (f" (1/{args.scale})" if args.scale > 1 else "")

        impls: dict[str, Callable | None] = {
            "pallas": jax.jit(functools.partial(gmm, interpret=args.interpret, backend=args.backend))
            if (args.interpret or not default_interpret()) else None,
            "ragged_dot": jax.jit(jax.lax.ragged_dot),
            "dense": None,
        }
        if e * m * n * 4 <= args.max_dense_gib * 2**30:

            @jax.jit
            def dense(lhs, rhs, sizes):
                ids = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=m)
                full = jnp.einsum("mk,ekn->emn", lhs, rhs, preferred_element_type=jnp.float32)
                return jnp.take_along_axis(full, ids[None, :, None], axis=0)[0].astype(lhs.dtype)

            impls["dense"] = dense
        for name, fn in impls.items():
            if fn is None:
                reason = "needs an accelerator or --interpret" if name == "pallas" else "intermediate too large"
                out.append(Result("gmm", label, name, None, None, None, f"skipped: {reason}"))
                continue
            ms = timed(fn, (lhs, rhs, sizes), args.iters)
            note = "interpreter" if name == "pallas" and args.interpret else ""
            out.append(Result("gmm", label, name, ms, flops / ms / 1e6, nbytes / ms / 1e6, note))
    return out


def bench_verification(args, rng) -> list[Result]:
    out = []
    s = max(1, args.scale)
    # Rejection sampling: 64 slots, 4 drafts, Qwen3 vocabulary.
    b, k, vocab = max(1, 64 // s), 4, max(256, 151936 // s)
    logits = rng.standard_normal((b, k + 1, vocab)).astype(np.float32)
    p = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    q = jax.nn.softmax(jnp.asarray(logits[:, :k] + 0.5 * rng.standard_normal((b, k, vocab)).astype(np.float32)), -1)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, k)), jnp.int32)
    args_rs = (p, q, tokens, jnp.full((b,), k, jnp.int32), jnp.asarray(rng.random((b, k)), jnp.float32),
               jnp.asarray(rng.exponential(size=(b, k + 1, vocab)), jnp.float32))
    nbytes = 4 * b * vocab * (2 * (k + 1) + k)
    label = f"rejection_sample B={b} K={k} V={vocab}"
    kernel = jax.jit(functools.partial(rejection_sample, interpret=args.interpret, backend=args.backend))
    for name, fn in (("pallas", kernel), ("xla_reference", jax.jit(rejection_reference))):
        if name == "pallas" and not (args.interpret or not default_interpret()):
            out.append(Result("verify", label, name, None, None, None, "skipped: needs an accelerator or --interpret"))
            continue
        ms = timed(fn, args_rs, args.iters)
        note = "interpreter" if name == "pallas" and args.interpret else ""
        out.append(Result("verify", label, name, ms, None, nbytes / ms / 1e6, note))

    # Verification attention: 64 slots x 5 tokens, 32 query / 8 kv heads of 128, 4k cache, slots at random lengths.
    b, t, h, kvh, dh, m = max(1, 64 // s), 5, 32, 8, 128, max(256, 4096 // s)
    dtype = jnp.dtype(args.dtype)
    q_ = jnp.asarray(rng.standard_normal((b, t, h, dh)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, m, kvh, dh)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, m, kvh, dh)), dtype)
    start = rng.integers(0, m - t, b)
    pos = jnp.asarray(start[:, None] + np.arange(t)[None, :], jnp.int32)
    # Bytes that must be read: each slot's visible cache prefix (K and V) plus q and the output.
    nbytes = int(2 * (start + t).sum() * kvh * dh * dtype.itemsize + 2 * q_.size * dtype.itemsize)
    flops = int(4 * (start + t).sum() * t * h * dh)
    label = f"verify_attention B={b} T={t} H={h}/{kvh} Dh={dh} M={m} {dtype.name}"
    kernel = jax.jit(functools.partial(verify_attention, interpret=args.interpret, backend=args.backend))
    for name, fn in (("pallas", kernel), ("xla_cached_attention", jax.jit(cached_attention))):
        if name == "pallas" and not (args.interpret or not default_interpret()):
            out.append(Result("verify", label, name, None, None, None, "skipped: needs an accelerator or --interpret"))
            continue
        ms = timed(fn, (q_, kc, vc, pos), args.iters)
        out.append(Result("verify", label, name, ms, flops / ms / 1e6, nbytes / ms / 1e6,
                          "interpreter" if name == "pallas" and args.interpret else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["gmm", "verify"], help="run one group")
    parser.add_argument("--scale", type=int, default=1, help="divide token counts and widths by this (CPU runs)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--backend", default="auto", help="Pallas variant: auto | tpu | gpu")
    parser.add_argument("--interpret", action="store_true", help="run the Pallas kernels in the interpreter (CPU)")
    parser.add_argument("--max-dense-gib", type=float, default=4.0, help="skip the dense path above this intermediate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}   jax {jax.__version__}   dtype {args.dtype}")
    if default_interpret():
        print("note: no accelerator: XLA paths run on CPU; Pallas kernels only with --interpret (interpreter timings,"
              " not kernel performance)")
    results: list[Result] = []
    if args.only in (None, "gmm"):
        results += bench_gmm(args, rng)
    if args.only in (None, "verify"):
        results += bench_verification(args, rng)

    width = max(len(r.problem) for r in results)
    print(f"{'problem':<{width}}  {'impl':<20} {'ms':>10} {'GFLOP/s':>9} {'GB/s':>9}  note")
    for r in results:
        fmt = lambda v, f: f"{v:{f}}" if v is not None else "-"  # noqa: E731
        print(f"{r.problem:<{width}}  {r.impl:<20} {fmt(r.ms, '10.3f'):>10} {fmt(r.gflops, '9.2f'):>9} "
              f"{fmt(r.gbps, '9.2f'):>9}  {r.note}")
    if args.json:
        payload = {"device": str(device), "results": [dataclasses.asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
