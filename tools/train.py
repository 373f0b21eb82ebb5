"""Train a (MoE or dense) decoder on a text corpus and export a jaxspec model directory.

    python tools/train.py --config builtin-target --tokenizer jaxspec/assets/tokenizer \\
        --run-dir runs/target --out jaxspec/assets/target --steps 3000

- data: the corpus' training split (jaxspec.training.corpus) tokenized into one
  stream of [bos] doc [eos] documents, cut into packed windows of --seq-len;
  seeded epoch order (jaxspec.training.data);
- loss: cross entropy + --aux-weight * load-balancing loss + --z-weight * router
  z-loss; optional training-only --capacity-factor (jaxspec.training.lm);
- optimizer: AdamW, linear warm-up then cosine decay, global-norm clipping;
- logs loss, tokens/s and expert balance (max/mean tokens per expert, per layer)
  to the progress bar and RUN_DIR/metrics.jsonl; held-out loss and bits per byte
  every --eval-every steps;
- resumable: RUN_DIR/checkpoints keeps params, optimizer state, step and data
  position; rerunning the same command continues a killed run (SIGTERM / Ctrl-C
  save first; a hard kill loses at most --save-every steps);
- at the end: OUT (config.json with the tokenizer's vocabulary and ids, params/,
  the tokenizer, training_report.json).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np

from jaxspec.checkpoint import save_model
from jaxspec.config import ConfigError, load_config
from jaxspec.training.corpus import add_corpus_args, corpus_fingerprint, corpus_from_args
from jaxspec.training.data import (
    PackedWindows,
    cached_stream,
    eval_windows,
    token_byte_lengths,
    tokenizer_fingerprint,
)
from jaxspec.training.lm import LMLossConfig, evaluate_nll, train_step
from jaxspec.training.loop import LoopConfig, mean_scalars, run_loop
from jaxspec.training.losses import expert_balance
from jaxspec.training.runs import config_for_tokenizer, environment, load_tokenizer_arg, write_json
from jaxspec.training.state import (
    CheckpointError,
    OptimConfig,
    RunCheckpointer,
    check_resume_compatible,
    init_state,
    model_from_params,
    new_model,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model config name (configs/models) or JSON path")
    p.add_argument("--tokenizer", default=None, help="directory with tokenizer.model (default: byte tokenizer)")
    add_corpus_args(p)
    p.add_argument("--run-dir", required=True, help="checkpoints, token caches and metrics.jsonl (resumes from it)")
    p.add_argument("--out", default=None, help="export the trained model directory here")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps (the schedule's length)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--z-weight", type=float, default=1e-3, help="router z-loss weight")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="drop expert assignments beyond capacity while training (default: dropless)")
    p.add_argument("--moe-backend", default=None, help="expert dispatch backend for training (default: config's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=500, help="0: evaluate only at the end")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="held-out windows for periodic evaluations (0: all; the final one always uses all)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step without a final save or export (simulates a killed run; tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer_arg(args.tokenizer)
        cfg = config_for_tokenizer(load_config(args.config), tokenizer)
        corpus = corpus_from_args(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seq_len > cfg.max_seq_len:
        print(f"error: --seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    train_docs, heldout_docs = corpus.split()
    if not heldout_docs:
        print("error: the corpus has no held-out document (add files; ~1 in 20 is held out)", file=sys.stderr)
        return 2
    train_stream = cached_stream(tokenizer, train_docs, run_dir / "data" / "train_tokens.npy")
    heldout_stream = cached_stream(tokenizer, heldout_docs, run_dir / "data" / "heldout_tokens.npy")
    windows = PackedWindows(train_stream, args.seq_len, args.seed)
    heldout = eval_windows(heldout_stream, args.seq_len, cfg.pad_id)
    byte_len = token_byte_lengths(tokenizer)

    optim = OptimConfig(
        lr=args.lr, total_steps=args.steps,
        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
    )
    lc = LMLossConfig(args.aux_weight, args.z_weight, args.capacity_factor, args.moe_backend)
    graphdef, state = init_state(new_model(cfg, args.seed), optim)

    # Anything that would silently change the run if it differed on resume.
    identity = {
        "kind": "lm", "config": cfg.to_dict(), "seed": args.seed, "seq_len": args.seq_len, "steps": args.steps,
        "corpus": corpus_fingerprint(train_docs), "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    checkpointer = RunCheckpointer(run_dir)
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

    counts = cfg.param_counts()
    moe_layers = [i for i in range(cfg.num_layers) if cfg.layer_is_moe(i)]
    print(f"model {cfg.name}: {counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active per token")
    print(f"data: {len(train_stream)} training tokens ({windows.num_windows} windows of {args.seq_len}), "
          f"{len(heldout_stream)} held-out tokens; {args.steps * args.batch_size / windows.num_windows:.2f} epochs")

    def eval_fn(st, limit: int | None = None) -> dict[str, float]:
        w = heldout if not limit else type(heldout)(*(a[:limit] for a in heldout))
        r = evaluate_nll(graphdef, st.params, w, args.eval_batch_size, args.moe_backend)
        nbytes = int(byte_len[w.targets[w.mask]].sum())
        out = {"eval_loss": r["nll_sum"] / r["tokens"], "eval_bpb": r["nll_sum"] / math.log(2) / nbytes}
        if moe_layers:
            balance = expert_balance(r["expert_load"], moe_layers)
            out["eval_balance_max"] = max(balance)
            out.update({f"eval_balance_l{layer}": b for layer, b in zip(moe_layers, balance)})
        return out

    def summarize(metrics: list[dict]) -> dict[str, float]:
        out = mean_scalars(metrics)
        if moe_layers:
            balance = expert_balance(np.sum([m["expert_load"] for m in metrics], axis=0), moe_layers)
            out["balance_max"] = max(balance)
            out.update({f"balance_l{layer}": b for layer, b in zip(moe_layers, balance)})
        return out

    t0 = time.perf_counter()

    def meta_fn(position: int) -> dict:
        return {**identity, "data_position": position, "train_seconds": prior_seconds + time.perf_counter() - t0}

    loop_cfg = LoopConfig(
        total_steps=args.steps, batch_size=args.batch_size, tokens_per_example=args.seq_len,
        save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
        stop_after=args.stop_after, desc=cfg.name,
    )
    result = run_loop(
        state, data_position, functools.partial(train_step, graphdef, optim, lc),
        lambda pos, n: windows.batch(pos, n), loop_cfg, checkpointer, meta_fn, run_dir / "metrics.jsonl",
        eval_fn=lambda st: eval_fn(st, args.eval_windows) if int(st.step) < args.steps else eval_fn(st),
        summarize=summarize,
    )
    checkpointer.close()
    if result.stopped_early:
        print(f"stopped at step {int(result.state.step)} (data position {result.data_position}); rerun to resume")
        return 0

    final_eval = result.last_eval or eval_fn(result.state)  # the loop's final evaluation covers every window
    report = {
        "config": cfg.to_dict(),
        "params": counts,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "epochs": args.steps * args.batch_size / windows.num_windows,
        "train_seconds": prior_seconds + time.perf_counter() - t0,
        "final_train": result.last_log,
        "heldout": {**final_eval, "tokens": int(heldout.mask.sum()),
                    "bytes": int(byte_len[heldout.targets[heldout.mask]].sum())},
        "expert_balance_per_layer": [final_eval[f"eval_balance_l{layer}"] for layer in moe_layers],
        "optimizer": vars(optim),
        "loss": vars(lc),
        "corpus": corpus.describe(),
        "environment": environment(),
    }
    write_json(run_dir / "training_report.json", report)
    if args.out:
        out = save_model(args.out, model_from_params(graphdef, result.state.params), tokenizer)
        write_json(out / "training_report.json", report)
        print(f"exported {out}")
    print(f"held-out: loss {final_eval['eval_loss']:.4f} nats/token, {final_eval['eval_bpb']:.4f} bits/byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
