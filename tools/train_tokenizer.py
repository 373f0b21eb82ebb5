"""Train the sentencepiece BPE tokenizer of the built-in models and check it is byte-exact.

    python tools/train_tokenizer.py --out jaxspec/assets/tokenizer            # stdlib, 4096 pieces
    python tools/train_tokenizer.py --corpus data.jsonl --vocab-size 8000 --out tok/

Trains on the training split of the corpus only (held-out files stay unseen),
writes OUT/tokenizer.model and OUT/tokenizer_report.json, then encodes and
decodes EVERY held-out file: the tool exits 1 and lists the files if any one
does not come back byte for byte. Settings and their reasons:
jaxspec/training/tokenizer_training.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxspec.tokenizer import SentencePieceTokenizer
from jaxspec.training.corpus import add_corpus_args, corpus_from_args
from jaxspec.training.tokenizer_training import (
    MIN_VOCAB,
    check_roundtrip,
    tokenizer_stats,
    train_sentencepiece,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--out", required=True, help="output directory (tokenizer.model, tokenizer_report.json)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of characters given their own piece; the rest use byte fallback")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on a seeded random sample of this many text chunks (default: all)")
    p.add_argument("--chunk-chars", type=int, default=2048, help="training chunk size (cut at line ends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        print(f"error: --vocab-size must be >= {MIN_VOCAB}", file=sys.stderr)
        return 2
    try:
        corpus = corpus_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, heldout = corpus.split()
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        path = train_sentencepiece(
            train, out / "tokenizer.model", vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            max_sentences=args.max_sentences, chunk_chars=args.chunk_chars, seed=args.seed, num_threads=args.threads,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_s = time.perf_counter() - t0
    tok = SentencePieceTokenizer(path)
    # Held-out files are the round-trip test set; with no held-out file (tiny corpora) check the training files.
    check_set = heldout or train
    failures = check_roundtrip(tok, check_set)
    report = {
        "corpus": corpus.describe(),
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "special_ids": {"pad": 0, "bos": tok.bos_id, "eos": list(tok.eos_ids), "unk": tok.sp.unk_id()},
        "max_sentences": args.max_sentences,
        "seed": args.seed,
        "train_seconds": round(train_s, 2),
        "heldout": tokenizer_stats(tok, heldout) if heldout else None,
        "roundtrip_checked": "heldout" if heldout else "train (no held-out file)",
        "roundtrip_documents": len(check_set),
        "roundtrip_failures": failures,
    }
    (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    stats = report["heldout"] or tokenizer_stats(tok, train)
    print(f"tokenizer: {tok.vocab_size} pieces in {train_s:.1f}s -> {path}")
    print(f"  {stats['bytes_per_token']:.3f} bytes/token on {stats['documents']} files, "
          f"{stats['byte_fallback_tokens']} byte-fallback tokens")
    if failures:
        print(f"round trip FAILED on {len(failures)} of {len(check_set)} files:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(f"  round trip exact on all {len(check_set)} {report['roundtrip_checked']} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
