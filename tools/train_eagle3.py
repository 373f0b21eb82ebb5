"""Train an EAGLE-3 head for a target on a corpus; export it in the speculators layout.

    python tools/train_eagle3.py --target builtin --run-dir runs/eagle3 --out jaxspec/assets/eagle3 --steps 1500

- target: ``builtin`` (the shipped MoE target) or a model directory (orbax or Hugging Face);
- corpus: ``--corpus`` folder or JSONL (``"text"``), the fixed train / held-out split of
  ``jaxspec.training.corpus``; the head trains on windows of ``--seq-len`` tokens of the training
  split, against the target's own distributions (``jaxspec.training.eagle3``);
- features: computed by the target inside each step, or once into ``--feature-cache DIR``
  (``--cache-windows`` of them) and read from there;
- target continuations (``--continuations N``): N prompts cut from the training split continued by
  the target through the engine (a ``--sampled-fraction`` sampled at ``--temperature``, the rest
  greedy; cached in RUN_DIR/data); every batch is then half corpus windows, half continuations,
  so the head also sees the text the target itself writes, which is what it drafts at serving;
- draft vocabulary: the ``--draft-vocab`` most frequent ids of the training split (eos always in);
- ``--init HEAD_DIR``: start from a trained head (its shape, layers and draft vocabulary);
- training-time test: ``--ttt-steps`` unrolled drafting steps per position, weighted
  ``--step-decay ** j``;
- resumable: checkpoints in RUN_DIR/checkpoints every ``--save-every`` steps, and on SIGTERM /
  Ctrl-C; ``--resume`` continues the run in RUN_DIR (a run directory with checkpoints is refused
  without it); ``--stop-after`` stops early without export (tests);
- figures: held-out KL / argmax agreement per unrolled step, and greedy acceptance per position
  through the engine for k in ``--ks`` on held-out prompts, before and after (RUN_DIR/report.json,
  OUT/train_report.json); ``--compare-draft`` measures a draft model the same way beside it, and
  ``--cost`` each drafter's drafting time per token at batch 1;
- ``--evaluate HEAD_DIR``: no training, the same figures for a trained head (``--throughput``
  adds end-to-end greedy tokens/s at batch 1 of plain decoding, the head and ``--compare-draft``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxspec.builtin import is_builtin, resolve
from jaxspec.checkpoint import CheckpointError as ModelDirError
from jaxspec.checkpoint.eagle3_io import load_eagle3, save_eagle3
from jaxspec.config import ConfigError
from jaxspec.loading import load_any
from jaxspec.training.corpus import add_corpus_args, corpus_from_args
from jaxspec.training.data import PackedWindows, cached_stream, tokenizer_fingerprint
from jaxspec.training.distill import DistillData, corpus_prompts, generate_continuations
from jaxspec.training.eagle3 import (
    Eagle3TrainConfig,
    FeatureCache,
    TargetBatch,
    draft_vocab_mapping,
    evaluate,
    frozen_inputs,
    head_config_for,
    heldout_windows,
    init_head_state,
    merge_head,
    new_head,
    token_counts,
    train_step,
    vocab_coverage,
)
from jaxspec.training.eagle3_eval import (acceptance_sweep, batch1_throughput, drafting_cost, drafting_costs,
                                         format_table)
from jaxspec.training.loop import LoopConfig, run_loop
from jaxspec.training.runs import environment, write_json
from jaxspec.training.state import CheckpointError, OptimConfig, RunCheckpointer, check_resume_compatible


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="builtin", help="'builtin' or a target model directory")
    p.add_argument("--run-dir", default="runs/eagle3")
    p.add_argument("--out", default=None, help="export the trained head here (speculators layout)")
    add_corpus_args(p)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (required unless --evaluate)")
    p.add_argument("--evaluate", default=None, metavar="HEAD_DIR",
                   help="no training: measure this head (acceptance for --ks, and with --compare-draft, --cost, "
                        "--throughput the draft, drafting cost and batch-1 speed) and write --report")
    p.add_argument("--report", default=None, help="with --evaluate: write the figures to this JSON file")
    p.add_argument("--throughput", action="store_true",
                   help="with --evaluate: end-to-end greedy tokens/s at batch 1 (plain, head, --compare-draft)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--ttt-steps", type=int, default=6, help="unrolled drafting steps trained per position")
    p.add_argument("--step-decay", type=float, default=0.8, help="loss weight of unrolled step j: decay ** j")
    p.add_argument("--draft-vocab", type=int, default=2048, help="draft vocabulary size (most frequent ids)")
    p.add_argument("--aux-layers", default=None,
                   help="comma-separated target layer ids whose input hidden states the head fuses "
                        "(0 = embeddings, L = last layer's output); default low, middle, high")
    p.add_argument("--mlp-dim", type=int, default=None, help="the head's MLP width (default: the target's mlp_dim)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--moe-backend", default=None, help="the target's expert dispatch backend")
    p.add_argument("--feature-cache", default=None, help="cache the target's features for training here")
    p.add_argument("--cache-windows", type=int, default=None, help="training windows to cache (default all)")
    p.add_argument("--cache-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--continuations", type=int, default=0, help="target continuations to train on beside the "
                   "corpus windows (0: corpus windows only)")
    p.add_argument("--continuation-tokens", type=int, default=128, help="tokens the target writes per continuation")
    p.add_argument("--sampled-fraction", type=float, default=0.5, help="share of sampled (vs greedy) continuations")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gen-slots", type=int, default=8, help="engine slots used to generate continuations")
    p.add_argument("--init", default=None, help="start from this trained head folder (either layout)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the per-step figures")
    p.add_argument("--ks", default="1,2,3,4,5,6", help="draft lengths for the acceptance figures")
    p.add_argument("--acceptance-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-seed", type=int, default=1234, help="which held-out prompts are cut "
                   "(1234: the prompts of the built-in model card)")
    p.add_argument("--no-acceptance", action="store_true", help="skip the engine acceptance runs")
    p.add_argument("--no-before-acceptance", action="store_true",
                   help="skip the acceptance runs before training (e.g. with --init, when they are known)")
    p.add_argument("--compare-draft", default=None, help="also measure this draft model ('builtin' or a path)")
    p.add_argument("--cost", action="store_true", help="measure drafting time per token (batch 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="held-out figures every N steps (0: at the end)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step without export (tests)")
    return p


def _ks(text: str) -> list[int]:
    ks = sorted({int(x) for x in text.split(",") if x.strip()})
    if not ks or ks[0] < 1:
        raise ValueError(f"--ks needs positive integers, got {text!r}")
    return ks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.evaluate:
        return evaluate_head(args)
    if args.steps is None:
        print("error: --steps is required (or --evaluate HEAD_DIR)", file=sys.stderr)
        return 2
    try:
        target_dir = resolve(args.target, "target")
        target, tokenizer = load_any(target_dir)
        corpus = corpus_from_args(args)
        ks = _ks(args.ks)
        aux = tuple(int(x) for x in args.aux_layers.split(",")) if args.aux_layers else None
    except (ConfigError, ModelDirError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    checkpointer = RunCheckpointer(run_dir)
    if checkpointer.latest_step() is not None and not args.resume:
        print(f"error: {run_dir} already holds checkpoints: pass --resume, or use a new --run-dir", file=sys.stderr)
        return 2

    train_docs, heldout_docs = corpus.split()
    stream = cached_stream(tokenizer, train_docs, run_dir / "data" / "train_stream.npy")
    held_stream = cached_stream(tokenizer, heldout_docs or train_docs, run_dir / "data" / "heldout_stream.npy")
    counts = token_counts(stream, target.cfg.vocab_size)
    draft_vocab = min(args.draft_vocab, target.cfg.vocab_size)
    d2t, _ = draft_vocab_mapping(counts, draft_vocab, required=tokenizer.eos_ids)
    coverage = {"train": vocab_coverage(counts, d2t),
                "heldout": vocab_coverage(token_counts(held_stream, target.cfg.vocab_size), d2t)}
    print(f"draft vocabulary: {draft_vocab} of {target.cfg.vocab_size} ids, covering {coverage['train']:.4f} of "
          f"the training tokens, {coverage['heldout']:.4f} held out")
    try:
        if args.init:
            head = load_eagle3(args.init, target=target.cfg)
            head_cfg = head.cfg.replace(name="eagle3-" + target.cfg.name, speculative_tokens=args.ttt_steps)
            head.cfg = head_cfg
            d2t = np.asarray(head.d2t[...], np.int64)
            draft_vocab = head_cfg.draft_vocab_size
            coverage = {"train": vocab_coverage(counts, d2t),
                        "heldout": vocab_coverage(token_counts(held_stream, target.cfg.vocab_size), d2t)}
            print(f"starting from {args.init} (its draft vocabulary of {draft_vocab}, covering "
                  f"{coverage['train']:.4f} of the training tokens)")
        else:
            head_cfg = head_config_for(target.cfg, draft_vocab, aux_layers=aux, mlp_dim=args.mlp_dim,
                                       name="eagle3-" + target.cfg.name, speculative_tokens=args.ttt_steps)
            head = new_head(target, head_cfg, d2t, args.seed)
        tcfg = Eagle3TrainConfig(ttt_steps=args.ttt_steps, step_decay=args.step_decay, moe_backend=args.moe_backend)
        if args.continuations and args.feature_cache:
            raise ValueError("--continuations and --feature-cache do not combine (the cache holds corpus windows)")
        if args.continuations and (args.batch_size % 2 or args.seq_len < args.prompt_tokens + args.continuation_tokens):
            raise ValueError("--continuations needs an even --batch-size and --seq-len >= --prompt-tokens + "
                             "--continuation-tokens")
    except (ConfigError, ModelDirError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"head: D {head_cfg.hidden_size}, MLP {head_cfg.mlp_dim}, aux layers {list(head_cfg.aux_layers)}, "
          f"{sum(np.size(x) for x in _param_leaves(head)) / 1e6:.2f}M parameters")

    optim = OptimConfig(lr=args.lr, total_steps=args.steps,
                        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
                        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    head_graphdef, buffers, state = init_head_state(head, optim)
    target_graphdef, frozen = frozen_inputs(target, buffers, d2t)
    windows = PackedWindows(stream, args.seq_len, args.seed)
    identity = {
        "kind": "eagle3", "target": str(Path(target_dir).absolute()), "target_config": target.cfg.to_dict(),
        "head_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(head_cfg).items()},
        "tokenizer": tokenizer_fingerprint(tokenizer), "train_tokens": int(len(stream)),
        "d2t": [int(x) for x in d2t[:8]] + [int(d2t.sum())], "seq_len": args.seq_len, "ttt_steps": args.ttt_steps,
        "step_decay": args.step_decay, "seed": args.seed, "steps": args.steps, "lr": args.lr,
        "batch_size": args.batch_size, "feature_cache": bool(args.feature_cache), "init": args.init,
        "continuations": args.continuations,
    }
    data_position, prior_seconds = 0, 0.0
    try:
        restored = checkpointer.restore(state)
        if restored is not None:
            state, meta = restored
            check_resume_compatible(meta, identity)
            data_position, prior_seconds = int(meta["data_position"]), float(meta.get("train_seconds", 0.0))
            print(f"resuming {run_dir} at step {int(state.step)}, data position {data_position} windows")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.feature_cache:
        cache = FeatureCache.build(args.feature_cache, target, head_cfg.aux_layers, windows, args.cache_windows,
                                   args.cache_dtype, args.batch_size, args.moe_backend)
        print(f"feature cache {args.feature_cache}: {len(cache)} windows of {args.seq_len} tokens")
        batch_fn = functools.partial(_cached_batch, cache, args.seed)
    else:
        batch_fn = functools.partial(_live_batch, windows)
    if args.continuations:
        gen = _continuations(args, target, tokenizer, train_docs, run_dir)
        batch_fn = functools.partial(_mixed_batch, batch_fn, gen, args.seed)

    eval_windows = heldout_windows(held_stream, args.seq_len, args.eval_windows)
    eval_bs = min(args.batch_size, len(eval_windows))

    def eval_fn(st) -> dict[str, float]:
        return evaluate(target_graphdef, head_graphdef, tcfg, frozen, st.params, eval_windows, eval_bs)

    prompts = corpus_prompts(heldout_docs or train_docs, tokenizer, args.acceptance_prompts, args.prompt_tokens,
                             args.prompt_seed)
    max_len = args.prompt_tokens + args.new_tokens

    def figures(st, acceptance: bool = True) -> dict:
        out = {"heldout": eval_fn(st)}
        if acceptance and not args.no_acceptance:
            out["acceptance"] = acceptance_sweep(target, "eagle3", merge_head(head_graphdef, st.params, buffers),
                                                 tokenizer, prompts, ks, args.new_tokens, max_len=max_len)
        return out

    before_path = run_dir / "figures_before.json"
    if not before_path.exists():
        write_json(before_path, figures(state, not args.no_before_acceptance))
    before = json.loads(before_path.read_text())
    _print_figures("before", before)

    t0 = time.perf_counter()

    def meta_fn(position: int) -> dict:
        return {**identity, "data_position": position, "train_seconds": prior_seconds + time.perf_counter() - t0}

    loop_cfg = LoopConfig(total_steps=args.steps, batch_size=args.batch_size, tokens_per_example=args.seq_len,
                          save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
                          stop_after=args.stop_after, desc=f"eagle3 {target.cfg.name}")
    step_fn = functools.partial(train_step, target_graphdef, head_graphdef, tcfg, optim, frozen)
    result = run_loop(state, data_position, step_fn, batch_fn, loop_cfg, checkpointer, meta_fn,
                      run_dir / "metrics.jsonl", eval_fn=eval_fn)
    checkpointer.close()
    if result.stopped_early:
        print(f"stopped at step {int(result.state.step)} (data position {result.data_position}); "
              "rerun with --resume to continue")
        return 0
    train_seconds = prior_seconds + time.perf_counter() - t0

    final = merge_head(head_graphdef, result.state.params, buffers)
    after = {"heldout": result.last_eval or eval_fn(result.state)}
    if not args.no_acceptance:
        after["acceptance"] = acceptance_sweep(target, "eagle3", final, tokenizer, prompts, ks, args.new_tokens,
                                               max_len=max_len)
    _print_figures("after", after)
    report = {
        "target": str(Path(target_dir).absolute()) if not is_builtin(args.target) else args.target,
        "head_config": identity["head_config"], "corpus": corpus.describe(),
        "draft_vocab_coverage": coverage,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "ttt_steps": args.ttt_steps,
        "step_decay": args.step_decay, "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_seconds": train_seconds, "final_train": result.last_log, "before": before, "after": after,
        "acceptance_prompts": {"count": len(prompts), "prompt_tokens": args.prompt_tokens,
                               "new_tokens": args.new_tokens, "seed": args.prompt_seed},
        "optimizer": vars(optim), "environment": environment(),
    }
    tables = {}
    if "acceptance" in before:
        tables["eagle3 (before)"] = before["acceptance"]
    if "acceptance" in after:
        tables["eagle3"] = after["acceptance"]
    if args.compare_draft:
        draft, _ = load_any(resolve(args.compare_draft, "draft"), role="draft")
        report["compare_draft"] = {"draft": args.compare_draft}
        if not args.no_acceptance:
            sweep = acceptance_sweep(target, "draft", draft, tokenizer, prompts, ks, args.new_tokens, max_len=max_len)
            report["compare_draft"]["acceptance"] = sweep
            tables[f"draft {draft.cfg.name}"] = sweep
        if args.cost:
            report["compare_draft"]["cost"] = drafting_cost(target, "draft", draft, k=4, max_len=max_len)
    if args.cost:
        report["cost"] = drafting_cost(target, "eagle3", final, k=4, max_len=max_len)
    if tables:
        table = format_table({k: {int(kk): v for kk, v in s.items()} for k, s in tables.items()})
        report["table"] = table
        print(table)
    for name, c in (("eagle3", report.get("cost")), ("draft", report.get("compare_draft", {}).get("cost"))):
        if c:
            extra = (f" ({c['ms_per_token_with_absorb']:.3f} with the absorb in its own call, "
                     f"{c['ms_per_token_step']:.3f} round and absorb in one call as in the fused step)"
                     if "absorb_ms" in c else "")
            print(f"drafting cost {name}: {c['ms_per_token']:.3f} ms per drafted token at k=4{extra}")
    write_json(run_dir / "report.json", report)
    if args.out:
        out = save_eagle3(args.out, final, verifier=report["target"])
        write_json(out / "train_report.json", report)
        print(f"exported {out}")
    return 0


def evaluate_head(args) -> int:
    """``--evaluate HEAD_DIR``: the figures of a trained head (and a draft beside it), no training."""
    try:
        target_dir = resolve(args.target, "target")
        target, tokenizer = load_any(target_dir)
        head = load_eagle3(args.evaluate, target=target.cfg)
        corpus = corpus_from_args(args)
        ks = _ks(args.ks)
    except (ConfigError, ModelDirError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_docs, heldout_docs = corpus.split()
    prompts = corpus_prompts(heldout_docs or train_docs, tokenizer, args.acceptance_prompts, args.prompt_tokens,
                             args.prompt_seed)
    max_len = args.prompt_tokens + args.new_tokens
    drafters = {"eagle3": ("eagle3", head)}
    if args.compare_draft:
        drafters["draft"] = ("draft", load_any(resolve(args.compare_draft, "draft"), role="draft")[0])
    report: dict = {"head": str(Path(args.evaluate).absolute()), "target": args.target,
                    "acceptance_prompts": {"count": len(prompts), "prompt_tokens": args.prompt_tokens,
                                           "new_tokens": args.new_tokens, "seed": args.prompt_seed},
                    "environment": environment()}
    if not args.no_acceptance:
        sweeps = {name: acceptance_sweep(target, method, d, tokenizer, prompts, ks, args.new_tokens, max_len=max_len)
                  for name, (method, d) in drafters.items()}
        report["acceptance"] = sweeps
        print(format_table(sweeps))
    if args.cost:
        report["cost"] = drafting_costs(target, drafters, k=4, max_len=max_len)  # timed in turns
        for name, c in report["cost"].items():
            extra = (f" ({c['ms_per_token_with_absorb']:.3f} with the absorb in its own call, "
                     f"{c['ms_per_token_step']:.3f} round and absorb in one call as in the fused step)"
                     if "absorb_ms" in c else "")
            print(f"drafting cost {name}: {c['ms_per_token']:.3f} ms per drafted token at k=4{extra}")
    if args.throughput:
        report["throughput"] = batch1_throughput(target, drafters, tokenizer, prompts[:4], 4, args.new_tokens)
        for name, r in report["throughput"].items():
            extra = f" ({r['speedup']:.2f}x plain)" if "speedup" in r else ""
            print(f"batch 1, k=4: {name} {r['tokens_per_s']:.1f} tokens/s{extra}")
    if args.report:
        write_json(args.report, report)
    return 0


def _param_leaves(head):
    return jax.tree.leaves(nnx.state(head, nnx.Param))


def _live_batch(windows: PackedWindows, position: int, batch_size: int) -> TargetBatch:
    return TargetBatch(windows.batch(position, batch_size).inputs)


def _cached_batch(cache: FeatureCache, seed: int, position: int, batch_size: int) -> TargetBatch:
    return cache.batch(position, batch_size, seed)


def _continuations(args, target, tokenizer, train_docs, run_dir: Path) -> DistillData:
    """The target's continuations of prompts from the training split, generated once per run directory."""
    path, done = run_dir / "data" / "continuations.npz", run_dir / "data" / "continuations.json"
    if path.exists() and done.exists():
        data = DistillData.load(path)
        print(f"reusing {len(data.lengths)} target continuations from {path}")
        return data
    prompts = corpus_prompts(train_docs, tokenizer, args.continuations, args.prompt_tokens, args.seed)
    print(f"generating {len(prompts)} target continuations of {args.continuation_tokens} tokens")
    t = time.perf_counter()
    data = generate_continuations(target, tokenizer, prompts, args.continuation_tokens, args.sampled_fraction,
                                  args.temperature, args.seed, args.gen_slots, target.cfg.pad_id, args.seq_len)
    data.save(path)
    write_json(done, {"seconds": time.perf_counter() - t, "digest": data.digest()})  # last: marks it complete
    return data


def _mixed_batch(corpus_fn, data: DistillData, seed: int, position: int, batch_size: int) -> TargetBatch:
    """Half corpus windows, half target continuations (each stream at its own position)."""
    half = batch_size // 2
    windows = corpus_fn(position // 2, half)
    gen = data.batch(position // 2, half, seed)
    tokens = np.concatenate([windows.tokens, gen.inputs])
    mask = np.concatenate([np.ones(windows.tokens.shape, bool), gen.mask])
    return TargetBatch(tokens, mask=mask)


def _print_figures(label: str, figures: dict) -> None:
    h = figures["heldout"]
    steps = sorted(int(k.split("_")[-1]) for k in h if k.startswith("eval_acc_"))
    line = f"{label}: held-out loss {h['eval_loss']:.4f}; argmax agreement per unrolled step " + \
        " ".join(f"{h[f'eval_acc_{j}']:.3f}" for j in steps)
    if "acceptance" in figures:
        acc = figures["acceptance"]
        line += "; mean acceptance length " + ", ".join(
            f"k={k}: {acc[k]['mean_acceptance_length']:.2f}" for k in sorted(acc, key=int))
    print(line)


if __name__ == "__main__":
    sys.exit(main())
