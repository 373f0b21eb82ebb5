#!/usr/bin/env python
"""Per-device memory of serving MODEL on MESH: weights, KV cache, compiled temporaries; does it fit?

    python tools/plan_memory.py qwen3-30b-a3b tpu-v5e-8 --slots 8 --max-len 4096 --draft qwen3-0.6b
    python tools/plan_memory.py mixtral-8x7b tpu-v5p-8 --kv-cache paged --slots 64 --kv-pages 8192
    python tools/plan_memory.py qwen3-30b-a3b tpu-v5e-4 --quantize int8 --kv-cache-dtype int8 --no-compile

    python tools/plan_memory.py qwen3-235b-a22b tpu-v5p-32 --draft qwen3-0.6b --slots 16 --max-len 4096

MODEL and --draft are config names (configs/models) or JSON paths; MESH is a mesh config
(configs/meshes: cpu-8, tpu-v5e-8, tpu-v5e-4, tpu-v5p-8, gpu-8xh100, gpu-1xh100, and the multi-host
slices tpu-v5e-16, tpu-v5p-16, tpu-v5p-32, gpu-2x8xh100, compiled as one program over every chip of
the slice, the one each host's process runs; the plan names the hosts, the mesh axes that cross
them and the ragged-all-to-all ops of the routed expert exchange in each step). Temporaries
come from ahead-of-time compiles of the real prefill / decode (/ verify / draft) steps with
abstract weights for the mesh's topology (TPU: libtpu; GPU: jax-cuda12-plugin and ptxas), so no
accelerator and no weights are needed. Prompts are planned as the server prefills them, in chunks
of --max-step-tokens (0: whole prompts, whose prefill temporaries grow with the context). Exit
status 0 when it fits, 1 (with the largest slots x context, or pages, that would fit) when it does
not, including when the compiler itself runs out of device memory for a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compute nowhere: the topology only describes the target

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxspec.config import load_config  # noqa: E402
from jaxspec.mesh import MOE_EXCHANGES, load_mesh_config  # noqa: E402
from jaxspec.models.kv_cache import KV_DTYPES  # noqa: E402
from jaxspec.planning import DEFAULT_HEADROOM, plan_memory  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("mesh")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="context per slot (default: the model's max_seq_len)")
    p.add_argument("--draft", default=None, help="draft model config (must share the target's vocabulary size)")
    p.add_argument("--k", type=int, default=4, help="draft tokens per step (verification shape)")
    p.add_argument("--dtype", default=None, help="override the parameter dtype of both models")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None, help="weight-only quantized target")
    p.add_argument("--draft-quantize", choices=("int8", "int4"), default=None, help="weight-only quantized draft")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="fraction of device memory kept free")
    p.add_argument("--no-compile", action="store_true", help="weights and cache only (skip the AOT compiles)")
    p.add_argument("--kv-cache", choices=("slot", "paged"), default="slot",
                   help="paged: plan a page pool (--kv-pages x --page-size positions) for --slots requests at once")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="the target's KV cache: auto (the model's dtype) or int8 (per-head-per-token scales)")
    p.add_argument("--draft-kv-cache-dtype", choices=KV_DTYPES, default="auto", help="the draft's KV cache, likewise")
    p.add_argument("--kv-pages", type=int, default=None, help="pages in the pool (default: --slots x --max-len / --page-size)")
    p.add_argument("--max-step-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step, as serve's flag (0: whole prompts); bounds prefill temporaries")
    p.add_argument("--moe-exchange", choices=MOE_EXCHANGES, default=None,
                   help="override the mesh config's expert-parallel token exchange (ragged_all_to_all: routed)")
    args = p.parse_args(argv)

    cfg = load_config(args.model)
    draft = load_config(args.draft) if args.draft else None
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
        draft = draft.replace(dtype=args.dtype) if draft else None
    if args.quantize:
        cfg = cfg.replace(quantization=args.quantize)
    if args.draft_quantize and draft is not None:
        draft = draft.replace(quantization=args.draft_quantize)
    max_len = args.max_len or cfg.max_seq_len
    paging = None
    if args.kv_cache == "paged":
        paging = (args.kv_pages or args.slots * max_len // args.page_size, args.page_size)
    mesh_cfg = load_mesh_config(args.mesh)
    if args.moe_exchange:
        mesh_cfg = dataclasses.replace(mesh_cfg, moe_exchange=args.moe_exchange)
    plan = plan_memory(
        cfg, mesh_cfg, args.slots, max_len, draft_cfg=draft,
        num_speculative_tokens=args.k, compile=not args.no_compile, headroom=args.headroom,
        paging=paging, prefill_chunk=args.max_step_tokens or None,
        kv_dtype=args.kv_cache_dtype, draft_kv_dtype=args.draft_kv_cache_dtype,
        on_step=lambda name, b: print(f"  compiled {name}: {b / 2**30:.3f} GiB transient", file=sys.stderr, flush=True),
    )
    print(plan.table())
    if not plan.fits:
        print(f"DOES NOT FIT: {plan.refusal()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
