"""Rebuild every shipped built-in asset with one command.

    python tools/build_assets.py                  # full size into jaxspec/assets (about 90 min on 2 quiet cores)
    python tools/build_assets.py --scale tiny --out /tmp/assets --work /tmp/work   # smoke test (minutes)
    python tools/build_assets.py --family dense   # the dense pair into jaxspec/assets/dense (about 85 min)

Two families. ``moe`` (the default, ``--model builtin``) trains everything below into
jaxspec/assets. ``dense`` (``--model builtin-dense``) is the dense target of the same
active size (config builtin-dense-target: mlp_dim 768 = 2 active experts x 384) with
a builtin-draft distilled from it, for comparing MoE and dense at equal active
parameters: it reuses the shipped tokenizer (--tokenizer, default
jaxspec/assets/tokenizer; stage 1 is skipped), the same corpus and split and the
same training recipe (steps, batch, sequence length, learning rate, schedule,
distillation), with no load-balancing or router z-loss (a dense model has no
router), and writes jaxspec/assets/dense/{target,draft,eval.json,MODEL_CARD.md}
(work directory runs/build-dense).

Stages (each one a tool that also runs on its own):
  1. tokenizer  tools/train_tokenizer.py  -> OUT/tokenizer/
  2. target     tools/train.py            -> OUT/target/   (config builtin-target, MoE 8 experts top-2)
  3. draft      tools/distill_draft.py    -> OUT/draft/    (config builtin-draft, dense)
  4. eval+card  tools/eval_builtin.py     -> OUT/eval.json, OUT/MODEL_CARD.md

Training state lives in WORK (default runs/build, git-ignored). Interrupted? Run the
same command again: finished stages are skipped (their output holds its report) and
the running one resumes from its last checkpoint. ``--fresh`` deletes WORK and the
four outputs first. The corpus is this interpreter's standard library unless
--corpus says otherwise (see jaxspec/training/corpus.py for what is left out and
the held-out split).

Full-size plan, timed on two quiet cores (jaxspec/training/README.md): target 1000
steps x 8 x 512 tokens (4.1M tokens, ~64 min at the ~1060 tokens/s tools/train.py
reaches), draft 600 steps x 16 x 128 tokens (~9 min at ~2280 tokens/s) after ~6 min
generating its 1536 training continuations, evaluation ~5 min: ~85-90 min in all.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

# Every knob of the build, per scale. "tiny" exercises every stage in minutes (tests).
SCALES: dict[str, dict[str, object]] = {
    "full": {
        "vocab_size": 4096, "target_config": "builtin-target", "draft_config": "builtin-draft",
        "target_steps": 1000, "target_batch": 8, "seq_len": 512, "target_lr": 3e-3,
        "eval_every": 250, "eval_windows": 64, "save_every": 100, "log_every": 10,
        "distill_steps": 600, "distill_batch": 16, "distill_lr": 3e-3, "num_prompts": 1536, "gen_slots": 16,
        "prompt_tokens": 64, "new_tokens": 64, "distill_eval_prompts": 16,
        "eval_prompts": 32, "eval_new_tokens": 128, "speed_prompts": 4, "eval_seq_len": 512, "k": 4,
    },
    "tiny": {
        "vocab_size": 512, "target_config": "tiny-moe", "draft_config": "tiny-dense",
        "target_steps": 20, "target_batch": 4, "seq_len": 32, "target_lr": 1e-2,
        "eval_every": 0, "eval_windows": 0, "save_every": 5, "log_every": 1,
        "distill_steps": 8, "distill_batch": 4, "distill_lr": 1e-2, "num_prompts": 8, "gen_slots": 8,
        "prompt_tokens": 16, "new_tokens": 8, "distill_eval_prompts": 2,
        # k=2: every proposal-length bucket is a compiled step; two buckets keep the smoke test short.
        "eval_prompts": 2, "eval_new_tokens": 8, "speed_prompts": 1, "eval_seq_len": 32, "k": 2,
    },
}
OUTPUTS = ("tokenizer", "target", "draft", "eval.json", "MODEL_CARD.md")

# What a family changes in the plan; everything else (the recipe) is the scale's.
FAMILIES: dict[str, dict[str, dict[str, object]]] = {
    "moe": {"full": {}, "tiny": {}},
    "dense": {"full": {"target_config": "builtin-dense-target"}, "tiny": {"target_config": "tiny-dense"}},
}
# Where each family writes by default, relative to the repository.
FAMILY_OUT = {"moe": Path("jaxspec") / "assets", "dense": Path("jaxspec") / "assets" / "dense"}
FAMILY_WORK = {"moe": Path("runs") / "build", "dense": Path("runs") / "build-dense"}
SHIPPED_TOKENIZER = REPO / "jaxspec" / "assets" / "tokenizer"


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py (tools/ is not a package) so stages share one process and its compile caches."""
    spec = importlib.util.spec_from_file_location(f"jaxspec_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="moe",
                   help="moe: the MoE target (default); dense: the dense target of equal active size, reusing "
                        "the shipped tokenizer")
    p.add_argument("--out", default=None,
                   help="asset directory (default jaxspec/assets; jaxspec/assets/dense for --family dense)")
    p.add_argument("--work", default=None,
                   help="checkpoints and caches (default runs/build; runs/build-dense for --family dense)")
    p.add_argument("--tokenizer", default=None,
                   help=f"--family dense only: the tokenizer directory to reuse (default {SHIPPED_TOKENIZER})")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--fresh", action="store_true", help="delete WORK and the outputs first (a from-scratch build)")
    p.add_argument("--corpus", default="stdlib", help="corpus folder or .jsonl (default: this Python's stdlib)")
    p.add_argument("--glob", default="*.py")
    p.add_argument("--seed", type=int, default=0)
    for key, value in SCALES["full"].items():  # every plan value can be overridden: --target-steps 1500
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                           help=f"override the scale's {key} (full: {value}, tiny: {SCALES['tiny'][key]})")
        else:
            p.add_argument(f"--{key.replace('_', '-')}", default=None, help=f"override the scale's {key}")
    return p


