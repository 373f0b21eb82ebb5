#!/usr/bin/env python
"""Compile the engine's real steps for full-size models on real TPU / H100 topologies, on a CPU host.

    python tools/aot_compile.py                 # every row of TARGETS, markdown table on stdout
    python tools/aot_compile.py --only v5p      # rows whose mesh or model contains "v5p"
    python tools/aot_compile.py --only qwen3-30b --only v5e-8   # rows matching both
    python tools/aot_compile.py --only tpu-v5e-16 --moe-exchange ragged_all_to_all

For each (target model, draft, mesh, slots x context) the prefill, decode, verification and
draft-loop steps are lowered with abstract weights placed by the mesh config's rules and
compiled by the target's own compiler (libtpu / XLA:GPU + ptxas); the per-device bytes come
from the shardings (weights, KV cache) and ``compiled.memory_analysis()`` (temporaries). Multi-host
slices (tpu-v5e-16, tpu-v5p-16, tpu-v5p-32) compile as one program over all their chips, the way
every host's process runs it; the table names the hosts and counts the routed expert exchange's
ragged-all-to-all ops in each step. See docs/sharding.md and docs/multihost.md for the results
and jaxspec/planning.py for how the numbers are combined.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxspec.config import ModelConfig, load_config  # noqa: E402
from jaxspec.mesh import MOE_EXCHANGES, load_mesh_config  # noqa: E402
from jaxspec.planning import GiB, plan_memory  # noqa: E402


def llama_1b_draft_for(target: ModelConfig) -> ModelConfig:
    """A Llama-3.2-1B-shaped draft with the target's vocabulary (Mixtral's 32000-token Llama-2
    tokenizer has no official 1B sibling; a draft must share the vocabulary, so this is the shape
    a distilled 1B draft would have)."""
    base = load_config("llama-3.2-1b")
    return base.replace(name=f"llama-1b-v{target.vocab_size}", vocab_size=target.vocab_size,
                        bos_id=target.bos_id, eos_ids=target.eos_ids, pad_id=target.pad_id)


# (model, draft, mesh, slots, max_len). Draft None = no speculation; "llama-1b" = llama_1b_draft_for(model).
TARGETS = [
    ("mixtral-8x7b", "llama-1b", "tpu-v5p-8", 16, 4096),
    ("mixtral-8x7b", "llama-1b", "gpu-8xh100", 16, 4096),
    ("mixtral-8x7b", "llama-1b", "tpu-v5e-8", 16, 4096),
    ("qwen3-30b-a3b", "qwen3-0.6b", "tpu-v5e-8", 8, 4096),
    ("qwen3-30b-a3b", "qwen3-0.6b", "tpu-v5e-8-ep4", 8, 4096),  # lane-aligned expert width (192 -> 384)
    ("qwen3-30b-a3b", "qwen3-0.6b", "tpu-v5e-8-ep4", 8, 2048),
    ("qwen3-30b-a3b", "qwen3-0.6b", "gpu-1xh100", 8, 4096),
    ("qwen3-30b-a3b", "qwen3-0.6b", "tpu-v5e-4", 8, 4096),
    # Multi-host slices (docs/multihost.md): 4 hosts of a v5e 4x4, 4 / 2 hosts of a v5p 2x2x4 / 2x2x2.
    ("mixtral-8x7b", "llama-1b", "tpu-v5e-16", 16, 4096),
    ("qwen3-235b-a22b", "qwen3-0.6b", "tpu-v5p-32", 16, 4096),
    ("qwen3-235b-a22b", "qwen3-0.6b", "tpu-v5p-16", 16, 4096),
]


def run_row(model: str, draft: str | None, mesh: str, slots: int, max_len: int, k: int,
            moe_exchange: str | None = None) -> str:
    cfg = load_config(model)
    draft_cfg = None if draft is None else llama_1b_draft_for(cfg) if draft == "llama-1b" else load_config(draft)
    mesh_cfg = load_mesh_config(mesh)
    if moe_exchange:
        mesh_cfg = dataclasses.replace(mesh_cfg, moe_exchange=moe_exchange)
    t = time.perf_counter()
    plan = plan_memory(cfg, mesh_cfg, slots, max_len, draft_cfg=draft_cfg, num_speculative_tokens=k,
                       on_step=lambda n, b: print(f"  {model} on {mesh}: compiled {n} ({b / GiB:.3f} GiB)",
                                                  file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t
    print(plan.table(), file=sys.stderr, flush=True)
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    slots_fit, ctx_fit = plan.largest()
    verdict = "yes" if plan.fits else "**no**"
    hosts = f", {plan.num_hosts} hosts" if plan.num_hosts > 1 else ""
    exchange = plan.moe_exchange
    if any(plan.ragged_all_to_all.values()):
        exchange += " (" + ", ".join(f"{n} {name.split()[0]}" for name, n in plan.ragged_all_to_all.items()) + ")"
    return (f"| {model} + {plan.draft or '-'} | {mesh} ({plan.num_devices}{hosts}) | {slots}x{max_len} | "
            f"{g(plan.weights)} | {g(plan.kv_cache)} | {g(plan.draft_weights + plan.draft_kv_cache)} | "
            f"{g(plan.temporaries)} | {g(plan.total)} | {g(plan.hbm)} | {verdict} | {slots}x{ctx_fit} | {exchange} | "
            f"{seconds:.0f} |")


HEADER = ("| model + draft | mesh (devices) | slots x ctx | weights | KV cache | draft w+KV | temporaries | total | "
          "HBM | fits | largest ctx at these slots (est.) | MoE exchange (ragged-all-to-all ops per step) | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=None,
                   help="rows whose model or mesh name contains this, or whose slots x context is this "
                        "(e.g. 8x2048); repeat: rows matching every one")
    p.add_argument("--k", type=int, default=4, help="draft tokens per verification")
    p.add_argument("--moe-exchange", choices=MOE_EXCHANGES, default=None,
                   help="override the mesh configs' expert-parallel token exchange for these rows")
    args = p.parse_args(argv)
    rows = [r for r in TARGETS if all(s in r[0] or s in r[2] or s == f"{r[3]}x{r[4]}" for s in args.only or [])]
    if not rows:
        p.error(f"no row matches --only {args.only}; rows: " + ", ".join(f"{r[0]} on {r[2]}" for r in TARGETS))
    print("Per-device GiB.")
    print(HEADER, flush=True)
    for row in rows:
        print(run_row(*row, k=args.k, moe_exchange=args.moe_exchange), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
