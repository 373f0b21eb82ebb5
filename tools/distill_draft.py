"""Distil a dense draft model from a target (any pair that shares a tokenizer).

    python tools/distill_draft.py --target jaxspec/assets/target --draft builtin-draft \\
        --run-dir runs/draft --out jaxspec/assets/draft --steps 1200

- target: an orbax model directory or Hugging Face folder (jaxspec.loading.load_any);
- draft: a config name / JSON path (fresh weights; vocabulary and special ids taken
  from the target's tokenizer) or an existing draft directory to continue from;
- data: prompts from --prompts (text lines or JSONL "prompt"/"text") or cut from the
  corpus' training split, continued by the target through the engine (a
  --sampled-fraction sampled at --temperature, the rest greedy); cached in
  RUN_DIR/data so a resumed run trains on the same sequences;
- loss (--loss): forward KL, total variation, or both, against the target's full
  next-token distribution at every position;
- reports greedy acceptance (k = --k) on held-out prompts before and after, in
  RUN_DIR/distill_report.json and OUT/distill_report.json;
- resumable like tools/train.py (RUN_DIR/checkpoints, metrics.jsonl, --stop-after).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspec.checkpoint import CheckpointError as ModelDirError
from jaxspec.checkpoint import save_model
from jaxspec.config import ConfigError, load_config
from jaxspec.loading import load_any
from jaxspec.training.acceptance import measure_acceptance
from jaxspec.training.corpus import add_corpus_args, corpus_from_args
from jaxspec.training.data import tokenizer_fingerprint
from jaxspec.training.distill import (
    DistillData,
    corpus_prompts,
    distill_step,
    evaluate_divergences,
    file_prompts,
    generate_continuations,
)
from jaxspec.training.loop import LoopConfig, run_loop
from jaxspec.training.losses import DISTILL_LOSSES
from jaxspec.training.runs import config_for_tokenizer, environment, write_json
from jaxspec.training.state import (
    CheckpointError,
    OptimConfig,
    RunCheckpointer,
    check_resume_compatible,
    commit,
    init_state,
    model_from_params,
    new_model,
)

# Measured (jaxspec/training/README.md): kl and kl+tv tie on greedy acceptance (3.61 tokens per
# verification) and both beat tv alone (1.84); kl+tv leaves the lower total variation, i.e. the
# higher acceptance of sampled drafts (1 - TV), so it is the default.
DEFAULT_LOSS = "kl+tv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target model directory (orbax or Hugging Face)")
    p.add_argument("--draft", required=True, help="draft config name / JSON path, or a draft model directory")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", default=None, help="export the distilled draft directory here")
    p.add_argument("--prompts", default=None, help="prompt file (text lines or JSONL); default: cut from --corpus")
    add_corpus_args(p)
    p.add_argument("--num-prompts", type=int, default=512, help="training sequences to generate")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="target continuation length")
    p.add_argument("--sampled-fraction", type=float, default=0.5, help="share of sampled (vs greedy) continuations")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--gen-slots", type=int, default=8, help="engine slots used to generate continuations")
    p.add_argument("--loss", choices=DISTILL_LOSSES, default=DEFAULT_LOSS)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--moe-backend", default=None, help="expert dispatch backend of the target's forward")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for acceptance / divergences")
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="draft tokens per verification for the acceptance figures")
    p.add_argument("--no-acceptance", action="store_true", help="skip the before/after acceptance runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="held-out divergences every N steps (0: at the end)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step without export (tests)")
    return p


def _load_draft(spec: str, tokenizer, target_cfg, seed: int):
    path = Path(spec)
    if path.is_dir():
        draft, draft_tok = load_any(spec)
        if tokenizer_fingerprint(draft_tok) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"draft {spec} has a different tokenizer from the target")
        return draft
    cfg = config_for_tokenizer(load_config(spec), tokenizer)
    if cfg.vocab_size != target_cfg.vocab_size:
        raise ConfigError(f"tokenizer has {cfg.vocab_size} ids, the target {target_cfg.vocab_size}")
    return new_model(cfg, seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target, tokenizer = load_any(args.target)
        draft = _load_draft(args.draft, tokenizer, target.cfg, args.seed)
        corpus = corpus_from_args(args)
    except (ConfigError, ModelDirError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # One cache length and slot count for every engine here (generation, acceptance before and
    # after), so they share their compiled steps.
    engine_len = args.prompt_tokens + max(args.new_tokens, args.eval_new_tokens)
    for m in (target, draft):
        if engine_len > m.cfg.max_seq_len:
            print(f"error: prompt + new tokens = {engine_len} exceeds {m.cfg.name}'s max_seq_len "
                  f"{m.cfg.max_seq_len}", file=sys.stderr)
            return 2
    run_dir = Path(args.run_dir)
    train_docs, heldout_docs = corpus.split()
    t_data = time.perf_counter()
    train_path, heldout_path = run_dir / "data" / "distill_train.npz", run_dir / "data" / "distill_heldout.npz"
    gen_info = run_dir / "data" / "generation.json"
    if train_path.exists() and heldout_path.exists() and gen_info.exists():
        data, heldout = DistillData.load(train_path), DistillData.load(heldout_path)
        eval_prompts = heldout.prompts()
        gen_seconds = float(json.loads(gen_info.read_text())["seconds"])
        print(f"reusing {len(data.lengths)} generated sequences from {train_path.parent}")
    else:
        prompts = (file_prompts(args.prompts, tokenizer, args.prompt_tokens)[: args.num_prompts] if args.prompts
                   else corpus_prompts(train_docs, tokenizer, args.num_prompts, args.prompt_tokens, args.seed))
        eval_prompts = corpus_prompts(heldout_docs or train_docs, tokenizer, args.eval_prompts, args.prompt_tokens,
                                      args.seed + 1)
        print(f"generating {len(prompts)} + {len(eval_prompts)} target continuations of {args.new_tokens} tokens")
        data = generate_continuations(target, tokenizer, prompts, args.new_tokens, args.sampled_fraction,
                                      args.temperature, args.seed, args.gen_slots, target.cfg.pad_id, engine_len)
        heldout = generate_continuations(target, tokenizer, eval_prompts, args.eval_new_tokens,
                                         args.sampled_fraction, args.temperature, args.seed + 1, args.gen_slots,
                                         target.cfg.pad_id, engine_len)
        data.save(train_path)
        heldout.save(heldout_path)
        gen_seconds = time.perf_counter() - t_data
        write_json(gen_info, {"seconds": gen_seconds})  # written last: marks the cached data complete

    optim = OptimConfig(
        lr=args.lr, total_steps=args.steps,
        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
    )
    target_graphdef, target_state = nnx.split(target)
    target_params = commit(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), nnx.to_pure_dict(target_state)))
    draft_graphdef, state = init_state(draft, optim)

    identity = {
        "kind": "distill", "target": str(Path(args.target).absolute()), "target_config": target.cfg.to_dict(),
        "draft_config": draft.cfg.to_dict(), "draft_init": args.draft, "loss": args.loss, "seed": args.seed,
        "steps": args.steps, "data": data.digest(),
    }
    checkpointer = RunCheckpointer(run_dir)
    data_position, prior_seconds = 0, 0.0
    before_path = run_dir / "acceptance_before.json"
    try:
        restored = checkpointer.restore(state)
        if restored is not None:
            state, meta = restored
            check_resume_compatible(meta, identity)
            data_position, prior_seconds = int(meta["data_position"]), float(meta.get("train_seconds", 0.0))
            print(f"resuming {run_dir} at step {int(state.step)}, data position {data_position} sequences")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    eval_bs = min(args.batch_size, len(heldout.lengths))

    def eval_fn(st) -> dict[str, float]:
        return evaluate_divergences(target_graphdef, draft_graphdef, args.moe_backend, target_params, st.params,
                                    heldout, eval_bs)

    if not before_path.exists():
        before = {"divergences": eval_fn(state)}
        if not args.no_acceptance:
            before["acceptance"] = measure_acceptance(target, model_from_params(draft_graphdef, state.params),
                                                      tokenizer, eval_prompts, args.k, args.eval_new_tokens,
                                                      args.gen_slots, engine_len)
        write_json(before_path, before)
    before = json.loads(before_path.read_text())
    _print_figures("before", before)

    t0 = time.perf_counter()

    def meta_fn(position: int) -> dict:
        return {**identity, "data_position": position, "train_seconds": prior_seconds + time.perf_counter() - t0}

    tokens_per_example = data.tokens.shape[1]
    loop_cfg = LoopConfig(
        total_steps=args.steps, batch_size=args.batch_size, tokens_per_example=tokens_per_example,
        save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
        stop_after=args.stop_after, desc=f"distill {draft.cfg.name}",
    )
    step_fn = functools.partial(distill_step, target_graphdef, draft_graphdef, optim, args.loss, args.moe_backend,
                                target_params)
    result = run_loop(state, data_position, step_fn, lambda pos, n: data.batch(pos, n, args.seed), loop_cfg,
                      checkpointer, meta_fn, run_dir / "metrics.jsonl", eval_fn=eval_fn)
    checkpointer.close()
    if result.stopped_early:
        print(f"stopped at step {int(result.state.step)} (data position {result.data_position}); rerun to resume")
        return 0

    final_draft = model_from_params(draft_graphdef, result.state.params)
    after = {"divergences": result.last_eval or eval_fn(result.state)}
    if not args.no_acceptance:
        after["acceptance"] = measure_acceptance(target, final_draft, tokenizer, eval_prompts, args.k,
                                                 args.eval_new_tokens, args.gen_slots, engine_len)
    _print_figures("after", after)
    report = {
        "target": str(Path(args.target).absolute()),
        "target_params": target.cfg.param_counts(),
        "draft_config": draft.cfg.to_dict(),
        "draft_params": draft.cfg.param_counts(),
        "active_param_ratio": target.cfg.param_counts()["active"] / draft.cfg.param_counts()["active"],
        "loss": args.loss,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sequences": int(len(data.lengths)),
        "sampled_fraction": args.sampled_fraction,
        "temperature": args.temperature,
        "tokens_seen": args.steps * args.batch_size * tokens_per_example,
        "generation_seconds": gen_seconds,
        "train_seconds": prior_seconds + time.perf_counter() - t0,
        "final_train": result.last_log,
        "before": before,
        "after": after,
        "optimizer": vars(optim),
        "environment": environment(),
    }
    write_json(run_dir / "distill_report.json", report)
    if args.out:
        out = save_model(args.out, final_draft, tokenizer)
        write_json(out / "distill_report.json", report)
        print(f"exported {out}")
    return 0


def _print_figures(label: str, figures: dict) -> None:
    d = figures["divergences"]
    line = f"{label}: KL {d['eval_kl']:.4f}, TV {d['eval_tv']:.4f}, argmax agreement {d['eval_agree']:.3f}"
    if "acceptance" in figures:
        a = figures["acceptance"]
        line += (f"; greedy k={a['k']}: acceptance rate {a['acceptance_rate']:.3f}, "
                 f"mean acceptance length {a['mean_acceptance_length']:.3f}")
    print(line)


if __name__ == "__main__":
    sys.exit(main())