def plan_from_args(args: argparse.Namespace) -> dict[str, object]:
    plan = {**SCALES[args.scale], **FAMILIES[args.family][args.scale]}
    for key in plan:
        value = getattr(args, key)
        if value is not None:
            plan[key] = value
    return plan


def _stage(name: str, argv: list[str], done: bool) -> None:
    if done:
        print(f"== {name}: already built, skipped (use --fresh to rebuild)")
        return
    print(f"== {name}: python tools/{name}.py {shlex.join(argv)}", flush=True)
    t = time.perf_counter()
    code = load_tool(name).main(argv)
    if code != 0:
        raise SystemExit(f"build_assets: stage {name} failed with exit code {code}")
    print(f"== {name}: done in {(time.perf_counter() - t) / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    dense = args.family == "dense"
    if args.tokenizer is not None and not dense:
        raise SystemExit("build_assets: --tokenizer is for --family dense (the moe family trains its own)")
    out = Path(args.out) if args.out else REPO / FAMILY_OUT[args.family]
    work = Path(args.work) if args.work else REPO / FAMILY_WORK[args.family]
    # The dense family reuses a tokenizer that it does not own: --fresh never deletes it.
    tok = Path(args.tokenizer) if args.tokenizer else SHIPPED_TOKENIZER if dense else out / "tokenizer"
    if dense and not (tok / "tokenizer.model").exists():
        raise SystemExit(f"build_assets: no tokenizer.model in {tok} (build the moe family first, or pass --tokenizer)")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
        for name in OUTPUTS:
            if dense and name == "tokenizer":
                continue
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    corpus = ["--corpus", args.corpus, "--glob", args.glob]
    target, draft = out / "target", out / "draft"
    t0 = time.perf_counter()

    if dense:
        print(f"== train_tokenizer: reusing {tok} (family dense)")
    else:
        _stage("train_tokenizer", [*corpus, "--out", str(tok), "--vocab-size", str(plan["vocab_size"]),
                                   "--seed", str(args.seed)],
               done=(tok / "tokenizer.model").exists() and (tok / "tokenizer_report.json").exists())
    # A dense target has no router: its training adds no load-balancing or z-loss (zero weights say so).
    no_router_losses = ["--aux-weight", "0", "--z-weight", "0"] if dense else []
    _stage("train", [
        "--config", str(plan["target_config"]), "--tokenizer", str(tok), *corpus,
        "--run-dir", str(work / "target"), "--out", str(target), "--steps", str(plan["target_steps"]),
        "--batch-size", str(plan["target_batch"]), "--seq-len", str(plan["seq_len"]), "--lr", str(plan["target_lr"]),
        "--eval-every", str(plan["eval_every"]), "--eval-windows", str(plan["eval_windows"]),
        "--save-every", str(plan["save_every"]), "--log-every", str(plan["log_every"]), "--seed", str(args.seed),
        *no_router_losses,
    ], done=(target / "training_report.json").exists())
    _stage("distill_draft", [
        "--target", str(target), "--draft", str(plan["draft_config"]), *corpus,
        "--run-dir", str(work / "draft"), "--out", str(draft), "--steps", str(plan["distill_steps"]),
        "--batch-size", str(plan["distill_batch"]), "--lr", str(plan["distill_lr"]),
        "--num-prompts", str(plan["num_prompts"]), "--prompt-tokens", str(plan["prompt_tokens"]),
        "--new-tokens", str(plan["new_tokens"]), "--eval-prompts", str(plan["distill_eval_prompts"]),
        "--eval-new-tokens", str(plan["new_tokens"]), "--save-every", str(plan["save_every"]),
        "--gen-slots", str(plan["gen_slots"]), "--log-every", str(plan["log_every"]), "--k", str(plan["k"]),
        "--seed", str(args.seed),
    ], done=(draft / "distill_report.json").exists())
    rebuild = shlex.join(["python", "tools/build_assets.py", *(sys.argv[1:] if argv is None else argv)])
    _stage("eval_builtin", [
        "--target", str(target), "--draft", str(draft), "--tokenizer-dir", str(tok), *corpus,
        "--seq-len", str(plan["eval_seq_len"]), "--prompts", str(plan["eval_prompts"]),
        "--prompt-tokens", str(plan["prompt_tokens"]), "--new-tokens", str(plan["eval_new_tokens"]),
        "--speed-prompts", str(plan["speed_prompts"]), "--k", str(plan["k"]), "--card", str(out / "MODEL_CARD.md"),
        "--rebuild-command", rebuild,
    ], done=False)
    print(f"built {out} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
