"""Per-step decode latency by batch size, tokens per step and MoE dispatch backend.

For each (B, T, backend) the jitted forward over a slot cache is timed (median of
``--iters`` runs after warm-up) and printed beside the memory-bandwidth bound:
the bytes that step must read (attention/embedding weights, the experts the
step actually routed to, the KV cache rows) divided by this machine's measured
copy bandwidth. Also times prefill (B=1) at several lengths, which is what
``moe_dispatch.choose_backend`` ("auto") was set from.

    python tools/bench_decode.py                      # small-moe (~20M params)
    python tools/bench_decode.py --model tiny-moe --batch 1 8 --tokens 1 4
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.loading import load_any
from jaxspec.models import KVCache
from jaxspec.models.moe_dispatch import BACKENDS
import jaxspec.models.moe_pallas  # noqa: F401,E402  (registers the "pallas" dispatch)


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second moved by a large array copy (read + write), in the memory the forward reads:
    the accelerator's on a GPU/TPU, host memory on a CPU."""
    if jax.default_backend() != "cpu":
        nbytes *= 8  # well past the accelerator's caches
        src = jnp.ones(nbytes // 4, jnp.float32)
        copy = jax.jit(lambda x: x + 1.0)
        jax.block_until_ready(copy(src))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(copy(src))
            best = min(best, time.perf_counter() - t)
        return 2 * nbytes / best
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def step_bytes(cfg, expert_load: np.ndarray, batch: int, tokens: int, context: int) -> int:
    """Weight and cache bytes one forward step must read (experts: those routed to)."""
    item = jnp.dtype(cfg.dtype).itemsize
    d, dh = cfg.d_model, cfg.head_dim
    attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    total = 0
    for layer in range(cfg.num_layers):
        total += attn
        if cfg.layer_is_moe(layer):
            touched = int((expert_load[layer] > 0).sum())
            total += touched * 3 * d * cfg.moe_mlp_dim + d * cfg.num_experts + 3 * d * cfg.shared_expert_mlp_dim
        else:
            total += 3 * d * cfg.mlp_dim
    total += cfg.vocab_size * d  # lm head (the embedding rows read are negligible)
    kv = 2 * cfg.num_layers * batch * (context + tokens) * cfg.num_kv_heads * dh
    return (total + kv) * item


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _step(graphdef, backend, state, cache, tokens, start):
    out = nnx.merge(graphdef, state)(tokens, start, cache, moe_backend=backend)
    return out.logits, out.cache.with_lengths(cache.lengths), out.expert_load


def time_step(graphdef, state, cfg, backend, batch, tokens, context, max_len, iters) -> tuple[float, np.ndarray]:
    cache = KVCache.create(cfg, batch, max_len)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(batch, tokens)), jnp.int32)
    start = jnp.full((batch,), context, jnp.int32)
    logits, cache, load = _step(graphdef, backend, state, cache, toks, start)  # compile + warm
    jax.block_until_ready(logits)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        logits, cache, load = _step(graphdef, backend, state, cache, toks, start)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t)
    return statistics.median(times), np.asarray(load)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-moe")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--prefill", type=int, nargs="*", default=[256, 512, 1024, 2048])
    p.add_argument("--backends", nargs="+", default=[b for b in ("dense", "per_expert", "sorted", "ragged") if b in BACKENDS])
    p.add_argument("--context", type=int, default=128, help="tokens already in each slot during decode")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)

    model, _ = load_any(args.model)
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    counts = cfg.param_counts()
    bw = copy_bandwidth()
    print(f"# model {cfg.name}: {counts['total'] / 1e6:.1f}M params ({counts['active'] / 1e6:.1f}M active), "
          f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}, dtype {cfg.dtype}")
    print(f"# devices: {jax.devices()}; measured copy bandwidth {bw / 1e9:.2f} GB/s")
    print("\n## decode step (context %d)" % args.context)
    print("| B | T | backend | ms/step | tokens/s | bytes read (MB) | bandwidth bound ms | x bound |")
    print("|---|---|---|---|---|---|---|---|")
    max_len = args.context + max(args.tokens) + 1
    for b in args.batch:
        for t in args.tokens:
            for backend in args.backends:
                sec, load = time_step(graphdef, state, cfg, backend, b, t, args.context, max_len, args.iters)
                nbytes = step_bytes(cfg, load, b, t, args.context)
                bound = nbytes / bw
                print(f"| {b} | {t} | {backend} | {sec * 1e3:.2f} | {b * t / sec:.0f} | {nbytes / 1e6:.1f} | "
                      f"{bound * 1e3:.2f} | {sec / bound:.1f} |", flush=True)
    if args.prefill:
        print("\n## prefill (B=1)")
        print("| T | backend | ms | tokens/s |")
        print("|---|---|---|---|")
        for t in args.prefill:
            if t > cfg.max_seq_len:
                continue
            for backend in args.backends:
                sec, _ = time_step(graphdef, state, cfg, backend, 1, t, 0, t, max(2, args.iters // 4))
                print(f"| {t} | {backend} | {sec * 1e3:.1f} | {t / sec:.0f} |", flush=True)


if __name__ == "__main__":
    main()
