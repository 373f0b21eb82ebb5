"""Each model forward's measured time beside its roofline bound on this machine.

A forward over B rows of T tokens against C cached positions cannot run faster
than the larger of

* bytes / bandwidth: the bytes it must read (attention and dense MLP weights of
  every layer; per MoE layer the router, the shared expert and the DISTINCT
  experts its tokens routed to, from the forward's ``expert_load``; the K/V
  cache rows it attends over; the output projection; the embedding rows), and
* flops / peak: 2 x tokens x (parameters used per token, lm head included)
  plus 4 x tokens x context x heads x head_dim per layer of attention.

Peak and bandwidth are measured here (median of a jitted float32 matmul and of a
jitted ``jnp.sum`` over a 256 MiB array) unless given. Each (model, B, T) forward
is jitted over a donated cache like the engine's and timed as the median of
``--reps`` calls after warm-up; tokens are fixed random ids, so routing (and the
experts counted) is reproducible. The forward attends over the C positions in
use (``kv_len``, as the engine's steps do), or with ``--full-cache`` over the
whole cache (max length M); the bound counts what was attended. MoE layers dispatch as
``serve`` does by default (``--moe-dispatch measured``: the fastest exact backend per step size,
timed first, with the expert weights held as the runner holds them). T = 1 forwards are also
timed inside one call of ``--decode-steps`` of them, each fed the argmax of the one before, as the
server runs plain decoding: the call's fixed cost (dispatch, argument handling) is then shared.

    python tools/roofline.py                                   # builtin, mixtral, dense
    python tools/roofline.py --models mixtral --batch 1 8 32 --tokens 1 5 9
    python tools/roofline.py --peak-gflops 80 --bandwidth-gbs 26 --json /tmp/roofline.json

``--models`` takes ``builtin`` (the shipped trained MoE), ``mixtral`` (random,
Mixtral-shaped, 6 layers x 8 experts top-2), ``dense`` (the builtin target's
active width as one dense MLP) or any config name under configs/models (random weights).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxspec import builtin  # noqa: E402
from jaxspec.config import ConfigError, ModelConfig, load_config  # noqa: E402
from jaxspec.bench.chips import median_seconds  # noqa: E402
from jaxspec.loading import load_any  # noqa: E402
from jaxspec.models import KVCache, Transformer, create_model  # noqa: E402
from jaxspec.speculative.adaptive import expected_experts_touched  # noqa: E402

COLUMNS = ("model", "B", "T", "context", "measured_ms", "bound_ms", "bound_by", "mb_read", "gflop", "ratio",
           "experts_touched", "num_experts", "bytes_ms", "flops_ms")


# ----------------------------------------------------------------------------- the bound
def forward_bound(cfg: ModelConfig, rows: int, tokens_per_row: int, context_len: int,
                  experts_touched_per_layer: Sequence[int] | int | None, itemsize: int,
                  peak_flops: float, bandwidth: float) -> dict:
    """Roofline bound of one forward (same model as ``adaptive.Roofline.forward_s``, minus its overhead).

    ``context_len`` is the number of cache positions each row attends over.
    ``experts_touched_per_layer``: distinct experts routed to in each layer (entries
    of dense layers are ignored), one count for every MoE layer, or None for the
    expected count of uniformly routed tokens. Returns bytes, flops, their times,
    ``bound_s`` (the larger) and ``bound_by`` ("bytes" or "flops").
    """
    n = rows * tokens_per_row
    d, dh = cfg.d_model, cfg.head_dim
    attn = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # wq, wk, wv, wo
    expert = 3 * d * cfg.moe_mlp_dim  # w_gate, w_up, w_down
    shared = 3 * d * cfg.shared_expert_mlp_dim
    router = d * cfg.num_experts
    head = cfg.vocab_size * d  # lm_head, or the tied embedding read as the head
    params_read = head + n * d  # + the embedding rows looked up
    per_token = head  # parameters each token multiplies by
    attn_flops = 0.0
    for layer in range(cfg.num_layers):
        params_read += attn
        per_token += attn
        # Scores and the weighted sum of values: 2 matmuls of [heads, head_dim] x context.
        attn_flops += 4.0 * n * context_len * cfg.num_heads * dh
        if cfg.layer_is_moe(layer):
            if experts_touched_per_layer is None:
                touched = expected_experts_touched(n, cfg.num_experts, cfg.num_experts_per_tok)
            elif isinstance(experts_touched_per_layer, (int, np.integer)):
                touched = int(experts_touched_per_layer)
            else:
                touched = experts_touched_per_layer[layer]
            params_read += touched * expert + shared + router
            # The router is a real per-token matmul (Roofline.forward_s leaves it out: d x E is tiny).
            per_token += cfg.num_experts_per_tok * expert + shared + router
        else:
            params_read += 3 * d * cfg.mlp_dim
            per_token += 3 * d * cfg.mlp_dim
    kv = rows * context_len * cfg.num_layers * 2 * cfg.num_kv_heads * dh
    nbytes = float((params_read + kv) * itemsize)
    flops = 2.0 * n * per_token + attn_flops
    bytes_s, flops_s = nbytes / bandwidth, flops / peak_flops
    return {"bytes": nbytes, "flops": flops, "bytes_s": bytes_s, "flops_s": flops_s,
            "bound_s": max(bytes_s, flops_s), "bound_by": "bytes" if bytes_s >= flops_s else "flops"}


# ----------------------------------------------------------------------------- the machine
def measure_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """FLOP/s of a jitted float32 [n, n] x [n, n] matmul (median)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    return 2.0 * n ** 3 / median_seconds(jax.jit(jnp.matmul), a, b, reps=reps)


