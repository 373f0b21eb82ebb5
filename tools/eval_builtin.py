"""Evaluate a target/draft pair on the held-out files and write the model card.

    python tools/eval_builtin.py --target jaxspec/assets/target --draft jaxspec/assets/draft \\
        --tokenizer-dir jaxspec/assets/tokenizer --card jaxspec/assets/MODEL_CARD.md

Figures (jaxspec.training.evaluation, jaxspec.training.acceptance):
- target bits per byte on the held-out files vs ``xz -9e`` (lzma preset 9 | EXTREME),
  per file and concatenated;
- draft acceptance: greedy speculative decoding with k = --k on held-out prompts,
  acceptance rate and mean acceptance length (tokens per verification step);
- end-to-end greedy tokens/s at batch 1, plain vs speculative;
- expert load per MoE layer (max/mean tokens per expert) over the held-out files.
Writes --json (default: eval.json beside the card) and, with --card, MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxspec.checkpoint import CheckpointError
from jaxspec.config import ConfigError
from jaxspec.loading import load_any
from jaxspec.training.acceptance import decode_throughput, forward_costs, measure_acceptance
from jaxspec.training.corpus import add_corpus_args, corpus_from_args
from jaxspec.training.data import tokenizer_fingerprint
from jaxspec.training.distill import corpus_prompts
from jaxspec.training.evaluation import heldout_bits_per_byte, xz_bits_per_byte
from jaxspec.training.model_card import render_model_card
from jaxspec.training.runs import environment, write_json

DEFAULT_REBUILD = "python tools/build_assets.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--tokenizer-dir", default=None, help="directory with tokenizer_report.json (for the card)")
    add_corpus_args(p)
    p.add_argument("--seq-len", type=int, default=None, help="bits-per-byte window (default: target max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="bits-per-byte windows per forward")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts for the acceptance figure")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--speed-prompts", type=int, default=4, help="prompts for the batch-1 throughput figure")
    p.add_argument("--seed", type=int, default=1234, help="which held-out prompts are cut")
    p.add_argument("--json", default=None, help="write the figures here (default: eval.json beside --card)")
    p.add_argument("--card", default=None, help="write MODEL_CARD.md here")
    p.add_argument("--rebuild-command", default=DEFAULT_REBUILD, help="command quoted in the card's Rebuild section")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target, tokenizer = load_any(args.target)
        draft, draft_tokenizer = load_any(args.draft)
        corpus = corpus_from_args(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(draft_tokenizer):
        print("error: the target and the draft have different tokenizers", file=sys.stderr)
        return 2
    _, heldout = corpus.split()
    if not heldout:
        print("error: the corpus has no held-out files", file=sys.stderr)
        return 2
    seq_len = args.seq_len or target.cfg.max_seq_len
    print(f"bits per byte on {len(heldout)} held-out files ...")
    bpb = heldout_bits_per_byte(target, tokenizer, heldout, seq_len, args.batch_size)
    xz = xz_bits_per_byte(heldout)
    print(f"  target {bpb['bits_per_byte']:.4f} bpb; xz -9e {xz['xz_per_file_bpb']:.4f} per file, "
          f"{xz['xz_concatenated_bpb']:.4f} concatenated; expert balance "
          + ", ".join(f"{b:.2f}" for b in bpb["expert_balance_per_layer"]))
    prompts = corpus_prompts(heldout, tokenizer, args.prompts, args.prompt_tokens, args.seed)
    print(f"acceptance on {len(prompts)} held-out prompts (greedy, k={args.k}) ...")
    acc = measure_acceptance(target, draft, tokenizer, prompts, args.k, args.new_tokens,
                             max_len=args.prompt_tokens + args.new_tokens)
    print(f"  acceptance rate {acc['acceptance_rate']:.3f}, mean acceptance length {acc['mean_acceptance_length']:.3f}")
    print("batch-1 throughput, plain vs speculative ...")
    speed = decode_throughput(target, draft, tokenizer, prompts[: args.speed_prompts], args.k, args.new_tokens)
    print(f"  plain {speed['plain_tokens_per_s']:.1f} tokens/s, speculative {speed['speculative_tokens_per_s']:.1f} "
          f"tokens/s ({speed['speedup']:.2f}x), adaptive k {speed['adaptive_tokens_per_s']:.1f} tokens/s "
          f"({speed['adaptive_speedup']:.2f}x; steps per k {speed['adaptive_steps_per_k']})")
    print("forward costs at batch 1 ...")
    costs = forward_costs(target, draft, prompts, args.k)
    print("  " + ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in costs.items()))
    results = {
        "target": str(Path(args.target)),
        "draft": str(Path(args.draft)),
        "corpus": corpus.describe(),
        "corpus_is_stdlib": args.corpus == "stdlib",
        "bits_per_byte": bpb,
        "xz": xz,
        "acceptance": acc,
        "throughput": speed,
        "forward_costs": costs,
        "environment": environment(),
    }
    json_path = args.json or (str(Path(args.card).with_name("eval.json")) if args.card else None)
    if json_path:
        write_json(json_path, results)
    if args.card:
        card = render_model_card(results, Path(args.target), Path(args.draft),
                                 Path(args.tokenizer_dir) if args.tokenizer_dir else None, args.rebuild_command)
        Path(args.card).parent.mkdir(parents=True, exist_ok=True)
        Path(args.card).write_text(card)
        print(f"wrote {args.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
