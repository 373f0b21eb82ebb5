"""Quality of the quantized built-in models against float32, on the held-out files.

    python tools/eval_quant.py --json quant_eval.json

For the target in float32, int8 and int4 (jaxspec.models.quant):
- bits per byte on the held-out files (jaxspec.training.evaluation);
- teacher-forced agreement: the share of the first --agreement-tokens held-out positions whose
  argmax equals the float32 model's, same context;
- free-running greedy agreement: --prompts held-out prompts continued --new-tokens tokens each
  (--prompts x --new-tokens tokens), the share of tokens equal to float32's at the same position
  and the mean number of tokens before the first difference.
For the draft in float32, int8 and int4, proposing for the float32 target: greedy acceptance at
k = --k (acceptance per position and mean acceptance length).
``--kv-cache-dtype int8`` adds a row per weight precision ("<weights>+kv-int8") measured with an int8
KV cache (jaxspec.models.kv_cache), still against float32 weights with a float cache;
``--weights`` limits the weight precisions measured.
Nothing is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspec.engine import Engine
from jaxspec.engine.factory import make_runner
from jaxspec.loading import load_any
from jaxspec.models import KVCache
from jaxspec.models.kv_cache import KV_DTYPES
from jaxspec.sampling import SamplingParams
from jaxspec.training.acceptance import measure_acceptance
from jaxspec.training.corpus import add_corpus_args, corpus_from_args
from jaxspec.training.data import encode_documents, eval_windows, token_byte_lengths
from jaxspec.training.distill import corpus_prompts
from jaxspec.training.evaluation import heldout_bits_per_byte

PRECISIONS = (None, "int8", "int4")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _argmax(graphdef, state, tokens, kv_dtype=None):  # tokens [B, T] -> greedy choices [B, T]
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    cache = KVCache.create(model.cfg, b, t, kv_dtype=kv_dtype)
    return jnp.argmax(model(tokens, jnp.zeros((b,), jnp.int32), cache).logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _nll_sum(graphdef, state, inputs, targets, mask, kv_dtype=None):  # [B, T] each -> total NLL (nats) of mask
    model = nnx.merge(graphdef, state)
    b, t = inputs.shape
    cache = KVCache.create(model.cfg, b, t, kv_dtype=kv_dtype)
    logp = jax.nn.log_softmax(model(inputs, jnp.zeros((b,), jnp.int32), cache).logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0))


def kv_bits_per_byte(model, tokenizer, documents, seq_len: int, batch_size: int, kv_dtype: str) -> float:
    """``heldout_bits_per_byte`` (same windows, same byte count) with a ``kv_dtype`` KV cache."""
    windows = eval_windows(encode_documents(tokenizer, documents), seq_len, model.cfg.pad_id)
    graphdef, state = nnx.split(model)
    total = 0.0
    for i in range(0, len(windows.inputs), batch_size):
        sl = slice(i, i + batch_size)
        total += float(_nll_sum(graphdef, state, jnp.asarray(windows.inputs[sl]), jnp.asarray(windows.targets[sl]),
                                jnp.asarray(windows.mask[sl]), kv_dtype))
    nbytes = int(token_byte_lengths(tokenizer)[windows.targets[windows.mask]].sum())
    return total / math.log(2) / nbytes


def teacher_forced_choices(model, inputs: np.ndarray, kv_dtype: str | None = None) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.concatenate([np.asarray(_argmax(graphdef, state, jnp.asarray(inputs[i:i + 1]), kv_dtype))
                           for i in range(len(inputs))])


def greedy(model, tokenizer, prompts, new_tokens: int, kv_dtype: str | None = None) -> list[list[int]]:
    engine = Engine(make_runner(model, num_slots=len(prompts), max_len=max(map(len, prompts)) + new_tokens,
                                kv_dtype=kv_dtype), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return [c.token_ids for c in engine.generate([list(p) for p in prompts], params)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="builtin")
    p.add_argument("--draft", default="builtin")
    add_corpus_args(p)
    p.add_argument("--group-size", type=int, default=128, help="int4 entries per scale (at most; see quant.int4_group)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--agreement-tokens", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip-draft", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="auto",
                   help="int8: also measure every weight precision with an int8 KV cache")
    p.add_argument("--weights", nargs="+", choices=("float32", "int8", "int4"), default=["float32", "int8", "int4"],
                   help="weight precisions of the target to measure (float32 is always the reference)")
    args = p.parse_args(argv)

    _, heldout = corpus_from_args(args).split()

    def load(name, role, mode):
        model, tok = load_any(name, role=role)
        if mode is not None:
            from jaxspec.models.quant import quantize_model

            quantize_model(model, mode, args.group_size)
        return model, tok

    results: dict = {"group_size": args.group_size, "target": {}, "draft": {}}
    reference = None
    kv_modes = [None] + ([args.kv_cache_dtype] if args.kv_cache_dtype != "auto" else [])
    runs = [(mode, kv) for mode in PRECISIONS for kv in kv_modes
            if (mode or "float32") in args.weights or (mode is None and kv is None)]
    for mode, kv in runs:
        name = (mode or "float32") + (f"+kv-{kv}" if kv else "")
        model, tokenizer = load(args.target, "target", mode)
        seq_len = model.cfg.max_seq_len
        if kv is None:
            bpb = heldout_bits_per_byte(model, tokenizer, heldout, seq_len, args.batch_size)["bits_per_byte"]
        else:
            bpb = kv_bits_per_byte(model, tokenizer, heldout, seq_len, args.batch_size, kv)
        windows = eval_windows(encode_documents(tokenizer, heldout), seq_len, model.cfg.pad_id)
        rows = -(-args.agreement_tokens // seq_len)
        choices = teacher_forced_choices(model, windows.inputs[:rows], kv)[windows.mask[:rows]][: args.agreement_tokens]
        prompts = corpus_prompts(heldout, tokenizer, args.prompts, args.prompt_tokens, args.seed)
        outs = greedy(model, tokenizer, prompts, args.new_tokens, kv)
        if reference is None:
            reference = choices, outs
        ref_choices, ref_outs = reference
        same = [np.asarray(o) == np.asarray(r) for o, r in zip(outs, ref_outs)]
        row = {
            "bits_per_byte": bpb,
            "teacher_forced_agreement": float(np.mean(choices == ref_choices)),
            "teacher_forced_tokens": int(len(choices)),
            "greedy_agreement": float(np.mean(np.concatenate(same))),
            "greedy_tokens": int(sum(len(o) for o in outs)),
            "greedy_tokens_before_first_difference": float(np.mean([np.argmin(s) if not s.all() else len(s) for s in same])),
        }
        results["target"][name] = row
        print(name, json.dumps(row), flush=True)
    if not args.skip_draft:
        target, tokenizer = load(args.target, "target", None)
        prompts = corpus_prompts(heldout, tokenizer, args.prompts, args.prompt_tokens, args.seed)
        for mode in PRECISIONS:
            draft, _ = load(args.draft, "draft", mode)
            acc = measure_acceptance(target, draft, tokenizer, prompts, args.k, args.new_tokens,
                                     max_len=args.prompt_tokens + args.new_tokens)
            row = {key: acc[key] for key in ("acceptance_rate", "mean_acceptance_length", "acceptance_per_position",
                                             "generated_tokens")}
            results["draft"][mode or "float32"] = row
            print("draft", mode or "float32", json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