def measure_bandwidth(nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Bytes/s read by a jitted ``jnp.sum`` over a float32 array far larger than the caches (median)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return nbytes / median_seconds(jax.jit(jnp.sum), x, reps=reps)


# ----------------------------------------------------------------------------- the models
def _builtin_config() -> ModelConfig:
    try:
        return load_config(builtin.asset_dir("target") / "config.json")
    except ConfigError:  # an install without the trained assets: the config it was built from
        return load_config("builtin-target")


def mixtral_config(max_len: int) -> ModelConfig:
    """A small Mixtral shape: 6 layers, d_model 256, 8 experts top-2 of width 512, GQA 8/2 heads."""
    return ModelConfig(name="mixtral-small", vocab_size=4096, d_model=256, num_layers=6, num_heads=8,
                       num_kv_heads=2, head_dim=32, mlp_dim=512, max_seq_len=max(max_len, 2048),
                       rope_theta=1e6, rms_eps=1e-5, num_experts=8, num_experts_per_tok=2, moe_mlp_dim=512)


def dense_config() -> ModelConfig:
    """The builtin target with its active MLP width (top_k x expert width) as one dense MLP."""
    cfg = _builtin_config()
    return cfg.replace(name="builtin-dense", num_experts=0, num_experts_per_tok=0, moe_mlp_dim=0,
                       dense_layers=(), mlp_dim=cfg.num_experts_per_tok * cfg.moe_mlp_dim)


def build_model(name: str, max_len: int) -> Transformer:
    if name == "builtin":
        return load_any("builtin")[0]
    if name == "mixtral":
        return create_model(mixtral_config(max_len))
    if name == "dense":
        return create_model(dense_config())
    return load_any(name)[0]  # a config name or path: random weights


def _forward_impl(graphdef, kv_len, moe_backend, backends, state, cache, tokens, start):
    """``backends``: (attention, matmul) backend names."""
    kwargs = {} if kv_len is None else {"kv_len": kv_len}
    out = nnx.merge(graphdef, state)(tokens, start, cache, None, None, moe_backend=moe_backend,
                                     attention_backend=backends[0], matmul_backend=backends[1], **kwargs)
    return out.logits, out.cache, out.expert_load


@functools.lru_cache(maxsize=None)
def _forward_for(graphdef, kv_len, moe_backend=None, backends=("xla", "xla")):
    """The jitted forward with the graph bound, as the engine binds it: a static graphdef argument
    would be hashed on every call (about 1 ms of host time, timed as if it were the forward's)."""
    return jax.jit(functools.partial(_forward_impl, graphdef, kv_len, moe_backend, backends), donate_argnums=(1,))


def _decode_call_impl(graphdef, kv_len, moe_backend, backends, steps, state, cache, tokens, start):
    """``steps`` 1-token forwards in one call, each fed the argmax of the one before (as the engine's
    plain decode calls of several steps): tokens [B, steps]."""
    def one(carry, i):
        cache, tok = carry
        logits, cache, _ = _forward_impl(graphdef, kv_len, moe_backend, backends, state, cache, tok[:, None], start + i)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (cache, nxt), nxt

    (cache, _), toks = jax.lax.scan(one, (cache, tokens[:, 0]), jnp.arange(steps, dtype=jnp.int32))
    return toks.T, cache


@functools.lru_cache(maxsize=None)
def _decode_call_for(graphdef, kv_len, moe_backend, backends, steps):
    return jax.jit(functools.partial(_decode_call_impl, graphdef, kv_len, moe_backend, backends, steps),
                   donate_argnums=(1,))


def time_decode_call(graphdef, state, cfg: ModelConfig, rows: int, steps: int, context: int, max_len: int,
                     kv_len: int | None, reps: int, seed: int = 0, moe_backend=None,
                     backends: tuple[str, str] = ("xla", "xla")) -> float:
    """Median seconds per 1-token forward inside a call of ``steps`` of them (the call's fixed cost
    shared), the last one ending at position ``context``."""
    call = _decode_call_for(graphdef, kv_len, moe_backend, backends, steps)
    cache = KVCache.create(cfg, rows, max_len)
    toks = jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, (rows, 1)), jnp.int32)
    start = jnp.full((rows,), context - steps, jnp.int32)
    times = []
    for i in range(reps + 2):  # compile, then one warm call
        t = time.perf_counter()
        out, cache = call(state, cache, toks, start)
        jax.block_until_ready((out, cache))
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) / steps


def dispatch_for(model: Transformer, how: str, rows: int, tokens: int, max_len: int,
                 backends: tuple[str, str] = ("xla", "xla")):
    """(MoE dispatch, parameters) the forwards run: ``auto`` (None: the config's rule), a backend
    name, or ``measured``: the table and parameter layout (experts held per expert on a CPU) of a
    runner that ``serve --moe-dispatch measured`` builds for steps of up to ``rows`` x ``tokens``."""
    from jaxspec.engine.model_runner import ModelRunner
    from jaxspec.engine.steps import params_tree

    params = params_tree(nnx.split(model)[1])
    if how == "auto" or not model.cfg.is_moe:
        return None, params
    if how != "measured":
        return how, params
    runner = ModelRunner(model, rows, max_len=max_len, attention_backend=backends[0], matmul_backend=backends[1])
    table = runner.tune_moe_dispatch(tokens_per_row=range(1, tokens + 1))
    return table, (runner.state if table is not None else params)


def time_forward(graphdef, state, cfg: ModelConfig, rows: int, tokens: int, context: int, max_len: int,
                 kv_len: int | None, reps: int, seed: int = 0, moe_backend=None,
                 backends: tuple[str, str] = ("xla", "xla")) -> tuple[float, np.ndarray]:
    """Median seconds of the jitted forward at start = context - tokens, and its expert load [L, E]."""
    step = _forward_for(graphdef, kv_len, moe_backend, backends)
    cache = KVCache.create(cfg, rows, max_len)
    toks = jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, (rows, tokens)), jnp.int32)
    start = jnp.full((rows,), context - tokens, jnp.int32)
    for _ in range(2):  # compile, then one warm call
        logits, cache, load = step(state, cache, toks, start)
        jax.block_until_ready((logits, cache))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        logits, cache, load = step(state, cache, toks, start)
        jax.block_until_ready((logits, cache))
        times.append(time.perf_counter() - t)
    return statistics.median(times), np.asarray(load)


def run_model(name: str, args, peak: float, bandwidth: float, kv_supported: bool) -> list[dict]:
    model = build_model(name, args.max_len)
    cfg = model.cfg
    from jaxspec.engine.cpu_backends import auto_attention, auto_matmul

    attention = auto_attention(cfg) if args.attention == "auto" else args.attention
    matmul = auto_matmul(cfg) if args.matmul == "auto" else args.matmul
    backends = (attention, matmul)
    backend, state = dispatch_for(model, args.moe_dispatch, max(args.batch), max(args.tokens), args.max_len, backends)
    print(f"# {name}: attention {attention}, matmul {matmul}", file=sys.stderr, flush=True)
    if backend is not None:
        print(f"# {name}: MoE dispatch {getattr(backend, 'choices', backend)}", file=sys.stderr, flush=True)
    graphdef = nnx.graphdef(model)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kv_len = args.context if kv_supported else None
    attended = args.context if kv_supported else args.max_len
    out = []
    for b in args.batch:
        for t in args.tokens:
            sec, load = time_forward(graphdef, state, cfg, b, t, args.context, args.max_len, kv_len, args.reps,
                                     args.seed, backend, backends)
            touched = [int((load[i] > 0).sum()) if cfg.layer_is_moe(i) else 0 for i in range(cfg.num_layers)]
            bound = forward_bound(cfg, b, t, attended, touched, itemsize, peak, bandwidth)
            out.append({"model": name, "B": b, "T": t, "context": attended, "measured_ms": sec * 1e3,
                        "bound_ms": bound["bound_s"] * 1e3, "bound_by": bound["bound_by"],
                        "mb_read": bound["bytes"] / 1e6, "gflop": bound["flops"] / 1e9,
                        "ratio": sec / bound["bound_s"], "experts_touched": touched, "num_experts": cfg.num_experts,
                        "bytes_ms": bound["bytes_s"] * 1e3, "flops_ms": bound["flops_s"] * 1e3})
            r = out[-1]
            if t == 1 and args.decode_steps > 1 and args.context >= args.decode_steps:
                r["call_ms"] = 1e3 * time_decode_call(graphdef, state, cfg, b, args.decode_steps, args.context,
                                                      args.max_len, kv_len, args.reps, args.seed, backend, backends)
            print(f"# {name} B={b} T={t}: {r['measured_ms']:.3f} ms (bound {r['bound_ms']:.3f} ms)",
                  file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- report
def _experts_cell(row: dict) -> str:
    moe = [n for n in row["experts_touched"] if n]
    return f"{statistics.mean(moe):.1f}/{row['num_experts']}" if moe else "-"


def print_tables(rows: list[dict]) -> None:
    print("| model | B | T | measured ms | bound ms | bound by | MB read | GFLOP | measured/bound | experts/layer "
          "| in a decode call: ms a step | its /bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        call = (f"{r['call_ms']:.3f} | {r['call_ms'] / r['bound_ms']:.2f}") if "call_ms" in r else "- | -"
        print(f"| {r['model']} | {r['B']} | {r['T']} | {r['measured_ms']:.3f} | {r['bound_ms']:.3f} | "
              f"{r['bound_by']} | {r['mb_read']:.2f} | {r['gflop']:.4f} | {r['ratio']:.2f} | "
              f"{_experts_cell(r)} | {call} |")
    # How much more a T-token step costs than a 1-token one (the price of verifying T - 1 drafts).
    by_key = {(r["model"], r["B"], r["T"]): r for r in rows}
    t0 = min(r["T"] for r in rows)
    longer = sorted({r["T"] for r in rows} - {t0})
    if not longer:
        return
    print(f"\n| model | B | T | measured t(T)/t({t0}) | bound t(T)/t({t0}) |")
    print("|---|---|---|---|---|")
    for (model, b, t), r in by_key.items():
        base = by_key.get((model, b, t0))
        if t in longer and base:
            print(f"| {model} | {b} | {t} | {r['measured_ms'] / base['measured_ms']:.2f} | "
                  f"{r['bound_ms'] / base['bound_ms']:.2f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["builtin", "mixtral", "dense"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows B")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 5], help="tokens per row T")
    p.add_argument("--context", type=int, default=256, help="C: positions in use after the step (start = C - T)")
    p.add_argument("--max-len", type=int, default=512, help="M: cache length per slot")
    p.add_argument("--full-cache", action="store_true", help="attend over the whole cache M instead of C")
    p.add_argument("--reps", type=int, default=20, help="timed calls per forward (median)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token ids (fixes the routing)")
    p.add_argument("--peak-gflops", type=float, default=None, help="skip measuring the matmul peak")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="skip measuring the memory bandwidth")
    p.add_argument("--moe-dispatch", default="measured", metavar="{measured,auto,BACKEND}",
                   help="MoE dispatch of the forwards: 'measured' (as serve's default: the fastest exact backend "
                   "per step size, timed here first), 'auto' (the fixed rule) or a backend name")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cpu"),
                   help="attention of the forwards: 'auto' (as serve: the C++ kernel where it applies), 'xla', 'cpu'")
    p.add_argument("--matmul", default="auto", choices=("auto", "xla", "cpu"),
                   help="dense projections of the forwards: 'auto' (as serve: the C++ products where they apply), "
                   "'xla', 'cpu'")
    p.add_argument("--decode-steps", type=int, default=4, metavar="N",
                   help="also time T = 1 forwards inside one call of N (the server's plain decode calls, "
                   "--decode-steps; the call's fixed cost shared); 1: not")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not max(args.tokens) <= args.context <= args.max_len:
        p.error(f"need max(--tokens) <= --context <= --max-len, got {max(args.tokens)}, {args.context}, "
                f"{args.max_len}")

    peak = args.peak_gflops * 1e9 if args.peak_gflops else measure_peak_flops()
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_bandwidth()
    kv_supported = not args.full_cache
    print(f"# devices: {jax.devices()}")
    print(f"# matmul peak {peak / 1e9:.1f} GFLOP/s ({'given' if args.peak_gflops else 'measured, f32 1024^3'}), "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured, sum of 256 MiB'})")
    if kv_supported:
        print(f"# attended context: C = {args.context} (forward called with kv_len={args.context}; cache M = "
              f"{args.max_len})")
    else:
        print(f"# attended context: the whole cache M = {args.max_len} (--full-cache; "
              f"C = {args.context} only sets start = C - T); the bound counts M")

    rows = []
    for name in args.models:
        rows += run_model(name, args, peak, bandwidth, kv_supported)
    print()
    print_tables(rows)
    if args.json:
        meta = {"peak_gflops": peak / 1e9, "bandwidth_gbs": bandwidth / 1e9, "kv_len_used": kv_supported,
                "max_len": args.max_len, "reps": args.reps}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
